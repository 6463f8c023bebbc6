"""Cuts of the ``hyperv`` backend: recovery checkpoints, RCT and their release.

The contract of :class:`agent.hosts.base.HostBackend` in Hyper-V's terms (see
:mod:`agent.hosts.hyperv` for the backend as a whole):

- **cut** (:meth:`RctCuts.take_cut`) = a *recovery checkpoint* named ``sitepair-<cut id>``
  (application consistent through the guest's VSS when asked; if the guest cannot quiesce, a
  crash-consistent one and ``app_consistent`` false). The VM writes a new AVHDX from then on;
  the checkpoint's drives name the frozen layers, and each disk's chain (frozen layer and its
  parents, from ``Get-VHD``) is what a cycle reads with :mod:`sitepair.vdisk`.
- **changed** = ``GetVirtualDiskChanges`` of the frozen layer since the RCT id of the disk in
  the *baseline*: the reference point of the last released cut. Hyper-V's ranges are widened to
  64 KiB blocks (the change-log block of the contract), clipped to the disk and coalesced.
- **release** = the older outstanding checkpoints are removed (Hyper-V merges them), then the
  cut's checkpoint is converted to an RCT *reference point* (Hyper-V merges it too); its
  ``ResilientChangeTrackingIdentifiers`` become the new baseline and sitepair's older reference
  points are destroyed. Reference points sitepair did not make are never touched.
- **untrusted**: no baseline RCT id for a disk (the VM's first cut, a disk added since), or
  Hyper-V refusing an RCT id (a VM moved or imported, a disk edited or merged outside Hyper-V,
  reset tracking): the reason is kept as a *taint* until :meth:`RctCuts.reset_tracking` names a
  cut at or after it, exactly as the directory backend does.

What sitepair keeps per VM (:class:`HvTrackingState`: cuts, baseline, taints, journals of an
interrupted cut or release) lives in ``<vm root>/.sitepair-tracking/<Hyper-V VM id>/cuts.json``,
written through :mod:`agent.hosts.cutstate` under the VM's operations lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.hosts import changelog, cutstate, vmlock
from agent.hosts.base import Cut, FrozenDisk
from agent.hosts.hyperv_api import HvCheckpoint, HvVm, HyperVApi, QuiesceFailed, RctUnavailable
from agent.hosts.hyperv_vm import chain_of, disk_names, sitepair_id
from sitepair.errors import FailedPrecondition, NotFound, SitepairError
from sitepair.vdisk import coalesce

log = logging.getLogger("sitepair.agent.hyperv")

CHECKPOINT_PREFIX = "sitepair-"
#: The folder below the VM root that holds the tracking state of every VM.
TRACKING_DIR = ".sitepair-tracking"
#: The contract's change-log block: ``changed`` ranges are aligned to it.
BLOCK = changelog.BLOCK_SIZE


@dataclasses.dataclass
class HvCutDisk:
    disk_id: str
    slot: str
    virtual_size: int
    format: str
    #: Aligned, coalesced ranges; ``None`` when the cut is untrusted.
    changed: list[tuple[int, int]] | None


@dataclasses.dataclass
class HvCutRecord:
    cut_id: str
    seq: int
    checkpoint_id: str
    taken_at: float
    app_consistent: bool
    untrusted_reason: str
    disks: list[HvCutDisk]
    released: bool = False
    #: The checkpoint was deleted outside sitepair: the cut can no longer be read or released.
    lost: bool = False


@dataclasses.dataclass
class HvTrackingState(cutstate.CutLedger[HvCutRecord]):
    """``<vm root>/.sitepair-tracking/<Hyper-V VM id>/cuts.json``: the cuts of one VM
    (:class:`agent.hosts.cutstate.CutLedger`), the RCT baseline and the journals."""

    #: slot -> RCT id of the baseline (the last released cut's reference point).
    baseline_rct: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Reference points sitepair made, oldest first; the last one holds the baseline.
    reference_points: list[str] = dataclasses.field(default_factory=list)
    #: Journal of a take_cut: {"cut_id", "name"}.
    pending: dict[str, str] | None = None
    #: Journal of a release_cut: {"cut_id", "known": reference points before the conversion}.
    releasing: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> HvTrackingState:
        return cutstate.decode(
            data,
            where,
            lambda doc: cls(
                seq=int(doc["seq"]),
                baseline_rct={str(k): str(v) for k, v in doc["baseline_rct"].items()},
                reference_points=[str(r) for r in doc["reference_points"]],
                cuts=[_cut_from(c) for c in doc["cuts"]],
                taints=cutstate.taints_from(doc),
                pending=doc.get("pending"),
                releasing=doc.get("releasing"),
            ),
            hint="move it aside: sitepair then forgets its checkpoints of this VM (it "
            "removes those named sitepair-*) and the next cycle needs a resync",
        )


def _cut_from(c: dict[str, Any]) -> HvCutRecord:
    return HvCutRecord(
        cut_id=str(c["cut_id"]),
        seq=int(c["seq"]),
        checkpoint_id=str(c["checkpoint_id"]),
        taken_at=float(c["taken_at"]),
        app_consistent=bool(c["app_consistent"]),
        untrusted_reason=str(c["untrusted_reason"]),
        disks=[
            HvCutDisk(
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


class RctCuts:
    """Cuts of Hyper-V VMs (the module docstring says how): one VM at a time under its
    operations lock (:mod:`agent.hosts.vmlock`), with its state in
    ``<tracking root>/<Hyper-V VM id>/cuts.json``."""

    def __init__(self, api: HyperVApi, tracking_root: Path, clock: Callable[[], float]) -> None:
        self.api = api
        self.tracking_root = tracking_root
        self._clock = clock

    def tracking_dir(self, hv_id: str) -> Path:
        return self.tracking_root / hv_id

    def forget(self, hv_id: str) -> None:
        """Drop sitepair's tracking state of a VM: its next cut is untrusted (a resync)."""
        shutil.rmtree(self.tracking_dir(hv_id), ignore_errors=True)

    def _load(self, hv_id: str) -> HvTrackingState:
        return cutstate.load_file(
            self.tracking_dir(hv_id) / "cuts.json", HvTrackingState.from_json, HvTrackingState
        )

    def _save(self, hv_id: str, state: HvTrackingState) -> None:
        cutstate.save_file(self.tracking_dir(hv_id) / "cuts.json", state)

    @contextlib.contextmanager
    def _locked(self, vm: HvVm) -> Iterator[HvTrackingState]:
        folder = self.tracking_dir(vm.id)
        folder.mkdir(parents=True, exist_ok=True)
        with vmlock.operations_lock(folder):
            state = self._load(vm.id)
            self._recover(vm, state)
            yield state

    def take_cut(self, vm: HvVm, *, app_consistent: bool = False) -> Cut:
        with self._locked(vm) as state:
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

    def outstanding_cut(self, vm: HvVm) -> Cut | None:
        with self._locked(vm) as state:
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

    def release_cut(self, vm: HvVm, cut_id: str) -> None:
        with self._locked(vm) as state:
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

    def reset_tracking(self, vm: HvVm, cut_id: str) -> None:
        """Trust tracking again from ``cut_id``. Its RCT ids exist only once it is released (a
        checkpoint has none until it becomes a reference point): a cut taken before that
        covers everything since the previous baseline (more than needed, never less), or is
        untrusted if there is none."""
        with self._locked(vm) as state:
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
        state: HvTrackingState,
        cp: HvCheckpoint,
        *,
        cut_id: str,
        seq: int,
        taken_at: float,
        app_consistent: bool,
    ) -> HvCutRecord:
        """Describe the new checkpoint and ask RCT what changed since the baseline."""
        names = disk_names(vm)
        infos = {v.path.lower(): v for v in self.api.vhd_info([d.path for d in cp.drives])}
        disks: list[HvCutDisk] = []
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
                HvCutDisk(
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
        return HvCutRecord(
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

    def _view(self, vm: HvVm, record: HvCutRecord, checkpoints: list[HvCheckpoint]) -> Cut | None:
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
                    chain=tuple(chain_of(self.api, frozen[cd.slot])),
                    virtual_size=cd.virtual_size,
                    format=cd.format,
                    changed=None if cd.changed is None else tuple(cd.changed),
                )
            )
        return Cut(
            vm_id=sitepair_id(vm),
            cut_id=record.cut_id,
            taken_at=record.taken_at,
            app_consistent=record.app_consistent,
            disks=tuple(disks),
            untrusted_reason=record.untrusted_reason,
        )

    def _lose(self, vm: HvVm, state: HvTrackingState, record: HvCutRecord) -> None:
        """The cut's checkpoint was deleted outside sitepair (Hyper-V merged it): the cut is
        gone, but RCT still tracks every write since the baseline, so nothing is lost."""
        log.warning(
            "a cut's recovery checkpoint was deleted outside sitepair; the next cut covers it",
            extra={"fields": {"vm": vm.name, "cut": record.cut_id}},
        )
        record.lost = record.released = True
        self._save(vm.id, state)

    def _release_run(self, vm: HvVm, state: HvTrackingState) -> None:
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
        state.trim_released()
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

    def _recover(self, vm: HvVm, state: HvTrackingState) -> None:
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
