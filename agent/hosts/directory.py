"""The portable ``directory`` host backend: a VM is a folder with ``vm.json`` and its disks.

::

    <vm-root>/<vm-name>/vm.json    id, name, generation, cpu, memory_mb,
                                   state (off|running|paused), nics [{name, network, mac}],
                                   disks [{id, chain: [base, ..., active]}]
    <vm-root>/<vm-name>/disks/     VHD/VHDX files; checkpoints are differencing children
    <vm-root>/<vm-name>/changes/   the changed-block log of each disk's active layer

Disk paths in ``chain`` are relative to the VM folder. Start, stop and pause are state changes in
``vm.json``; nothing executes: this backend models a Hyper-V host faithfully on disk (the same
formats, checkpoints as differencing children, a change log like RCT) so that replication and
failover can be exercised anywhere. A backend that runs real VMs is a separate piece of work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from pathlib import Path

import psutil

from agent.config import NetworkConfig
from agent.hosts.base import (
    DiskRecord,
    HostBackend,
    HostInventory,
    NetworkRecord,
    NicRecord,
    StorageRecord,
    VmRecord,
)
from sitepair import pki, vdisk
from sitepair.errors import AlreadyExists, ConfigError, InvalidArgument, NotFound, SitepairError
from sitepair.fsutil import atomic_write

log = logging.getLogger("sitepair.agent.directory")

VM_STATES = ("off", "running", "paused")
MAX_VM_JSON = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    id: str
    chain: tuple[str, ...]  # relative to the VM folder, base first, active layer last

    @property
    def active(self) -> str:
        return self.chain[-1]


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """The content of one ``vm.json``."""

    id: str
    name: str
    generation: int = 2
    cpu: int = 1
    memory_mb: int = 1024
    state: str = "off"
    nics: tuple[NicRecord, ...] = ()
    disks: tuple[DiskSpec, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "id": self.id,
            "name": self.name,
            "generation": self.generation,
            "cpu": self.cpu,
            "memory_mb": self.memory_mb,
            "state": self.state,
            "nics": [{"name": n.name, "network": n.network, "mac": n.mac} for n in self.nics],
            "disks": [{"id": d.id, "chain": list(d.chain)} for d in self.disks],
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> VmSpec:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"{where} must hold a JSON object")
        try:
            nics = tuple(
                NicRecord(
                    name=str(n["name"]),
                    network=str(n.get("network", "")),
                    mac=str(n.get("mac", "")),
                )
                for n in doc.get("nics", [])
            )
            disks = tuple(
                DiskSpec(id=str(d["id"]), chain=tuple(str(p) for p in d["chain"]))
                for d in doc.get("disks", [])
            )
            spec = cls(
                id=str(doc["id"]),
                name=str(doc["name"]),
                generation=int(doc.get("generation", 2)),
                cpu=int(doc.get("cpu", 1)),
                memory_mb=int(doc.get("memory_mb", 1024)),
                state=str(doc.get("state", "off")),
                nics=nics,
                disks=disks,
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{where} is not a valid vm.json: {exc}") from exc
        if spec.state not in VM_STATES:
            raise ConfigError(f"{where}: state must be one of {', '.join(VM_STATES)}")
        for d in spec.disks:
            if not d.chain:
                raise ConfigError(f"{where}: disk {d.id} has an empty chain")
            for p in d.chain:
                if Path(p).is_absolute() or ".." in Path(p).parts:
                    raise ConfigError(f"{where}: disk path {p!r} must stay inside the VM folder")
        return spec


class DirectoryBackend(HostBackend):
    kind = "directory"

    def __init__(
        self,
        vm_root: Path,
        *,
        storage: tuple[tuple[str, Path], ...] = (),
        networks: tuple[NetworkConfig, ...] = (),
        extra_volumes: tuple[Path, ...] = (),
    ) -> None:
        self.vm_root = Path(vm_root)
        self.storage = storage
        self.networks = networks
        self._extra_volumes = extra_volumes

    # -- VM folders -------------------------------------------------------------------------
    def vm_dir(self, name: str) -> Path:
        return self.vm_root / pki.check_identifier(name, "VM name")

    def read_vm(self, folder: Path) -> VmSpec:
        path = folder / "vm.json"
        try:
            with path.open("rb") as f:
                data = f.read(MAX_VM_JSON + 1)
        except FileNotFoundError as exc:
            raise NotFound(f"no VM in {folder} (vm.json missing)") from exc
        if len(data) > MAX_VM_JSON:
            raise ConfigError(f"{path} is larger than 1 MiB")
        return VmSpec.from_json(data, path)

    def write_vm(self, folder: Path, spec: VmSpec) -> None:
        atomic_write(folder / "vm.json", spec.to_json())

    def list_vm_dirs(self) -> list[Path]:
        if not self.vm_root.is_dir():
            return []
        return sorted(p for p in self.vm_root.iterdir() if (p / "vm.json").is_file())

    def find_vm(self, ref: str) -> tuple[Path, VmSpec]:
        """A VM by id or name."""
        for folder in self.list_vm_dirs():
            try:
                spec = self.read_vm(folder)
            except SitepairError:
                continue
            if ref in (spec.id, spec.name):
                return folder, spec
        raise NotFound(f"no VM {ref!r} under {self.vm_root}")

    def create_vm(
        self,
        name: str,
        *,
        disks: list[tuple[str, str, int]],
        cpu: int = 1,
        memory_mb: int = 1024,
        nics: list[tuple[str, str]] | None = None,
        vm_id: str | None = None,
        generation: int = 2,
        block_size: int | None = None,
    ) -> VmSpec:
        """Create a VM folder with new empty disks: ``disks`` is [(disk id, format, size)]."""
        folder = self.vm_dir(name)
        if (folder / "vm.json").exists():
            raise AlreadyExists(f"a VM named {name!r} already exists in {self.vm_root}")
        (folder / "disks").mkdir(parents=True, exist_ok=True)
        specs = []
        for disk_id, fmt, size in disks:
            pki.check_identifier(disk_id, "disk id")
            if fmt not in ("vhd", "vhdx"):
                raise InvalidArgument(f"disk format must be vhd or vhdx, not {fmt!r}")
            rel = f"disks/{disk_id}.{fmt}"
            disk = vdisk.create_disk(
                folder / rel,
                format=vdisk.DiskFormat(fmt),
                subformat=vdisk.SubFormat.DYNAMIC,
                size=size,
                block_size=block_size,
            )
            disk.close()
            specs.append(DiskSpec(id=disk_id, chain=(rel,)))
        spec = VmSpec(
            id=vm_id or str(uuid.uuid4()),
            name=name,
            generation=generation,
            cpu=cpu,
            memory_mb=memory_mb,
            nics=tuple(
                NicRecord(name=n, network=net, mac=_mac(name, n)) for n, net in (nics or [])
            ),
            disks=tuple(specs),
        )
        self.write_vm(folder, spec)
        return spec

    # -- inventory --------------------------------------------------------------------------
    def _storage_class(self, path: Path) -> str:
        resolved = path.resolve()
        for name, folder in self.storage:
            try:
                resolved.relative_to(folder.resolve())
                return name
            except ValueError:
                continue
        return ""

    def _disk_record(self, folder: Path, disk: DiskSpec) -> DiskRecord:
        path = folder / disk.active
        fmt = path.suffix.lstrip(".").lower().replace("avhdx", "vhdx").replace("avhd", "vhd")
        size = file_size = 0
        try:
            file_size = path.stat().st_size
            with vdisk.open_disk(path, read_only=True) as d:
                size = d.virtual_size
                fmt = d.format.value
        except (OSError, SitepairError) as exc:
            log.warning(
                "cannot read disk", extra={"fields": {"path": str(path), "error": str(exc)}}
            )
        return DiskRecord(
            id=disk.id,
            path=path,
            format=fmt,
            virtual_size=size,
            file_size=file_size,
            storage_class=self._storage_class(folder),
        )

    def inventory(self) -> HostInventory:
        vms = []
        for folder in self.list_vm_dirs():
            try:
                spec = self.read_vm(folder)
            except SitepairError as exc:
                log.warning(
                    "skipping VM folder",
                    extra={"fields": {"folder": str(folder), "error": str(exc)}},
                )
                continue
            vms.append(
                VmRecord(
                    id=spec.id,
                    name=spec.name,
                    generation=spec.generation,
                    cpu_count=spec.cpu,
                    memory_mb=spec.memory_mb,
                    state=spec.state,
                    disks=tuple(self._disk_record(folder, d) for d in spec.disks),
                    nics=spec.nics,
                )
            )
        storage = []
        for name, path in self.storage:
            total = free = 0
            try:
                usage = psutil.disk_usage(str(path))
                total, free = usage.total, usage.free
            except OSError:
                pass
            storage.append(StorageRecord(name=name, path=path, total_bytes=total, free_bytes=free))
        return HostInventory(
            vms=tuple(vms),
            networks=tuple(NetworkRecord(n.name, n.subnets) for n in self.networks),
            storage=tuple(storage),
        )

    def volumes(self) -> list[Path]:
        return [self.vm_root, *(p for _, p in self.storage), *self._extra_volumes]


def _mac(vm: str, nic: str) -> str:
    """A stable locally administered MAC for a VM's NIC."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"sitepair:{vm}:{nic}").bytes
    octets = [0x02, *digest[:5]]
    return ":".join(f"{o:02x}" for o in octets)
