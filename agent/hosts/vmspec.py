"""``vm.json``: the description of one VM of the ``directory`` backend.

::

    {"id": ..., "name": ..., "generation": 2, "cpu": 1, "memory_mb": 1024,
     "state": "off" | "running" | "paused",
     "nics": [{"name": "eth0", "network": "prod", "mac": "02:..."}],
     "disks": [{"id": "os", "chain": ["disks/os.vhdx", "disks/os_000001.avhdx"]}]}

A disk's ``chain`` lists its layers base first, active layer last: paths relative to the VM
folder (never leaving it) or absolute paths (replica VMs keep their disks in
storage-classification folders). The file is always replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from agent.hosts.base import NicRecord
from sitepair.errors import ConfigError, NotFound
from sitepair.fsutil import atomic_write

VM_STATES = ("off", "running", "paused")
MAX_VM_JSON = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    id: str
    #: Base first, active layer last; relative to the VM folder, or absolute.
    chain: tuple[str, ...]

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

    def disk(self, disk_id: str) -> DiskSpec:
        for d in self.disks:
            if d.id == disk_id:
                return d
        known = ", ".join(d.id for d in self.disks) or "none"
        raise NotFound(f"VM {self.name} has no disk {disk_id!r} (disks: {known})")

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
            if len(set(d.chain)) != len(d.chain):
                raise ConfigError(f"{where}: disk {d.id} names a layer twice in its chain")
            for p in d.chain:
                if not Path(p).is_absolute() and ".." in Path(p).parts:
                    raise ConfigError(
                        f"{where}: disk path {p!r} must stay inside the VM folder "
                        "(or be an absolute path)"
                    )
        return spec


def read_vm(folder: Path) -> VmSpec:
    path = folder / "vm.json"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_VM_JSON + 1)
    except FileNotFoundError as exc:
        raise NotFound(f"no VM in {folder} (vm.json missing)") from exc
    if len(data) > MAX_VM_JSON:
        raise ConfigError(f"{path} is larger than 1 MiB")
    return VmSpec.from_json(data, path)


def write_vm(folder: Path, spec: VmSpec) -> None:
    atomic_write(folder / "vm.json", spec.to_json())
