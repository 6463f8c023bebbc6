"""The host backend contract: what the agent asks of the hypervisor, in plain dataclasses.

Besides the inventory, a backend gives replication what Hyper-V gives Hyper-V Replica:

- a **consistent cut** of all of a VM's disks (:meth:`HostBackend.take_cut`, a checkpoint):
  each disk's chain up to a frozen top layer, plus the byte ranges changed since the last cut
  the replica committed (from the backend's change tracking, the analog of RCT), or ``None``
  with a reason when the tracking cannot be trusted;
- **release** of a cut once the replica committed it (:meth:`HostBackend.release_cut`), which
  folds the frozen layers back so chains stay short;
- a way for workloads to write a VM's disks so that the tracking sees every write
  (:meth:`HostBackend.open_writer`), and the VM state changes failover needs.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from types import TracebackType
from typing import Self

from sitepair import paths
from sitepair.errors import FailedPrecondition, NotFound


class QuiesceFailed(FailedPrecondition):
    """An application-consistent cut was asked for and the guest could not be quiesced (its
    pre-checkpoint hook failed, VSS in the guest failed). No cut was made; a crash-consistent
    cut can still be taken, and the replication loop takes one rather than stall."""


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


@dataclasses.dataclass(frozen=True)
class FrozenDisk:
    """One disk of a cut."""

    disk_id: str
    #: Base first, frozen top last: opening ``chain[-1]`` read-only reads the cut.
    chain: tuple[Path, ...]
    virtual_size: int
    #: "vhdx" or "vhd".
    format: str
    #: ``(offset, length)`` byte ranges changed since the last released cut, coalesced,
    #: aligned to the change-log block (64 KiB; the last range ends at ``virtual_size``);
    #: ``None`` when the tracking cannot be trusted (see :attr:`Cut.untrusted_reason`).
    changed: tuple[tuple[int, int], ...] | None


@dataclasses.dataclass(frozen=True)
class Cut:
    """A crash- or application-consistent point of all of a VM's disks."""

    vm_id: str
    #: Unique; persisted with the VM, so it survives agent restarts.
    cut_id: str
    #: Unix time the disks were frozen.
    taken_at: float
    #: True only if the VM's pre-checkpoint hook ran and succeeded (the VSS analog).
    app_consistent: bool
    disks: tuple[FrozenDisk, ...]
    #: Why the tracking cannot be trusted, in an operator's words ("" = trusted). When set,
    #: every ``disks[i].changed`` is ``None`` and the cycle must resync (checksum or full).
    untrusted_reason: str = ""

    @property
    def trusted(self) -> bool:
        return not self.untrusted_reason


@dataclasses.dataclass(frozen=True)
class RegisteredVm:
    """A VM a backend made of existing disk chains (a failover, a test failover), and what
    :meth:`HostBackend.unregister_vm` needs to undo it exactly."""

    vm_id: str
    name: str
    #: Where the backend keeps the VM (its folder), for records and logs.
    location: str
    #: Files the registration made for the VM (its own top layers, copies): deleted by undo.
    created: tuple[str, ...] = ()
    #: The definition of a VM of the same name and id it replaced (a failback onto the old
    #: primary), in the backend's own words: restored by undo. None: nothing was replaced.
    previous: str | None = None


@dataclasses.dataclass(frozen=True)
class GuestProgramResult:
    """What a program run inside a guest (:meth:`HostBackend.guest_run`) came to."""

    #: Its exit status (128 + the signal that killed it); -1 when it timed out.
    exit_status: int
    #: The last 64 KiB of its stdout then stderr, decoded as UTF-8 (bad bytes replaced).
    output: str
    #: It was still running at the deadline (and may still be: it is not stopped).
    timed_out: bool


def storage_class_of(storage: tuple[tuple[str, Path], ...], path: Path) -> str:
    """The storage classification whose folder holds ``path`` (symlinks resolved), or ""."""
    for name, folder in storage:
        if paths.is_inside(folder, path):
            return name
    return ""


class VmWriter(abc.ABC):
    """Writes into a VM's active disk layers the way its guest would, seen by the tracking.

    Usable from any process while the backend takes cuts; thread-safe. A context manager:
    leaving the block closes the writer (flushing and closing its disks cleanly)."""

    @abc.abstractmethod
    def write(self, disk_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes of disk ``disk_id`` at ``offset``."""

    @abc.abstractmethod
    def write_zeroes(self, disk_id: str, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` of disk ``disk_id`` read as zeros."""

    @abc.abstractmethod
    def read(self, disk_id: str, offset: int, length: int) -> bytes:
        """Guest bytes of disk ``disk_id`` as the guest sees them now."""

    @abc.abstractmethod
    def virtual_size(self, disk_id: str) -> int:
        """Guest-visible size of disk ``disk_id`` in bytes."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and close. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class HostBackend(abc.ABC):
    """One hypervisor. Methods block (they touch disks or call the hypervisor): the agent calls
    them from worker threads. ``vm_ref`` is a VM's id or name."""

    kind: str

    @abc.abstractmethod
    def inventory(self) -> HostInventory:
        """Every VM with its disks and NICs, the VM networks and storage classifications."""

    def volumes(self) -> list[Path]:
        """Folders whose free space matters (VM storage, replicas), for heartbeat metrics."""
        return []

    @abc.abstractmethod
    def open_writer(self, vm_ref: str) -> VmWriter:
        """A writer for the VM's disks (a workload, a guest simulator)."""

    @abc.abstractmethod
    def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Cut:
        """Checkpoint every disk of the VM at one instant and describe the frozen chains.

        ``changed`` covers everything written since the last *released* cut: a cut taken
        while an earlier one is outstanding covers both. ``app_consistent`` asks the guest to
        quiesce first (pre-checkpoint hook); a failing hook raises :class:`QuiesceFailed` and no
        cut is made (the replication loop then takes a crash-consistent cut at once). A backend may
        instead fall back to a crash-consistent cut itself and say so (``app_consistent``
        false), as the hyperv backend does when VSS in the guest fails."""

    @abc.abstractmethod
    def outstanding_cut(self, vm_ref: str) -> Cut | None:
        """The newest cut taken and not released, or ``None``; survives agent restarts."""

    @abc.abstractmethod
    def release_cut(self, vm_ref: str, cut_id: str) -> None:
        """The replica committed ``cut_id``: fold it and every older cut back, and start the
        next cut's ``changed`` from here. Idempotent; safe to re-run after a crash."""

    @abc.abstractmethod
    def reset_tracking(self, vm_ref: str, cut_id: str) -> None:
        """A full or checksum resync of ``cut_id`` made the replica equal to it: tracking is
        trusted again from that cut on (reasons found later still count)."""

    @abc.abstractmethod
    def set_vm_state(self, vm_ref: str, state: str) -> VmRecord:
        """Change the VM's power state: "off", "running" or "paused"."""

    @abc.abstractmethod
    def connect_nic(self, vm_ref: str, nic: str, network: str) -> VmRecord:
        """Connect NIC ``nic`` to VM network ``network`` ("" disconnects it)."""

    # -- what failover needs ----------------------------------------------------------------
    def vm_id_of(self, name: str) -> str | None:
        """The id of the VM called ``name`` on this host, or None."""
        return next((vm.id for vm in self.inventory().vms if vm.name == name), None)

    def vm_state(self, vm_ref: str) -> str:
        """ "off", "running" or "paused"."""
        for vm in self.inventory().vms:
            if vm_ref in (vm.id, vm.name):
                return vm.state
        raise NotFound(f"no VM {vm_ref!r} on this host")

    @abc.abstractmethod
    def register_vm(
        self,
        name: str,
        *,
        vm_id: str,
        disks: list[tuple[str, list[Path]]],
        cpu: int,
        memory_mb: int,
        generation: int = 2,
        nics: list[tuple[str, str]] | None = None,
        state: str = "off",
        replace: bool = False,
    ) -> RegisteredVm:
        """Make a VM of existing disk chains (``disks``: [(disk id, chain base first)]) without
        ever writing those chains: a replica's recovery point stays exactly as it was, so the
        registration can be undone. ``nics``: [(NIC name, VM network)] ("" = not connected:
        an isolated test VM). With ``replace``, a VM of that name and id already on the host
        (the fenced old primary, on a failback) is replaced, and undo brings it back."""

    @abc.abstractmethod
    def unregister_vm(self, registered: RegisteredVm) -> None:
        """Undo :meth:`register_vm`: power the VM off, remove it and the files it made, and
        bring back the VM it replaced. Idempotent."""

    @abc.abstractmethod
    def remove_vm(self, vm_ref: str) -> Path:
        """Power the VM off and remove it with its own files (layers its chains name outside
        its folder are left alone)."""

    @abc.abstractmethod
    def disk_chains(self, vm_ref: str) -> dict[str, list[Path]]:
        """Each disk's layers, base first, as absolute paths."""

    @abc.abstractmethod
    def guest_run(
        self, vm_ref: str, program: str, args: list[str], timeout: float
    ) -> GuestProgramResult:
        """Run ``program`` (an absolute path inside the guest) with ``args`` in the running VM
        through the backend's guest channel, waiting up to ``timeout`` seconds for it to exit.
        A backend with no such channel, or a guest not listening on it, raises
        FailedPrecondition saying so. The caller has checked the arguments and that the VM
        is a test VM (a drill's check): never a production VM."""

    def settle_disks(self, vm_ref: str) -> dict[str, list[Path]]:
        """The VM is off: make its disks chains that ``sitepair.vdisk`` can write (a replica
        adopts them on reverse replication) and return them. Backends whose layers already are
        VHD/VHDX chains return :meth:`disk_chains`."""
        return self.disk_chains(vm_ref)
