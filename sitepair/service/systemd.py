"""systemd units for the broker and the agent: what they say, writing them, and systemctl.

:func:`render` turns a :class:`UnitSpec` into a unit file: ``Type=notify`` (the daemons send
``READY=1`` themselves, :mod:`sitepair.service.notify`), a watchdog, restart on failure, reload
by SIGHUP, and a sandbox in which only the daemon's own folders are writable. Writing the file
(:func:`write_unit`) and telling systemd about it (:class:`Systemctl`) are separate steps, so a
unit can be written to any folder and checked with ``systemd-analyze verify`` without systemd
running.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.fsutil import atomic_write

#: Where system units go.
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
#: Home folders that ``ProtectHome=yes`` would hide from the service.
_HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))
#: Folders that ``PrivateTmp=yes`` would replace with empty ones.
_TMP_TREES = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - names the trees, writes nothing


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """What a unit runs and may touch."""

    #: Unit name without ".service", e.g. "sitepair-broker".
    name: str
    description: str
    #: The daemon's full command line (an absolute program path first).
    exec_start: tuple[str, ...]
    #: Folders the daemon writes: its home first, then (agent) VM and replica storage.
    writable: tuple[Path, ...]
    #: The account it runs as; None = root.
    user: str | None = None
    #: An optional environment file (systemd ignores it when missing), e.g. for the database
    #: password.
    environment_file: Path | None = None
    #: Whether the daemon reloads on SIGHUP.
    reload: bool = True
    #: systemd kills and restarts a daemon whose watchdog pings stop for this long.
    watchdog_sec: int = 60
    #: Time to stop before systemd kills (the agent's qemu guests need their power-off time).
    stop_timeout_sec: int = 90
    #: Address families beyond AF_UNIX, AF_INET and AF_INET6 (qemu: AF_NETLINK for taps).
    extra_address_families: tuple[str, ...] = ()
    #: Whether /dev stays the host's (qemu needs /dev/kvm and /dev/net/tun).
    host_devices: bool = False
    limit_nofile: int = 65536

    @property
    def unit_file(self) -> str:
        return f"{self.name}.service"


def entry_point(program: str, module: str) -> tuple[str, ...]:
    """The absolute command that runs ``program``: its installed script beside this Python, or
    this Python with ``-m module`` when the script is not there (a source checkout)."""
    script = Path(sys.executable).parent / program
    if script.is_file():
        return (str(script.absolute()),)
    found = shutil.which(program)
    if found:
        return (str(Path(found).absolute()),)
    return (str(Path(sys.executable).absolute()), "-m", module)


def quote(arg: str) -> str:
    """One ExecStart= word: systemd's quoting, with % and $ escaped (no specifiers, no
    variables are meant)."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\n\"'\\;"):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _path_word(path: Path) -> str:
    text = str(path)
    if any(c.isspace() for c in text) or '"' in text or "%" in text:
        raise InvalidArgument(
            f"{text!r}: a folder the unit names must not hold spaces, quotes or %",
            hint="choose a home and storage folders with plain names",
        )
    return text


def render(spec: UnitSpec) -> str:
    """The unit file's text."""
    writable = list(dict.fromkeys(spec.writable))
    under_home = any(p == h or h in p.parents for p in writable for h in _HOME_TREES)
    under_tmp = any(p == t or t in p.parents for p in writable for t in _TMP_TREES)
    families = " ".join(("AF_UNIX", "AF_INET", "AF_INET6", *spec.extra_address_families))
    lines = [
        "# Written by `" + spec.name + " service install`; reinstall rather than edit it, or",
        "# override with `systemctl edit " + spec.unit_file + "`.",
        "[Unit]",
        f"Description={spec.description}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        # The daemon sends READY=1 itself once it serves, WATCHDOG=1 from its event loop.
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(quote(a) for a in spec.exec_start),
    ]
    if spec.reload:
        lines.append("ExecReload=/bin/kill -HUP $MAINPID")
    lines += [
        f"WatchdogSec={spec.watchdog_sec}s",
        "Restart=on-failure",
        "RestartSec=5s",
        "TimeoutStartSec=120s",
        f"TimeoutStopSec={spec.stop_timeout_sec}s",
    ]
    if spec.user:
        lines.append(f"User={spec.user}")
    if spec.environment_file is not None:
        # "-": a missing file is no error (a SQLite broker needs no password).
        lines.append(f"EnvironmentFile=-{_path_word(spec.environment_file)}")
    lines += [
        f"LimitNOFILE={spec.limit_nofile}",
        "UMask=0077",
        "",
        "# Sandbox: the whole file system is read-only but for the folders the daemon keeps.",
        "ProtectSystem=strict",
        # "-": a folder that does not exist yet is no error.
        "ReadWritePaths=" + " ".join(f"-{_path_word(p)}" for p in writable),
        # A home under /home or /root stays visible (read-only but for ReadWritePaths).
        f"ProtectHome={'read-only' if under_home else 'yes'}",
        # A home in /tmp (a trial) must stay visible: no private /tmp then.
        f"PrivateTmp={'no' if under_tmp else 'yes'}",
        "NoNewPrivileges=yes",
        f"PrivateDevices={'no' if spec.host_devices else 'yes'}",
    ]
    if spec.host_devices:
        # ProtectClock= below allows only the devices listed (DeviceAllow=char-rtc r): name
        # the ones QEMU opens.
        lines += ["DeviceAllow=/dev/kvm rw", "DeviceAllow=/dev/net/tun rw"]
    lines += [
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        f"RestrictAddressFamilies={families}",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def write_unit(spec: UnitSpec, unit_dir: Path) -> Path:
    """Write the unit file into ``unit_dir`` (readable by all, as systemd expects)."""
    path = unit_dir / spec.unit_file
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, render(spec).encode())
    except PermissionError as exc:
        raise FailedPrecondition(
            f"cannot write {path}: permission denied",
            hint="run `service install` as root (sudo), or pass --unit-dir",
        ) from exc
    return path


class Systemctl:
    """``systemctl`` for one unit; refuses with a clear message where systemd does not run."""

    def __init__(self, unit_file: str) -> None:
        self.unit_file = unit_file

    @staticmethod
    def available() -> bool:
        return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if not self.available():
            raise FailedPrecondition(
                "systemd is not running on this machine",
                hint="pass --no-enable to only write the unit, or run the daemon in the foreground",
            )
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise FailedPrecondition(
                f"systemctl {' '.join(args)} failed: {done.stderr.strip() or done.returncode}"
            )
        return done

    def enable(self) -> None:
        self.run("daemon-reload")
        self.run("enable", self.unit_file)

    def disable(self) -> None:
        self.run("disable", "--now", self.unit_file, check=False)
        self.run("daemon-reload")

    def status(self) -> str:
        done = self.run("status", "--no-pager", "--lines=5", self.unit_file, check=False)
        return done.stdout or done.stderr


def command_line(argv: Sequence[str]) -> str:
    """A command line to show an operator (quoted as a shell would need)."""
    return shlex.join(argv)
