"""One VM of the ``qemu`` backend: its definition (``vm.json``), its runtime files, the QEMU
command line that runs it, and the process that does.

::

    <vm-root>/<vm-name>/vm.json          id, name, firmware, machine, cpu, memory_mb,
                                         disks [{id, base, format}], nics [{name, network, mac}]
    <vm-root>/<vm-name>/disks/           base images (VHDX or VHD: what replicates)
    <vm-root>/<vm-name>/overlays/        qcow2 layers above each base (agent.hosts.qemu_layers)
    <vm-root>/<vm-name>/layers.json      the layers and the change tracking they carry
    <vm-root>/<vm-name>/run/             qmp.sock, qga.sock (guest agent), qemu.pid,
                                         serial.log (this boot's console; serial.previous.log
                                         the boot before), qemu.log,
                                         instance.json (pid, start time, accel, command line)

A VM is "running" or "paused" while its QEMU process lives and "off" otherwise: QEMU is started
with ``-daemonize``, so a VM outlives the agent that started it, and the agent finds it again
from ``run/instance.json`` (the pid *and* its start time, so a recycled pid is not mistaken for
it). Every VM starts paused (``-S``) so the backend can put a fresh tracking layer on its disks
before the guest runs a single instruction, then continues it.

Linux only (QEMU/KVM hosts): the process handling uses POSIX signals and ``/proc``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from agent.hosts.base import NicRecord
from sitepair import paths
from sitepair.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from sitepair.fsutil import atomic_write

log = logging.getLogger("sitepair.agent.qemu")

FIRMWARES = ("bios", "uefi")
MACHINES = ("pc", "q35")
DISK_FORMATS = ("vhdx", "vhd")
MAX_VM_JSON = 256 * 1024
#: The OVMF firmware Debian's ovmf package installs (UEFI guests).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: A unix socket path must fit in sun_path (108 bytes on Linux).
_SOCKET_PATH_MAX = 100


@dataclasses.dataclass(frozen=True)
class QemuDisk:
    id: str
    #: The base image: relative to the VM folder, or absolute (replica VMs, storage folders).
    base: str
    format: str = "vhdx"


@dataclasses.dataclass(frozen=True)
class QemuVmSpec:
    """The content of one ``vm.json``. Disks boot in their order (the first is the boot disk)."""

    id: str
    name: str
    firmware: str = "bios"
    machine: str = "pc"
    cpu: int = 1
    memory_mb: int = 256
    disks: tuple[QemuDisk, ...] = ()
    nics: tuple[NicRecord, ...] = ()

    @property
    def generation(self) -> int:
        """Hyper-V's terms, which the broker speaks: 1 = BIOS, 2 = UEFI."""
        return 2 if self.firmware == "uefi" else 1

    def disk(self, disk_id: str) -> QemuDisk:
        for d in self.disks:
            if d.id == disk_id:
                return d
        known = ", ".join(d.id for d in self.disks) or "none"
        raise NotFound(f"VM {self.name} has no disk {disk_id!r} (disks: {known})")

    def to_json(self) -> bytes:
        doc = {
            "id": self.id,
            "name": self.name,
            "firmware": self.firmware,
            "machine": self.machine,
            "cpu": self.cpu,
            "memory_mb": self.memory_mb,
            "disks": [{"id": d.id, "base": d.base, "format": d.format} for d in self.disks],
            "nics": [{"name": n.name, "network": n.network, "mac": n.mac} for n in self.nics],
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> QemuVmSpec:
        try:
            doc = json.loads(data)
            spec = cls(
                id=str(doc["id"]),
                name=str(doc["name"]),
                firmware=str(doc.get("firmware", "bios")),
                machine=str(doc.get("machine", "pc")),
                cpu=int(doc.get("cpu", 1)),
                memory_mb=int(doc.get("memory_mb", 256)),
                disks=tuple(
                    QemuDisk(
                        id=str(d["id"]), base=str(d["base"]), format=str(d.get("format", "vhdx"))
                    )
                    for d in doc.get("disks", [])
                ),
                nics=tuple(
                    NicRecord(
                        name=str(n["name"]),
                        network=str(n.get("network", "")),
                        mac=str(n.get("mac", "")),
                    )
                    for n in doc.get("nics", [])
                ),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{where} is not a valid VM definition: {exc}") from exc
        try:
            spec.check()
        except InvalidArgument as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from exc
        return spec

    def check(self) -> None:
        """Every name that becomes a path or a QEMU argument passes the project's rules."""
        paths.check_component(self.id, "VM id")
        paths.check_component(self.name, "VM name")
        if self.firmware not in FIRMWARES:
            raise InvalidArgument(f"firmware {self.firmware!r} is not one of {FIRMWARES}")
        if self.machine not in MACHINES:
            raise InvalidArgument(f"machine {self.machine!r} is not one of {MACHINES}")
        if not 1 <= self.cpu <= 256:
            raise InvalidArgument(f"{self.cpu} CPUs: a VM has 1 to 256")
        if not 16 <= self.memory_mb <= 4 << 20:
            raise InvalidArgument(f"{self.memory_mb} MiB of memory: a VM has 16 MiB to 4 TiB")
        if not self.disks:
            raise InvalidArgument(f"VM {self.name} has no disks")
        if len({d.id for d in self.disks}) != len(self.disks):
            raise InvalidArgument(f"VM {self.name} names a disk twice")
        for d in self.disks:
            paths.check_component(d.id, "disk id")
            if d.format not in DISK_FORMATS:
                raise InvalidArgument(
                    f"disk {d.id}: format {d.format!r} is not one of {DISK_FORMATS}"
                )
            if "\0" in d.base or "," in d.base:
                # QEMU's option syntax takes "," as a separator.
                raise InvalidArgument(f"disk {d.id}: base path {d.base!r} holds a NUL or a comma")
        for n in self.nics:
            paths.check_component(n.name, "NIC name")
            if n.mac and not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", n.mac):
                raise InvalidArgument(f"NIC {n.name}: MAC address {n.mac!r} is not valid")


def read_vm(folder: Path) -> QemuVmSpec:
    path = folder / "vm.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"no VM definition {path}") from exc
    if len(data) > MAX_VM_JSON:
        raise ConfigError(f"{path} is larger than {MAX_VM_JSON} bytes")
    return QemuVmSpec.from_json(data, path)


def write_vm(folder: Path, spec: QemuVmSpec) -> None:
    spec.check()
    atomic_write(folder / "vm.json", spec.to_json())


def base_path(folder: Path, disk: QemuDisk) -> Path:
    """A disk's base image, resolved; relative bases must stay inside the VM folder."""
    if Path(disk.base).is_absolute():
        return Path(disk.base)
    return paths.check_inside(folder, disk.base, f"base of disk {disk.id}")


# -- runtime files -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where a running VM's files are."""

    folder: Path

    @property
    def dir(self) -> Path:
        return self.folder / "run"

    def _socket(self, name: str) -> Path:
        sock = self.dir / f"{name}.sock"
        if len(str(sock)) <= _SOCKET_PATH_MAX:
            return sock
        # A deep VM folder: the socket lives in the temporary folder, named after the folder.
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:20]
        return Path(tempfile.gettempdir()) / f"sitepair-{name}-{digest}.sock"

    @property
    def qmp(self) -> Path:
        return self._socket("qmp")

    @property
    def qga(self) -> Path:
        """The host end of the guest agent's virtio-serial port."""
        return self._socket("qga")

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.log"

    @property
    def stderr(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def instance(self) -> Path:
        return self.dir / "instance.json"


@dataclasses.dataclass(frozen=True)
class Instance:
    """The QEMU process of a VM, as recorded when it was started."""

    pid: int
    create_time: float
    accel: str
    started_at: float

    def alive(self) -> bool:
        """True while *this* process runs (a recycled pid has another start time)."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.5 and proc.status() not in (
                psutil.STATUS_ZOMBIE,
                psutil.STATUS_DEAD,
            )
        except psutil.Error:
            return False


def read_instance(rt: Runtime) -> Instance | None:
    try:
        doc = json.loads(rt.instance.read_bytes())
        return Instance(
            pid=int(doc["pid"]),
            create_time=float(doc["create_time"]),
            accel=str(doc.get("accel", "")),
            started_at=float(doc.get("started_at", 0.0)),
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def running_instance(rt: Runtime) -> Instance | None:
    inst = read_instance(rt)
    return inst if inst is not None and inst.alive() else None


# -- the command line ----------------------------------------------------------------------


def qemu_driver(fmt: str) -> str:
    """QEMU's name for an image format (its VHD driver is "vpc")."""
    return {"vhdx": "vhdx", "vhd": "vpc", "qcow2": "qcow2"}[fmt]


def node(index: int, layer: str) -> str:
    """QMP node names (at most 31 characters, so built from the disk's index, not its id):
    ``d0b`` the base format node, ``d0o7`` overlay 7 of disk 0; ``...f`` their file nodes."""
    return f"d{index}{layer}"


def blockdev_args(index: int, base: Path, fmt: str, overlays: list[tuple[int, Path]]) -> list[str]:
    """``-blockdev`` options for one disk: the base, then each overlay on the one below."""
    args = [
        "-blockdev",
        f"driver=file,filename={_opt(base)},node-name={node(index, 'bf')},auto-read-only=on",
        "-blockdev",
        f"driver={qemu_driver(fmt)},file={node(index, 'bf')},node-name={node(index, 'b')},"
        "auto-read-only=on",
    ]
    below = node(index, "b")
    for number, path in overlays:
        name = node(index, f"o{number}")
        args += [
            "-blockdev",
            f"driver=file,filename={_opt(path)},node-name={name}f",
            "-blockdev",
            f"driver=qcow2,file={name}f,backing={below},node-name={name}",
        ]
        below = name
    return args


def _opt(path: Path) -> str:
    text = str(path)
    if "," in text or "\0" in text:
        raise InvalidArgument(f"{text!r}: QEMU cannot take a path with a comma or NUL")
    return text


def command_line(
    binary: str,
    spec: QemuVmSpec,
    rt: Runtime,
    *,
    accel: str,
    disks: list[tuple[Path, str, list[tuple[int, Path]]]],
    nic_backends: dict[str, str],
    vars_file: Path | None = None,
) -> list[str]:
    """The whole QEMU command line. ``disks``: per disk (in spec order) its base, format and
    overlays; ``nic_backends``: per NIC a ``-netdev`` option string ("" = no backend: the NIC
    is there with its link down)."""
    argv = [
        binary,
        "-name",
        f"{spec.name},process=sitepair-{spec.name[:20]}",
        "-machine",
        f"{spec.machine},accel={accel}",
        "-m",
        str(spec.memory_mb),
        "-smp",
        str(spec.cpu),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-qmp",
        f"unix:{_opt(rt.qmp)},server=on,wait=off",
        "-chardev",
        f"file,id=serial0,path={_opt(rt.serial)},append=on",
        "-serial",
        "chardev:serial0",
        # qemu-guest-agent's channel (application-consistent cuts, programs a drill runs in a
        # test VM; qemu_guest_agent.py).
        "-chardev",
        f"socket,id=qga0,path={_opt(rt.qga)},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-daemonize",
        "-pidfile",
        _opt(rt.pidfile),
        "-S",
    ]
    if _is_uuid(spec.id):
        argv += ["-uuid", spec.id]
    if spec.firmware == "uefi":
        if vars_file is None:
            raise FailedPrecondition("a UEFI VM needs its firmware variables file")
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(OVMF_CODE)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_opt(vars_file)}",
        ]
    for i, (base, fmt, overlays) in enumerate(disks):
        argv += blockdev_args(i, base, fmt, overlays)
        top = node(i, f"o{overlays[-1][0]}") if overlays else node(i, "b")
        argv += ["-device", f"virtio-blk-pci,drive={top},id=disk{i},bootindex={i + 1}"]
    for i, nic in enumerate(spec.nics):
        backend = nic_backends.get(nic.name, "")
        mac = f",mac={nic.mac}" if nic.mac else ""
        if backend:
            argv += ["-netdev", f"{backend},id=net{i}"]
            argv += ["-device", f"virtio-net-pci,netdev=net{i},id=nic{i}{mac}"]
        else:
            argv += ["-device", f"virtio-net-pci,id=nic{i}{mac}"]
    return argv


def _is_uuid(value: str) -> bool:
    return re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", value) is not None


def launch(argv: list[str], rt: Runtime, *, accel: str, timeout: float = 30.0) -> Instance:
    """Start QEMU daemonized (it outlives the agent) and record its instance."""
    rt.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (rt.pidfile, rt.qmp, rt.qga):
        stale.unlink(missing_ok=True)
    if rt.serial.exists():
        # One console log per boot; the one before stays beside it.
        rt.serial.replace(rt.serial.with_name("serial.previous.log"))
    with rt.stderr.open("ab") as err:
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise FailedPrecondition(
                f"{argv[0]} was not found", hint="install QEMU (Debian: qemu-system-x86)"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise FailedPrecondition(f"QEMU did not start within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise FailedPrecondition(
            f"QEMU refused to start the VM (exit status {done.returncode}): {_tail(rt.stderr)}"
        )
    pid = int(rt.pidfile.read_text().strip())
    proc = psutil.Process(pid)
    inst = Instance(pid=pid, create_time=proc.create_time(), accel=accel, started_at=time.time())
    atomic_write(
        rt.instance,
        json.dumps(
            {
                "pid": inst.pid,
                "create_time": inst.create_time,
                "accel": accel,
                "started_at": inst.started_at,
                "argv": argv,
            },
            indent=2,
        ).encode(),
    )
    return inst


def kill(inst: Instance, *, timeout: float = 10.0) -> None:
    """The last resort: SIGKILL, then wait for the process to go."""
    if not inst.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(inst.pid, signal.SIGKILL)
    wait_gone(inst, timeout)


def wait_gone(inst: Instance, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while inst.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return "(no output)"
    return text[-limit:] or "(no output)"


# -- KVM or TCG --------------------------------------------------------------------------------

#: The probe guest: one boot sector that switches from real mode to 64-bit long mode (A20,
#: identity-mapped 2 MiB page, PAE, EFER.LME, paging) and writes 1 to the isa-debug-exit port,
#: so QEMU exits with status 3. Assembled with ``as --32`` and ``ld -Ttext 0x7c00 --oformat
#: binary`` from this source:
#:
#:   cli; xor ax,ax; mov ds/es/ss,ax; mov sp,0x7c00; in al,0x92; or al,2; out 0x92,al
#:   zero 0x1000-0x3fff; [0x1000]=0x2003; [0x2000]=0x3003; [0x3000]=0x83; lgdt gdt_desc
#:   cr4|=PAE; cr3=0x1000; EFER|=LME (rdmsr/wrmsr 0xC0000080); cr0|=PG|PE; ljmp 0x08:long
#:   long: mov al,1; out 0xf4,al; 1: hlt; jmp 1b
#:   gdt: null, 64-bit code 0x00209A0000000000; gdt_desc: limit 15, base gdt
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007ce4920c02e692bf001031c0b90018f3abc70600100320c7060020"
    "0330c706003083000f0116807c0f20e06683c8200f22e066b8001000000f22d866b9800000c0"
    "0f32660d000100000f300f20c0660d010000800f22c0ea677c0800b001e6f4f4ebfd66900000"
    "00000000000000000000009a20000f00707c0000"
)
_PROBE_SECTOR = _PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"
_probe_cache: dict[str, tuple[bool, str]] = {}


def probe_accel(binary: str, accel: str = "kvm", *, timeout: float = 15.0) -> tuple[bool, str]:
    """Whether ``accel`` really runs guest code here: boot a one-sector guest that reaches long
    mode and exits through the isa-debug-exit port, with no CPU feature of the default model
    missing. ``/dev/kvm`` existing proves nothing (on some hosts KVM is listed but a Linux guest
    hangs in early boot); only a guest that ran, on a complete CPU, proves it. Cached per
    process."""
    key = f"{binary}:{accel}"
    if key in _probe_cache:
        return _probe_cache[key]
    with tempfile.TemporaryDirectory(prefix="sitepair-probe-") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(_PROBE_SECTOR)
        argv = [
            binary,
            "-machine",
            f"pc,accel={accel}",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-m",
            "16",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
            f"file={image},format=raw,if=ide",
        ]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
            stderr = done.stderr.decode(errors="replace")
            missing = re.findall(r"host doesn't support requested feature: (\S+)", stderr)
            ok = done.returncode == 3 and not missing
            if missing:
                # Seen on hosts whose KVM lacks what even QEMU's default CPU model needs (SSE3):
                # a boot sector runs, a Linux kernel hangs in early boot.
                why = f"the host's {accel} lacks CPU features the default model needs: " + (
                    ", ".join(missing[:5])
                )
            elif not ok:
                why = stderr.strip()[-300:] or f"status {done.returncode}"
            else:
                why = ""
        except subprocess.TimeoutExpired:
            ok, why = False, f"a one-sector guest did not finish within {timeout:.0f} s"
        except FileNotFoundError:
            ok, why = False, f"{binary} was not found"
    _probe_cache[key] = (ok, why)
    return ok, why


def choose_accel(binary: str, wanted: str) -> str:
    """``wanted`` is "auto", "kvm" or "tcg"; "auto" takes KVM when the probe shows it works."""
    if wanted == "tcg":
        return "tcg"
    ok, why = probe_accel(binary, "kvm")
    if ok:
        return "kvm"
    if wanted == "kvm":
        raise FailedPrecondition(
            f"KVM does not work on this host: {why}",
            hint="check /dev/kvm permissions and the CPU's virtualization support, or set "
            '[backend] accel = "auto" (TCG, much slower) in agent.toml',
        )
    log.warning("KVM does not work here; VMs run under TCG (slow)", extra={"fields": {"why": why}})
    return "tcg"
