"""The host backend contract: what the agent asks of the hypervisor, in plain dataclasses."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class DiskRecord:
    id: str
    path: Path
    format: str
    virtual_size: int
    file_size: int
    storage_class: str = ""


@dataclasses.dataclass(frozen=True)
class NicRecord:
    name: str
    network: str = ""
    mac: str = ""


@dataclasses.dataclass(frozen=True)
class VmRecord:
    id: str
    name: str
    generation: int
    cpu_count: int
    memory_mb: int
    state: str
    disks: tuple[DiskRecord, ...] = ()
    nics: tuple[NicRecord, ...] = ()


@dataclasses.dataclass(frozen=True)
class NetworkRecord:
    name: str
    subnets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    name: str
    path: Path
    total_bytes: int = 0
    free_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class HostInventory:
    vms: tuple[VmRecord, ...] = ()
    networks: tuple[NetworkRecord, ...] = ()
    storage: tuple[StorageRecord, ...] = ()


class HostBackend(abc.ABC):
    """One hypervisor. Methods block (they touch disks or call the hypervisor): the agent calls
    them from worker threads."""

    kind: str

    @abc.abstractmethod
    def inventory(self) -> HostInventory:
        """Every VM with its disks and NICs, the VM networks and storage classifications."""

    def volumes(self) -> list[Path]:
        """Folders whose free space matters (VM storage, replicas), for heartbeat metrics."""
        return []
