"""The ``hyperv`` host backend: Hyper-V's checkpoints and Resilient Change Tracking (RCT).

**Exercised on Windows only, and not yet on a real Hyper-V host.** Every call to Hyper-V goes
through the narrow :class:`agent.hosts.hyperv_api.HyperVApi`; on a Windows host that is
:class:`~agent.hosts.hyperv_api.PowerShellHyperVApi`. The logic here is tested on Linux against
``FakeHyperVApi`` (``tests/hosts/fake_hyperv.py``), a simulation over real VHDX/VHD files;
``docs/hyperv-backend.md`` says what that proves and what it cannot.

The contract of :class:`agent.hosts.base.HostBackend` in Hyper-V's terms:

- **cut** (:meth:`HyperVBackend.take_cut`) = a *recovery checkpoint* named
  ``sitepair-<cut id>`` (application consistent through the guest's VSS when asked; if the guest
  cannot quiesce, a crash-consistent one and ``app_consistent`` false). The VM writes a new
  AVHDX from then on; the checkpoint's drives name the frozen layers, and each disk's chain
  (frozen layer and its parents, from ``Get-VHD``) is what a cycle reads with
  :mod:`sitepair.vdisk`.
- **changed** = ``GetVirtualDiskChanges`` of the frozen layer since the RCT id of the disk in
  the *baseline*: the reference point of the last released cut. Hyper-V's ranges are widened to
  64 KiB blocks (the change-log block of the contract), clipped to the disk and coalesced.
- **release** = the older outstanding checkpoints are removed (Hyper-V merges them), then the
  cut's checkpoint is converted to an RCT *reference point* (Hyper-V merges it too); its
  ``ResilientChangeTrackingIdentifiers`` become the new baseline and sitepair's older reference
  points are destroyed. Reference points sitepair did not make are never touched.
- **untrusted**: no baseline RCT id for a disk (the VM's first cut, a disk added since), or
  Hyper-V refusing an RCT id (a VM moved or imported, a disk edited or merged outside Hyper-V,
  reset tracking): the reason is kept as a *taint* until :meth:`HyperVBackend.reset_tracking`
  names a cut at or after it, exactly as the directory backend does.
- **failover** (:meth:`HyperVBackend.register_vm`, :meth:`HyperVBackend.unregister_vm`) = a new
  VM over a new differencing child of each replica chain; on a failback the fenced old VM is
  removed and its ``Get-VM`` definition kept (JSON) so that an undo makes it again with
  ``New-VM`` over the same files. Like everything here, tested on Linux only, against the fake.

What sitepair keeps per VM lives in ``<vm root>/.sitepair-tracking/<Hyper-V VM id>/cuts.json``
(cuts, baseline, taints, journals of an interrupted cut or release), under the VM's operations
lock (:mod:`agent.hosts.vmlock`). A VM that sitepair registered (a failover of a replica)
carries sitepair's VM id and its disk names in its Notes (``sitepair-vm-id: ...``,
``sitepair-disks: scsi0-0=os;...``), so they travel with the VM; other VMs are known by
Hyper-V's id and their disks by controller location (``scsi0-1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from agent.config import NetworkConfig
from agent.hosts import changelog, vmlock
from agent.hosts.base import (
    Cut,
    DiskRecord,
    FrozenDisk,
    HostBackend,
    HostInventory,
    NetworkRecord,
    NicRecord,
    RegisteredVm,
    StorageRecord,
    VmRecord,
    VmWriter,
)
from agent.hosts.cutstate import Taint
from agent.hosts.hyperv_api import (
    HvCheckpoint,
    HvDrive,
    HvNic,
    HvVhd,
    HvVm,
    HyperVApi,
    NewVm,
    QuiesceFailed,
    RctUnavailable,
    check_guid,
    notes_fields,
    parse_slot,
    slot_name,
)
from agent.hosts.vmspec import VM_STATES, DiskSpec, VmSpec
from sitepair import pki
from sitepair.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SitepairError,
)
from sitepair.fsutil import atomic_write
from sitepair.vdisk import coalesce

log = logging.getLogger("sitepair.agent.hyperv")

STATE_VERSION = 1
CHECKPOINT_PREFIX = "sitepair-"
TRACKING_DIR = ".sitepair-tracking"
#: The contract's change-log block: ``changed`` ranges are aligned to it.
BLOCK = changelog.BLOCK_SIZE
#: Hyper-V state names in the contract's words (others are reported lower-cased).
_STATES = {"Running": "running", "Off": "off", "Paused": "paused", "Saved": "saved"}
#: (current, wanted) -> the power actions that get there.
_POWER_PLAN: dict[tuple[str, str], tuple[str, ...]] = {
    ("off", "running"): ("start",),
    ("saved", "running"): ("start",),
    ("running", "paused"): ("suspend",),
    ("paused", "running"): ("resume",),
    ("running", "off"): ("stop",),
    # A paused guest cannot shut down, and a saved one is not running: both are turned off.
    ("paused", "off"): ("turn-off",),
    ("saved", "off"): ("turn-off",),
}


# -- what sitepair keeps per VM ----------------------------------------------------------------
@dataclasses.dataclass
class _CutDisk:
    disk_id: str
    slot: str
    virtual_size: int
    format: str
    #: Aligned, coalesced ranges; ``None`` when the cut is untrusted.
    changed: list[tuple[int, int]] | None


@dataclasses.dataclass
class _CutRecord:
    cut_id: str
    seq: int
    checkpoint_id: str
    taken_at: float
    app_consistent: bool
    untrusted_reason: str
    disks: list[_CutDisk]
    released: bool = False
    #: The checkpoint was deleted outside sitepair: the cut can no longer be read or released.
    lost: bool = False


@dataclasses.dataclass
class _State:
    seq: int = 0
    #: slot -> RCT id of the baseline (the last released cut's reference point).
    baseline_rct: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Reference points sitepair made, oldest first; the last one holds the baseline.
    reference_points: list[str] = dataclasses.field(default_factory=list)
    cuts: list[_CutRecord] = dataclasses.field(default_factory=list)
    taints: list[Taint] = dataclasses.field(default_factory=list)
    #: Journal of a take_cut: {"cut_id", "name"}.
    pending: dict[str, str] | None = None
    #: Journal of a release_cut: {"cut_id", "known": reference points before the conversion}.
    releasing: dict[str, Any] | None = None

    def find(self, cut_id: str) -> _CutRecord | None:
        return next((c for c in self.cuts if c.cut_id == cut_id), None)

    def outstanding(self) -> list[_CutRecord]:
        return sorted((c for c in self.cuts if not c.released), key=lambda c: c.seq)

    def add_taint(self, seq: int, reason: str) -> None:
        if all(t.reason != reason for t in self.taints):
            self.taints.append(Taint(seq, reason))

    def to_json(self) -> bytes:
        doc = {"version": STATE_VERSION, **dataclasses.asdict(self)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> _State:
        try:
            doc = json.loads(data)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            return cls(
                seq=int(doc["seq"]),
                baseline_rct={str(k): str(v) for k, v in doc["baseline_rct"].items()},
                reference_points=[str(r) for r in doc["reference_points"]],
                cuts=[_cut_from(c) for c in doc["cuts"]],
                taints=[Taint(int(t["seq"]), str(t["reason"])) for t in doc["taints"]],
                pending=doc.get("pending"),
                releasing=doc.get("releasing"),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(
                f"{where} is damaged: {exc}",
                hint="move it aside: sitepair then forgets its checkpoints of this VM (it "
                "removes those named sitepair-*) and the next cycle needs a resync",
            ) from exc


def _cut_from(c: dict[str, Any]) -> _CutRecord:
    return _CutRecord(
        cut_id=str(c["cut_id"]),
        seq=int(c["seq"]),
        checkpoint_id=str(c["checkpoint_id"]),
        taken_at=float(c["taken_at"]),
        app_consistent=bool(c["app_consistent"]),
        untrusted_reason=str(c["untrusted_reason"]),
        disks=[
            _CutDisk(
                disk_id=str(d["disk_id"]),
                slot=str(d["slot"]),
                virtual_size=int(d["virtual_size"]),
                format=str(d["format"]),
                changed=None
                if d["changed"] is None
                else [(int(o), int(n)) for o, n in d["changed"]],
            )
            for d in c["disks"]
        ],
        released=bool(c.get("released", False)),
        lost=bool(c.get("lost", False)),
    )


def align_ranges(ranges: list[tuple[int, int]], virtual_size: int) -> list[tuple[int, int]]:
    """Widen ranges to whole :data:`BLOCK` blocks, clip them to the disk, sort and coalesce."""
    blocks = []
    for off, length in ranges:
        if length <= 0 or off >= virtual_size:
            continue
        start = off // BLOCK * BLOCK
        end = min(-(-(off + length) // BLOCK) * BLOCK, virtual_size)
        blocks.append((start, end - start))
    return list(coalesce(sorted(blocks)))


class HyperVBackend(HostBackend):
    """Hyper-V through ``api``; see the module docstring.

    ``vm_root`` holds sitepair's tracking state and the folders of the VMs it registers
    (:meth:`vm_dir`); ``storage`` and ``networks`` come from the agent's configuration."""

    kind = "hyperv"

    def __init__(
        self,
        vm_root: Path,
        api: HyperVApi,
        *,
        storage: tuple[tuple[str, Path], ...] = (),
        networks: tuple[NetworkConfig, ...] = (),
        extra_volumes: tuple[Path, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vm_root = Path(vm_root)
        self.api = api
        self.storage = storage
        self.networks = networks
        self._extra_volumes = extra_volumes
        self._clock = clock

    # -- finding VMs ------------------------------------------------------------------------
    def vm_dir(self, name: str) -> Path:
        """The folder sitepair gives a VM it registers (configuration and new disk layers)."""
        return self.vm_root / pki.check_identifier(name, "VM name")

    def _resolve(self, ref: str) -> HvVm:
        """A VM by sitepair's id, Hyper-V's id or name (a name must be unique)."""
        with contextlib.suppress(NotFound, InvalidArgument):
            return self.api.get_vm(check_guid(ref, "VM id"))  # the common case: Hyper-V's id
        vms = self.api.list_vms()
        low = ref.lower()
        for vm in vms:
            if low in (vm.id, _sitepair_id(vm).lower()):
                return vm
        named = [vm for vm in vms if vm.name == ref]
        if len(named) > 1:
            raise InvalidArgument(
                f"{len(named)} Hyper-V VMs are named {ref!r} on this host",
                hint="refer to the VM by its id: " + ", ".join(v.id for v in named),
            )
        if named:
            return named[0]
        raise NotFound(
            f"no VM {ref!r} on this Hyper-V host",
            hint="list the VMs with Get-VM; a VM is known by its Hyper-V id, its name, or the "
            "sitepair id in its Notes",
        )

    def find_vm(self, ref: str) -> tuple[Path, VmSpec]:
        """A VM by id or name: its configuration folder and its description (disk chains base
        first, absolute paths)."""
        vm = self._resolve(ref)
        names = _disk_names(vm)
        disks = tuple(
            DiskSpec(id=names.get(d.slot, d.slot), chain=tuple(str(p) for p in self._chain(d.path)))
            for d in vm.drives
        )
        spec = VmSpec(
            id=_sitepair_id(vm),
            name=vm.name,
            generation=vm.generation,
            cpu=vm.cpu_count,
            memory_mb=vm.memory_mb,
            state=_state_name(vm.state),
            nics=_nics(vm),
            disks=disks,
        )
        return Path(vm.path), spec

    def disk_chains(self, vm_ref: str) -> dict[str, list[Path]]:
        """Each disk's chain as absolute paths, base first."""
        _folder, spec = self.find_vm(vm_ref)
        return {d.id: [Path(p) for p in d.chain] for d in spec.disks}

    def _chain(self, path: str) -> list[Path]:
        return [Path(v.path or path) for v in reversed(self.api.vhd_chain(path))]

    # -- inventory --------------------------------------------------------------------------
    def _storage_class(self, path: Path) -> str:
        for name, folder in self.storage:
            try:
                path.relative_to(folder)
                return name
            except ValueError:
                continue
        return ""

    def _record(self, vm: HvVm, vhds: dict[str, HvVhd] | None = None) -> VmRecord:
        if vhds is None:
            vhds = {v.path.lower(): v for v in self.api.vhd_info([d.path for d in vm.drives])}
        names = _disk_names(vm)
        disks = []
        for d in vm.drives:
            info = vhds.get(d.path.lower())
            disks.append(
                DiskRecord(
                    id=names.get(d.slot, d.slot),
                    path=Path(d.path),
                    format=info.format if info else Path(d.path).suffix.lstrip(".").lower(),
                    virtual_size=info.virtual_size if info else 0,
                    file_size=info.file_size if info else 0,
                    storage_class=self._storage_class(Path(d.path)),
                )
            )
        return VmRecord(
            id=_sitepair_id(vm),
            name=vm.name,
            generation=vm.generation,
            cpu_count=vm.cpu_count,
            memory_mb=vm.memory_mb,
            state=_state_name(vm.state),
            disks=tuple(disks),
            nics=_nics(vm),
        )

    def inventory(self) -> HostInventory:
        vms = self.api.list_vms()
        paths = [d.path for vm in vms for d in vm.drives]
        vhds = {v.path.lower(): v for v in self.api.vhd_info(paths)} if paths else {}
        subnets = {n.name: n.subnets for n in self.networks}
        networks = tuple(
            NetworkRecord(name, subnets.get(name, ())) for name in self.api.list_switches()
        )
        storage = []
        for name, path in self.storage:
            total = free = 0
            with contextlib.suppress(OSError):
                usage = psutil.disk_usage(str(path))
                total, free = usage.total, usage.free
            storage.append(StorageRecord(name=name, path=path, total_bytes=total, free_bytes=free))
        return HostInventory(
            vms=tuple(self._record(vm, vhds) for vm in vms),
            networks=networks,
            storage=tuple(storage),
        )

    def volumes(self) -> list[Path]:
        return [self.vm_root, *(p for _, p in self.storage), *self._extra_volumes]

    # -- power and NICs ---------------------------------------------------------------------
    def set_vm_state(self, vm_ref: str, state: str) -> VmRecord:
        """Start (``Start-VM``), pause (``Suspend-VM``), resume, shut down (``Stop-VM``: the
        guest shuts down through its integration service) or, for a paused or saved VM, turn
        off."""
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r}; use one of {', '.join(VM_STATES)}")
        vm = self._resolve(vm_ref)
        current = _state_name(vm.state)
        if current != state:
            plan = _POWER_PLAN.get((current, state))
            if plan is None:
                raise FailedPrecondition(
                    f"VM {vm.name} is {current} in Hyper-V; it cannot become {state}",
                    hint="start it first"
                    if state == "paused"
                    else "wait until Get-VM shows it Running, Off, Paused or Saved, then retry",
                )
            for action in plan:
                self.api.set_power(vm.id, action)
            vm = self.api.get_vm(vm.id)
        return self._record(vm)

    def connect_nic(self, vm_ref: str, nic: str, network: str) -> VmRecord:
        """Connect a NIC to a virtual switch (the VM network); "" disconnects it."""
        vm = self._resolve(vm_ref)
        names = [n.name for n in vm.nics]
        if nic not in names:
            raise NotFound(f"VM {vm.name} has no NIC {nic!r} (NICs: {', '.join(names) or 'none'})")
        if network:
            switches = self.api.list_switches()
            if network not in switches:
                raise InvalidArgument(
                    f"VM {vm.name}: this host has no virtual switch {network!r} "
                    f"(it offers: {', '.join(switches) or 'none'})",
                    hint="map the VM network to one of these switches, or create it with "
                    "New-VMSwitch",
                )
        self.api.connect_nic(vm.id, nic, network)
        return self._record(self.api.get_vm(vm.id))

    def open_writer(self, vm_ref: str) -> VmWriter:
        """Refused: on Hyper-V the guest writes its disks, and nothing else may."""
        vm = self._resolve(vm_ref)
        raise FailedPrecondition(
            f"VM {vm.name} runs on Hyper-V: its guest writes its disks and sitepair cannot "
            "write into them",
            hint="run the workload inside the guest; simulated workloads need the directory "
            "backend",
        )

    # -- registering VMs (failover) ---------------------------------------------------------
    # Tested on Linux only, against FakeHyperVApi (tests/hosts/fake_hyperv.py); never run
    # against a real Hyper-V host.
    def vm_id_of(self, name: str) -> str | None:
        """Sitepair's id of the VM called ``name`` (one ``Get-VM``; the generic version would
        also ask ``Get-VHD`` about every disk of the host)."""
        return next((_sitepair_id(vm) for vm in self.api.list_vms() if vm.name == name), None)

    def vm_state(self, vm_ref: str) -> str:
        """The VM's state by sitepair's id, Hyper-V's id or name, from Hyper-V itself."""
        return _state_name(self._resolve(vm_ref).state)

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
        """Make a Hyper-V VM over existing disk chains (a failover of a replica, a test
        failover), as the directory backend does: each disk gets a new differencing child
        (``New-VHD -Differencing``) in ``<vm root>/<name>/disks/``, attached in its place, so the
        given layers are never written by the VM. Disks whose id names a controller location
        (``scsi0-1``) are attached there, the others in order; the VM's Notes keep sitepair's
        VM id and disk names.

        With ``replace``, a VM of that name and sitepair id (the fenced old primary, which must
        be off) is removed from Hyper-V first (``Remove-VM`` leaves its files), and its
        definition as ``Get-VM`` gave it is kept in ``previous`` (JSON) so that
        :meth:`unregister_vm` can make it again; sitepair's tracking state of it is dropped, as
        its disks' RCT history cannot be trusted across the replace. If anything fails half-way,
        whatever was made is undone and the replaced VM is made again.

        Tested on Linux only, against ``FakeHyperVApi``; not yet run on a real Hyper-V host."""
        if state not in VM_STATES:
            raise InvalidArgument(
                f"unknown VM state {state!r}", hint=f"use one of {', '.join(VM_STATES)}"
            )
        _check_shape(
            name, vm_id, [d for d, _c in disks], cpu=cpu, memory_mb=memory_mb, generation=generation
        )
        folder = self.vm_dir(name)
        existing = [vm for vm in self.api.list_vms() if vm.name == name]
        for old in existing:
            if not replace or _sitepair_id(old) != vm_id:
                raise AlreadyExists(
                    f"a VM named {name!r} already exists on this Hyper-V host",
                    hint="rename or remove that VM in Hyper-V Manager, or fail over under "
                    "another name",
                )
        if len(existing) > 1:
            raise FailedPrecondition(
                f"{len(existing)} Hyper-V VMs are named {name!r} and carry sitepair id {vm_id}; "
                "only one can be replaced and brought back",
                hint="remove the extra ones in Hyper-V Manager: "
                + ", ".join(v.id for v in existing),
            )
        for old in existing:
            if _state_name(old.state) != "off":
                raise FailedPrecondition(
                    f"VM {name} ({old.id}) is {_state_name(old.state)}; it must be off before a "
                    "failover replaces it (its memory state would be lost for good)",
                    hint="fence the old primary (shut it down) first, then fail over again",
                )
        slots = _assign_slots([d for d, _c in disks], generation)
        infos = []
        for disk_id, chain in disks:
            if not chain:
                raise InvalidArgument(f"disk {disk_id} of VM {name}: the chain is empty")
            top = str(Path(chain[-1]))
            found = self.api.vhd_info([top])
            if not found:
                raise NotFound(
                    f"disk {disk_id} of VM {name}: {top} is not a virtual disk Hyper-V can open",
                    hint="check that the file exists and the agent's account may read it",
                )
            infos.append(found[0])
        stamp = uuid.uuid4().hex[:8]
        children = [
            folder / "disks" / f"{disk_id}-{stamp}.{info.format}"
            for (disk_id, _c), info in zip(disks, infos, strict=True)
        ]
        registered = RegisteredVm(
            vm_id=vm_id,
            name=name,
            location=str(folder),
            created=tuple(str(c) for c in children),
            previous=_vm_to_json(existing[0]) if existing else None,
        )
        renamed = {slot: disk_id for (disk_id, _c), slot in zip(disks, slots, strict=True)}
        notes = [f"sitepair-vm-id: {vm_id}"]
        if any(slot != disk_id for slot, disk_id in renamed.items()):
            notes.append("sitepair-disks: " + ";".join(f"{s}={d}" for s, d in renamed.items()))
        try:
            for old in existing:  # only once the new VM's disks are known to be usable
                self._drop(old)
            (folder / "disks").mkdir(parents=True, exist_ok=True)
            for (_d, chain), child in zip(disks, children, strict=True):
                self.api.new_differencing_disk(str(child), str(Path(chain[-1])))
            vm = self.api.new_vm(
                NewVm(
                    name=name,
                    folder=str(folder),
                    generation=generation,
                    cpu_count=cpu,
                    memory_mb=memory_mb,
                    notes="\n".join(notes),
                    drives=tuple((s, str(c)) for s, c in zip(slots, children, strict=True)),
                    nics=tuple(nics or ()),
                )
            )
            if state != "off":
                self.set_vm_state(vm.id, "running")
                if state == "paused":
                    self.set_vm_state(vm.id, "paused")
        except (SitepairError, OSError) as exc:
            # Undo whatever was made (a half-made VM Hyper-V left, the new children: sitepair's
            # own files, written by nothing yet) and bring the replaced VM back.
            try:
                self.unregister_vm(registered)
            except (SitepairError, OSError) as undo:
                log.error(
                    "a failed registration could not be undone",
                    extra={"fields": {"vm": name, "error": str(undo)}},
                )
                exc.add_note(f"undoing the registration failed too: {undo}")
            raise
        return registered

    def unregister_vm(self, registered: RegisteredVm) -> None:
        """Undo :meth:`register_vm` exactly: the VM it made is turned off and removed from
        Hyper-V (``Remove-VM``) with sitepair's tracking state of it; the differencing children
        it made are deleted, with any layer Hyper-V added above them in the VM's folder (the
        AVHDX of a checkpoint taken since); folders left empty in the VM's folder go; and the VM
        it replaced, if any, is made again with ``New-VM`` from its recorded definition: same
        name, Notes (with its sitepair id, so the broker still knows it by the same id),
        generation, CPU, memory, drives at the same controller locations over the same files,
        NICs on the same switches. Its disks are never written.

        The VM made again is a new VM to Hyper-V: a new Hyper-V id, no checkpoints or RCT
        reference points, NICs with new dynamic MAC addresses, and only the settings ``Get-VM``
        reported (see ``docs/hyperv-backend.md``). sitepair's tracking state of it is dropped,
        so its next cut is untrusted and the next cycle is a checksum resync.

        Idempotent: the new VM is told from the one brought back by its drives (they use the
        children this registration made), and a VM already brought back is not made twice.
        Tested on Linux only, against ``FakeHyperVApi``; not yet run on a real Hyper-V host."""
        previous = _vm_from_json(registered.previous) if registered.previous else None
        created = {c.lower() for c in registered.created}
        folder = Path(registered.location)
        extra: list[Path] = []
        for vm in self.api.list_vms():
            if vm.name != registered.name or _sitepair_id(vm) != registered.vm_id:
                continue
            if previous is not None and _same_drives(vm, previous):
                continue  # the replaced VM, already brought back
            above = self._layers_above(vm, created)
            if above is None:
                continue  # another VM of that name and id: not this registration's
            extra.extend(p for p in above if p.is_relative_to(folder))
            self._drop(vm)
        for path in [*map(Path, registered.created), *extra]:
            path.unlink(missing_ok=True)
        _prune_empty(folder)
        if previous is not None:
            self._restore(previous)

    def _layers_above(self, vm: HvVm, created: set[str]) -> list[Path] | None:
        """The layers of ``vm``'s disks above one of ``created`` (checkpoints' AVHDX), or
        ``None`` if none of its disks is over one of ``created``: another VM. A VM of that name
        and id with no drives at all is what a ``New-VM`` that failed half-way leaves: ours."""
        if not vm.drives:
            return []
        found = False
        above: list[Path] = []
        for drive in vm.drives:
            try:
                chain = self._chain(drive.path)
            except (SitepairError, OSError):
                chain = [Path(drive.path)]
            names = [str(p).lower() for p in chain]
            hits = [i for i, p in enumerate(names) if p in created]
            if hits:
                found = True
                above.extend(chain[hits[0] + 1 :])
        return above if found else None

    def _drop(self, vm: HvVm) -> None:
        """Remove ``vm`` from Hyper-V (turned off first; its files stay) and sitepair's tracking
        state of it (before, so that a failure leaves untrusted tracking, never stale)."""
        shutil.rmtree(self._tracking_dir(vm.id), ignore_errors=True)
        self.api.remove_vm(vm.id)
        shutil.rmtree(self._tracking_dir(vm.id), ignore_errors=True)

    def _restore(self, previous: HvVm) -> None:
        """Make the VM ``previous`` describes again, unless it is already there."""
        sitepair_id = _sitepair_id(previous)
        for vm in self.api.list_vms():
            if (
                vm.name == previous.name
                and _sitepair_id(vm) == sitepair_id
                and _same_drives(vm, previous)
            ):
                return
        notes = previous.notes
        if "vm-id" not in notes_fields(notes):
            # Hyper-V gives the new VM a new id: the Notes keep the one the broker knows.
            notes = "\n".join(
                x for x in (notes.rstrip("\n"), f"sitepair-vm-id: {sitepair_id}") if x
            )
        vm = self.api.new_vm(
            NewVm(
                name=previous.name,
                folder=previous.path,
                generation=previous.generation,
                cpu_count=previous.cpu_count,
                memory_mb=previous.memory_mb,
                notes=notes,
                drives=tuple((d.slot, d.path) for d in previous.drives),
                nics=tuple((n.name, n.switch) for n in previous.nics),
            )
        )
        shutil.rmtree(self._tracking_dir(vm.id), ignore_errors=True)
        log.warning(
            "the VM a failover replaced was made again; its next cycle is a resync",
            extra={"fields": {"vm": vm.name, "hyperv_id": vm.id, "was": previous.id}},
        )

    def remove_vm(self, vm_ref: str) -> Path:
        """Remove a VM sitepair registered from Hyper-V (turned off first), sitepair's tracking
        of it, and the folder sitepair gave it; disks elsewhere (a replica's layers) are left
        alone. A VM sitepair did not register is refused: nothing of it is touched."""
        vm = self._resolve(vm_ref)
        if "vm-id" not in notes_fields(vm.notes):
            raise FailedPrecondition(
                f"VM {vm.name} ({vm.id}) was not registered by sitepair; sitepair removes only "
                "the VMs it made (their Notes carry sitepair-vm-id)",
                hint="remove it in Hyper-V Manager if it must go",
            )
        self.api.remove_vm(vm.id)
        shutil.rmtree(self._tracking_dir(vm.id), ignore_errors=True)
        try:
            folder = self.vm_dir(vm.name)
        except InvalidArgument:
            return Path(vm.path)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        return folder

    # -- cuts -------------------------------------------------------------------------------
    def _tracking_dir(self, hv_id: str) -> Path:
        return self.vm_root / TRACKING_DIR / hv_id

    def _load(self, hv_id: str) -> _State:
        path = self._tracking_dir(hv_id) / "cuts.json"
        try:
            return _State.from_json(path.read_bytes(), path)
        except FileNotFoundError:
            return _State()

    def _save(self, hv_id: str, state: _State) -> None:
        atomic_write(self._tracking_dir(hv_id) / "cuts.json", state.to_json())

    @contextlib.contextmanager
    def _locked(self, vm_ref: str) -> Iterator[tuple[HvVm, _State]]:
        vm = self._resolve(vm_ref)
        folder = self._tracking_dir(vm.id)
        folder.mkdir(parents=True, exist_ok=True)
        with vmlock.operations_lock(folder):
            state = self._load(vm.id)
            self._recover(vm, state)
            yield vm, state

    def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Cut:
        with self._locked(vm_ref) as (vm, state):
            seq = state.seq + 1
            cut_id = str(uuid.uuid4())
            name = CHECKPOINT_PREFIX + cut_id
            state.seq = seq
            state.pending = {"cut_id": cut_id, "name": name}
            self._save(vm.id, state)
            taken_at = self._clock()
            quiesced = app_consistent
            try:
                try:
                    cp = self.api.create_recovery_checkpoint(
                        vm.id, name, app_consistent=app_consistent
                    )
                except QuiesceFailed as exc:
                    log.warning(
                        "the guest could not be quiesced: the cut is crash-consistent only",
                        extra={"fields": {"vm": vm.name, "error": str(exc)}},
                    )
                    quiesced = False
                    self._remove_named(vm, name)  # a checkpoint the failed attempt left
                    cp = self.api.create_recovery_checkpoint(vm.id, name, app_consistent=False)
                record = self._record_cut(
                    vm,
                    state,
                    cp,
                    cut_id=cut_id,
                    seq=seq,
                    taken_at=taken_at,
                    app_consistent=quiesced,
                )
            except SitepairError:
                # No cut: remove the checkpoint this attempt made (a reason found on the way,
                # such as a lost RCT id, is kept).
                with contextlib.suppress(SitepairError):
                    self._recover(vm, state)
                raise
            state.cuts.append(record)
            state.pending = None
            self._save(vm.id, state)
            view = self._view(vm, record, [cp])
            assert view is not None
            return view

    def outstanding_cut(self, vm_ref: str) -> Cut | None:
        with self._locked(vm_ref) as (vm, state):
            outstanding = state.outstanding()
            if not outstanding:
                return None
            checkpoints = self.api.list_checkpoints(vm.id)
            for record in reversed(outstanding):
                view = self._view(vm, record, checkpoints)
                if view is not None:
                    return view
                self._lose(vm, state, record)
            return None

    def release_cut(self, vm_ref: str, cut_id: str) -> None:
        with self._locked(vm_ref) as (vm, state):
            record = state.find(cut_id)
            if record is None:
                raise NotFound(
                    f"VM {vm.name} has no cut {cut_id}",
                    hint="the cut was not taken on this host or was forgotten; the next "
                    "cycle takes a new one",
                )
            if record.released:
                return
            known = [rp.id for rp in self.api.list_reference_points(vm.id)]
            state.releasing = {"cut_id": cut_id, "known": known}
            self._save(vm.id, state)
            self._release_run(vm, state)

    def reset_tracking(self, vm_ref: str, cut_id: str) -> None:
        """Trust tracking again from ``cut_id``. Its RCT ids exist only once it is released (a
        checkpoint has none until it becomes a reference point): a cut taken before that
        covers everything since the previous baseline (more than needed, never less), or is
        untrusted if there is none."""
        with self._locked(vm_ref) as (vm, state):
            record = state.find(cut_id)
            if record is None:
                raise NotFound(
                    f"VM {vm.name} has no cut {cut_id}",
                    hint="the cut was not taken on this host or was forgotten; the next "
                    "cycle takes a new one",
                )
            state.taints = [t for t in state.taints if t.seq > record.seq]
            self._save(vm.id, state)

    # -- internals ------------------------------------------------------------------------
    def _remove_named(self, vm: HvVm, name: str) -> None:
        for cp in self.api.list_checkpoints(vm.id):
            if cp.name == name:
                self.api.remove_checkpoint(vm.id, cp.id)

    def _record_cut(
        self,
        vm: HvVm,
        state: _State,
        cp: HvCheckpoint,
        *,
        cut_id: str,
        seq: int,
        taken_at: float,
        app_consistent: bool,
    ) -> _CutRecord:
        """Describe the new checkpoint and ask RCT what changed since the baseline."""
        names = _disk_names(vm)
        infos = {v.path.lower(): v for v in self.api.vhd_info([d.path for d in cp.drives])}
        disks: list[_CutDisk] = []
        reasons: list[str] = []
        for drive in cp.drives:
            disk_id = names.get(drive.slot, drive.slot)
            info = infos.get(drive.path.lower())
            if info is None:
                raise FailedPrecondition(
                    f"VM {vm.name} disk {disk_id}: Get-VHD cannot read {drive.path}, the layer "
                    f"checkpoint {cp.name} froze",
                    hint="check that the file exists and the agent's account may read it; the "
                    "checkpoint is removed and the next cycle retries",
                )
            changed: list[tuple[int, int]] | None = None
            where = f"VM {vm.name} disk {disk_id} ({drive.path})"
            rct = state.baseline_rct.get(drive.slot)
            if not rct:
                reasons.append(
                    f"{where}: no RCT reference point of this disk from sitepair yet (the first "
                    "cut of the VM, or a disk added since the last cycle), so Hyper-V cannot say "
                    "what changed"
                )
            elif not state.taints:
                try:
                    changed = self._changes(drive.path, rct, info.virtual_size)
                except RctUnavailable as exc:
                    state.add_taint(
                        seq,
                        f"{where}: Hyper-V no longer knows the RCT id {rct} of the last cycle "
                        f"(the VM moved or was imported, or the disk was edited or merged "
                        f"outside Hyper-V): {exc.message}",
                    )
            disks.append(
                _CutDisk(
                    disk_id=disk_id,
                    slot=drive.slot,
                    virtual_size=info.virtual_size,
                    format=info.format,
                    changed=changed,
                )
            )
        reason = "; ".join([t.reason for t in state.taints] + reasons)
        if reason:
            for d in disks:
                d.changed = None
        return _CutRecord(
            cut_id=cut_id,
            seq=seq,
            checkpoint_id=cp.id,
            taken_at=taken_at,
            app_consistent=app_consistent,
            untrusted_reason=reason,
            disks=disks,
        )

    def _changes(self, path: str, rct: str, virtual_size: int) -> list[tuple[int, int]]:
        """GetVirtualDiskChanges over the whole disk (Hyper-V may process less than asked per
        call: ask again from where it stopped)."""
        ranges: list[tuple[int, int]] = []
        offset = 0
        while offset < virtual_size:
            answer = self.api.virtual_disk_changes(path, rct, offset, virtual_size - offset)
            if answer.processed <= 0:
                raise FailedPrecondition(
                    f"GetVirtualDiskChanges of {path} processed nothing at offset {offset} "
                    f"of {virtual_size} bytes",
                    hint="the next cycle retries; if it persists, report it with the agent log",
                )
            ranges.extend(answer.ranges)
            offset += answer.processed
        return align_ranges(ranges, virtual_size)

    def _view(self, vm: HvVm, record: _CutRecord, checkpoints: list[HvCheckpoint]) -> Cut | None:
        """The cut as the contract describes it, or ``None`` if its checkpoint is gone. Chains
        are read from Hyper-V each time: releasing an older cut merges layers below."""
        cp = next((c for c in checkpoints if c.id == record.checkpoint_id), None)
        if cp is None:
            return None
        frozen = {d.slot: d.path for d in cp.drives}
        disks = []
        for cd in record.disks:
            if cd.slot not in frozen:
                raise FailedPrecondition(
                    f"VM {vm.name} disk {cd.disk_id}: checkpoint {cp.name} no longer has a "
                    f"drive at {cd.slot}",
                    hint="delete the checkpoint in Hyper-V Manager; the next cut covers its "
                    "changes",
                )
            disks.append(
                FrozenDisk(
                    disk_id=cd.disk_id,
                    chain=tuple(self._chain(frozen[cd.slot])),
                    virtual_size=cd.virtual_size,
                    format=cd.format,
                    changed=None if cd.changed is None else tuple(cd.changed),
                )
            )
        return Cut(
            vm_id=_sitepair_id(vm),
            cut_id=record.cut_id,
            taken_at=record.taken_at,
            app_consistent=record.app_consistent,
            disks=tuple(disks),
            untrusted_reason=record.untrusted_reason,
        )

    def _lose(self, vm: HvVm, state: _State, record: _CutRecord) -> None:
        """The cut's checkpoint was deleted outside sitepair (Hyper-V merged it): the cut is
        gone, but RCT still tracks every write since the baseline, so nothing is lost."""
        log.warning(
            "a cut's recovery checkpoint was deleted outside sitepair; the next cut covers it",
            extra={"fields": {"vm": vm.name, "cut": record.cut_id}},
        )
        record.lost = record.released = True
        self._save(vm.id, state)

    def _release_run(self, vm: HvVm, state: _State) -> None:
        """Carry out (or resume) the journalled release: remove the older outstanding
        checkpoints, convert this one to a reference point, move the baseline to it, destroy
        sitepair's older reference points."""
        journal = state.releasing
        assert journal is not None
        record = state.find(str(journal["cut_id"]))
        if record is None:  # pragma: no cover - the journal names a recorded cut
            state.releasing = None
            self._save(vm.id, state)
            return
        checkpoints = {cp.id: cp for cp in self.api.list_checkpoints(vm.id)}
        for older in state.outstanding():
            if older.seq >= record.seq:
                continue
            if older.checkpoint_id in checkpoints:
                self.api.remove_checkpoint(vm.id, older.checkpoint_id)
            older.released = True
            self._save(vm.id, state)
        reference = None
        if not record.lost and record.checkpoint_id in checkpoints:
            journal["converting"] = True
            self._save(vm.id, state)
            reference = self.api.convert_to_reference_point(vm.id, record.checkpoint_id)
        elif journal.get("converting"):
            # The conversion was under way when the agent stopped: its reference point is the
            # one that did not exist before (only if there is exactly one such).
            known = set(journal.get("known", []))
            fresh = [rp for rp in self.api.list_reference_points(vm.id) if rp.id not in known]
            reference = fresh[0] if len(fresh) == 1 else None
        if reference is not None:
            state.baseline_rct = reference.rct()
            state.reference_points.append(reference.id)
        else:
            log.warning(
                "the cut's checkpoint is gone: the baseline stays at the previous cycle, so "
                "the next cut covers more than needed",
                extra={"fields": {"vm": vm.name, "cut": record.cut_id}},
            )
        record.released = True
        state.releasing = None
        keep_released = sorted((c for c in state.cuts if c.released), key=lambda c: c.seq)[-32:]
        state.cuts = [c for c in state.cuts if not c.released or c in keep_released]
        self._save(vm.id, state)
        for old in state.reference_points[:-1]:
            try:
                self.api.remove_reference_point(vm.id, old)
            except SitepairError as exc:
                log.warning(
                    "an old reference point could not be destroyed; retried at the next release",
                    extra={"fields": {"vm": vm.name, "reference_point": old, "error": str(exc)}},
                )
                continue
            state.reference_points.remove(old)
            self._save(vm.id, state)

    def _recover(self, vm: HvVm, state: _State) -> None:
        """Undo a take_cut and finish a release_cut that a dead process left half done. With a
        journal to finish, or no state at all (a first cut, or a state file that was lost),
        sitepair's checkpoints that no outstanding cut knows of are removed."""
        if state.pending is None and state.releasing is None and state.seq > 0:
            return
        known = {c.checkpoint_id for c in state.outstanding()}
        for cp in self.api.list_checkpoints(vm.id):
            if cp.name.startswith(CHECKPOINT_PREFIX) and cp.id not in known:
                log.warning(
                    "removing a checkpoint sitepair left behind",
                    extra={"fields": {"vm": vm.name, "checkpoint": cp.name}},
                )
                self.api.remove_checkpoint(vm.id, cp.id)
        if state.pending is not None:
            state.pending = None
            self._save(vm.id, state)
        if state.releasing is not None:
            self._release_run(vm, state)


# -- helpers -----------------------------------------------------------------------------------
def _sitepair_id(vm: HvVm) -> str:
    return notes_fields(vm.notes).get("vm-id") or vm.id


def _disk_names(vm: HvVm) -> dict[str, str]:
    """slot -> disk id, as the Notes of a VM sitepair registered name them (else the slot)."""
    raw = notes_fields(vm.notes).get("disks", "")
    out = {}
    for item in raw.split(";"):
        slot, sep, disk_id = item.strip().partition("=")
        if sep and slot and disk_id:
            out[slot] = disk_id
    return out


def _state_name(hv_state: str) -> str:
    return _STATES.get(hv_state, hv_state.lower())


def _nics(vm: HvVm) -> tuple[NicRecord, ...]:
    return tuple(NicRecord(name=n.name, network=n.switch, mac=n.mac) for n in vm.nics)


def _vm_to_json(vm: HvVm) -> str:
    """A VM's definition as ``Get-VM`` gave it, as JSON (kept in a failover record)."""
    return json.dumps(dataclasses.asdict(vm), sort_keys=True)


def _vm_from_json(text: str) -> HvVm:
    try:
        doc = json.loads(text)
        return HvVm(
            id=str(doc["id"]),
            name=str(doc["name"]),
            generation=int(doc["generation"]),
            cpu_count=int(doc["cpu_count"]),
            memory_mb=int(doc["memory_mb"]),
            state=str(doc["state"]),
            path=str(doc["path"]),
            notes=str(doc["notes"]),
            drives=tuple(HvDrive(slot=str(d["slot"]), path=str(d["path"])) for d in doc["drives"]),
            nics=tuple(
                HvNic(name=str(n["name"]), switch=str(n["switch"]), mac=str(n["mac"]))
                for n in doc["nics"]
            ),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FailedPrecondition(
            f"the definition of the VM a failover replaced cannot be read: {exc}",
            hint="make the old VM again by hand (New-VM over its disk files); the failover "
            "record in the replica's state.json names them under previous_vm",
        ) from exc


def _same_drives(a: HvVm, b: HvVm) -> bool:
    return {(d.slot, d.path.lower()) for d in a.drives} == {
        (d.slot, d.path.lower()) for d in b.drives
    }


def _prune_empty(folder: Path) -> None:
    """Remove the empty folders in ``folder`` and ``folder`` itself if it ends up empty."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _check_shape(
    name: str, vm_id: str, disk_ids: list[str], *, cpu: int, memory_mb: int, generation: int
) -> None:
    """What Hyper-V would refuse half-way through making the VM, refused before anything is made."""
    pki.check_identifier(name, "VM name")
    if not vm_id or vm_id != vm_id.strip() or any(c in vm_id for c in "\r\n"):
        raise InvalidArgument(
            f"VM {name}: sitepair VM id {vm_id!r} cannot be kept in the VM's Notes",
            hint="use the VM id the broker assigned",
        )
    if generation not in (1, 2):
        raise InvalidArgument(
            f"VM {name}: generation {generation} does not exist in Hyper-V", hint="use 1 or 2"
        )
    if cpu < 1:
        raise InvalidArgument(f"VM {name}: {cpu} virtual processors", hint="give it at least 1")
    if memory_mb < 32 or memory_mb % 2:
        raise InvalidArgument(
            f"VM {name}: {memory_mb} MB of memory; Hyper-V needs an even number of MB, at least 32",
            hint="round the VM's memory up to an even number of MB",
        )
    if not disk_ids:
        raise InvalidArgument(
            f"VM {name}: no disks; a failover makes a VM of a replica's disks",
            hint="check that the replica holds data",
        )
    seen = set()
    for disk_id in disk_ids:
        pki.check_identifier(disk_id, "disk id")
        if disk_id in seen:
            raise InvalidArgument(f"VM {name}: disk {disk_id} is given twice")
        seen.add(disk_id)
        slot = parse_slot(disk_id)
        if slot is not None and slot[0] == "IDE" and generation == 2:
            raise InvalidArgument(
                f"VM {name}: disk {disk_id} names an IDE location, and a generation 2 VM has "
                "no IDE controller",
                hint="fail over as a generation 1 VM, or name the disk after a SCSI location",
            )
        if slot is not None and (slot[1] > 3 or slot[2] > (1 if slot[0] == "IDE" else 63)):
            raise InvalidArgument(
                f"VM {name}: disk {disk_id} names a controller location Hyper-V does not have",
                hint="SCSI controllers 0-3 with locations 0-63; IDE 0-1 with locations 0-1",
            )


def _assign_slots(disk_ids: list[str], generation: int) -> list[str]:
    """Each disk's controller location: the one its id names, else the next free one (IDE 0
    then SCSI 0 on generation 1, SCSI 0 on generation 2; IDE 1:0 is the DVD drive)."""
    wanted = [d if parse_slot(d) else None for d in disk_ids]
    taken = {w for w in wanted if w}
    free = iter(
        s
        for s in (
            ([slot_name("IDE", 0, 0), slot_name("IDE", 0, 1)] if generation == 1 else [])
            + [slot_name("SCSI", n, loc) for n in range(4) for loc in range(64)]
        )
        if s not in taken
    )
    out = []
    for w in wanted:
        if w is not None and w not in out:
            out.append(w)
        else:
            out.append(next(free))
    return out
