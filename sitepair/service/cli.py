"""The ``service`` commands both programs share: install, remove, status, start, stop.

Each program describes itself as a :class:`ServiceProgram` (how to build its unit from its home);
:func:`add_commands` adds ``service install|remove|status|start|stop`` to its parser. On Linux
these write and drive a systemd unit (:mod:`sitepair.service.systemd`); a program that also runs
as a Windows service passes ``windows`` (the agent: ``agent/winservice.py``), which handles the
same commands on Windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sitepair.cliutil import EXIT_OK, print_json
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.service import systemd


@dataclasses.dataclass(frozen=True)
class InstallOptions:
    home: Path
    user: str | None
    unit_dir: Path
    enable: bool
    name: str


class WindowsService(Protocol):
    """What a program's Windows service offers the ``service`` commands."""

    def command(self, action: str, options: InstallOptions) -> str: ...


@dataclasses.dataclass(frozen=True)
class ServiceProgram:
    #: The program's name, also the default unit name ("sitepair-broker").
    prog: str
    #: Build the unit for a home (reads the home's configuration).
    unit: Callable[[InstallOptions], systemd.UnitSpec]
    windows: WindowsService | None = None


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    program: ServiceProgram,
    *,
    parents: list[argparse.ArgumentParser],
    home_option: bool,
) -> None:
    """Add the ``service`` group; ``home_option``: add ``--home`` (the agent's commands each
    take it; the broker's is global)."""
    group = sub.add_parser(
        "service",
        help="install and manage the system service (systemd; Windows for the agent)",
        parents=parents,
    )
    actions = group.add_subparsers(dest="service_action", required=True, metavar="ACTION")
    helps = {
        "install": "write the service unit and enable it (systemd), or install the Windows service",
        "remove": "stop, disable and delete the service",
        "status": "show the service's state, or how to run it where there is no service manager",
        "start": "start the service",
        "stop": "stop the service (the daemon shuts down cleanly)",
    }
    for action, text in helps.items():
        sp = actions.add_parser(action, help=text, parents=parents)
        if home_option:
            sp.add_argument("--home", required=True, help="the home the service runs")
        sp.add_argument(
            "--name", default=program.prog, help=f"service (unit) name, default {program.prog}"
        )
        sp.add_argument(
            "--unit-dir",
            default=str(systemd.DEFAULT_UNIT_DIR),
            help=f"systemd: where the unit file goes (default {systemd.DEFAULT_UNIT_DIR})",
        )
        if action in ("install", "remove"):
            sp.add_argument(
                "--no-enable",
                action="store_true",
                help="systemd: only write (or delete) the unit file, no systemctl calls; "
                "Windows: install without starting",
            )
        if action == "install":
            sp.add_argument("--user", help="the account the service runs as (default: root)")
        sp.set_defaults(fn=lambda args, action=action: run(program, action, args))


def _options(args: argparse.Namespace) -> InstallOptions:
    if not getattr(args, "home", None):
        raise InvalidArgument("service commands need --home DIR")
    return InstallOptions(
        home=Path(args.home).absolute(),
        user=getattr(args, "user", None),
        unit_dir=Path(args.unit_dir),
        enable=not getattr(args, "no_enable", False),
        name=args.name,
    )


def on_windows() -> bool:
    return sys.platform == "win32"


def run(program: ServiceProgram, action: str, args: argparse.Namespace) -> int:
    options = _options(args)
    as_json = getattr(args, "json", False)

    def show(doc: dict[str, object], *lines: str) -> int:
        if as_json:
            print_json(doc)
        else:
            for line in lines:
                print(line)
        return EXIT_OK

    if on_windows():
        if program.windows is None:
            raise FailedPrecondition(
                f"{program.prog} has no Windows service",
                hint=f"run `{program.prog}` in the foreground, or on Linux under systemd",
            )
        said = program.windows.command(action, options)
        return show({"service": options.name, "action": action, "message": said}, said)
    ctl = systemd.Systemctl(f"{options.name}.service")
    if action == "install":
        spec = program.unit(options)
        note = _check_account(options) if options.user else None
        path = systemd.write_unit(spec, options.unit_dir)
        if options.enable:
            ctl.enable()
            then = f"enabled {spec.unit_file}; start it with: systemctl start {spec.unit_file}"
        else:
            then = f"enable it with: systemctl daemon-reload && systemctl enable --now {path.name}"
        lines = [f"wrote {path}", *([note] if note else []), then]
        return show({"unit": str(path), "enabled": options.enable}, *lines)
    path = options.unit_dir / f"{options.name}.service"
    if action == "remove":
        if options.enable:
            ctl.disable()
        existed = path.exists()
        path.unlink(missing_ok=True)
        said = f"removed {path}" if existed else f"no unit at {path}"
        return show({"unit": str(path), "removed": existed}, said)
    if action == "status":
        doc: dict[str, object] = {"unit": str(path), "installed": path.exists()}
        if systemd.Systemctl.available():
            said = ctl.status()
            return show({**doc, "systemd": True, "status": said}, said.rstrip("\n"))
        spec = program.unit(options)
        foreground = systemd.command_line(spec.exec_start)
        state = "present" if path.exists() else "not installed"
        return show(
            {**doc, "systemd": False, "foreground": foreground},
            f"systemd is not running on this machine; unit file {path}: {state}",
            f"run it in the foreground with: {foreground}",
        )
    ctl.run(action, f"{options.name}.service")
    done = "started" if action == "start" else "stopped"
    return show(
        {"unit": f"{options.name}.service", "state": done}, f"{done} {options.name}.service"
    )


def _check_account(options: InstallOptions) -> str | None:
    """Refuse an account this machine does not have; a note when it does not own the home."""
    import pwd  # Unix only, as systemd is

    assert options.user is not None
    try:
        account = pwd.getpwnam(options.user)
    except KeyError:
        raise InvalidArgument(
            f"there is no user {options.user!r} on this machine",
            hint=f"create it first, e.g. useradd --system --home-dir {options.home} "
            f"--shell /usr/sbin/nologin {options.user}",
        ) from None
    owner = options.home.stat().st_uid
    if owner != account.pw_uid:
        return (
            f"note: {options.home} is not owned by {options.user}; the service writes there: "
            f"chown -R {options.user}: {options.home}"
        )
    return None
