"""Checkpoints of the ``directory`` backend: consistent cuts, their release, change tracking
and the recovery of operations a crash interrupted.

Everything here works on one VM folder (see :mod:`agent.hosts.directory` for the layout),
under the VM locks of :mod:`agent.hosts.vmlock`, with the change logs of
:mod:`agent.hosts.changelog` and the state file of :mod:`agent.hosts.cutstate`.

Cuts (:meth:`Checkpoints.take_cut`), under the exclusive VM lock (every writer has flushed
and closed its disks), in this order:

1. check every layer: the active layer's change log (missing, damaged, flagged, left open in
   another boot) and its identity if the log is clean; every other layer's identity against
   the one recorded in ``cuts.json``. Each problem becomes a *taint* (a reason the tracking
   cannot be trusted), saved with the cut number it first affects;
2. write the intent (``pending``: the cut and the child of each active layer) to ``cuts.json``;
3. create each child (a differencing disk of the active layer, same format) and its empty log;
4. raise the lock generation, then switch ``vm.json`` to the children: **the commit point**;
5. freeze each old active layer's log and record the layer's identity;
6. unless tainted, OR the logs of every layer frozen since the baseline into the cut's
   bitmap file; then record the cut in ``cuts.json`` and clear ``pending``.

A crash before 4 is undone by the next operation (children deleted); after 4 it is finished
(5-6 are idempotent). A take_cut with an earlier cut still outstanding always makes a new layer
and its ``changed`` covers both: a cycle that failed is folded into the next one.

Release (:meth:`Checkpoints.release_cut`) of cut *n*, also under the exclusive lock (the
base is opened for writing, which no reader or writer may have open): journal the layers to
merge (``releasing``), then per disk and per frozen layer F from the bottom: journal F as
current, :func:`sitepair.vdisk.ops.merge` F into the base relinking the layer above it, drop F
from ``vm.json``; then record the new identities, move the baseline to *n*, mark cuts <= *n*
released and clear the journal; last, delete logs and bitmaps nobody needs. Re-running after a
crash anywhere finishes the job: for a layer whose merge had started, if the layer above
already names the base (the data is complete) only F is deleted; otherwise F is relinked to the
base first (a partial merge changed the base's VHDX DataWriteGuid) and merged again, which
rewrites the same data. The merging itself is :mod:`agent.hosts.cutrelease`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from agent.hosts import changelog, cutrelease, cutstate, hooks, vmlock
from agent.hosts.base import Cut, FrozenDisk, QuiesceFailed
from agent.hosts.cutstate import CutDisk, CutRecord, PendingCut, Releasing, TrackingState
from agent.hosts.vmspec import DiskSpec, VmSpec, read_vm, write_vm
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, NotFound, SitepairError
from sitepair.fsutil import atomic_write, fsync_dir

log = logging.getLogger("sitepair.agent.directory")

#: Block size of the VHDX differencing children checkpoints create (Hyper-V uses 2 MiB too).
CHILD_VHDX_BLOCK_SIZE = 2 * 1024 * 1024
_BITS_MAGIC = b"SPCUTBIT"
_BITS_HEADER = struct.Struct("<8sQI4x")  # magic, virtual size, CRC-32 of the bitmap


class Checkpoints:
    """Cuts and their release for the VMs of one backend.

    ``boot_id`` and ``clock`` are injectable (tests simulate a reboot and move time);
    ``lock_timeout`` bounds how long a cut waits for writers to release the disks;
    ``hook_timeout`` bounds each checkpoint hook; ``fault_hook`` is a test hook called with the
    name of each crash-safety step."""

    def __init__(
        self,
        *,
        boot_id: Callable[[], str],
        clock: Callable[[], float],
        lock_timeout: float,
        hook_timeout: float,
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        self._boot_id = boot_id
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._hook_timeout = hook_timeout
        self._fault_hook = fault_hook

    def take_cut(self, folder: Path, spec: VmSpec, *, app_consistent: bool = False) -> Cut:
        quiesced = False
        if app_consistent:
            try:
                quiesced = hooks.run_hook(
                    folder,
                    "pre-checkpoint",
                    vm_id=spec.id,
                    vm_name=spec.name,
                    timeout=self._hook_timeout,
                )
            except FailedPrecondition as exc:
                raise QuiesceFailed(exc.message, hint=exc.hint) from exc
            if not quiesced:
                log.warning(
                    "no pre-checkpoint hook: the cut is crash-consistent only",
                    extra={"fields": {"vm": spec.name, "folder": str(folder)}},
                )
        try:
            with self._exclusive(folder, spec.name):
                state = self._recover(folder)
                spec = read_vm(folder)
                record = self._cut_locked(folder, spec, state, app_consistent=quiesced)
                return self._cut_view(folder, read_vm(folder), record)
        finally:
            if quiesced:
                try:
                    hooks.run_hook(
                        folder,
                        "post-checkpoint",
                        vm_id=spec.id,
                        vm_name=spec.name,
                        timeout=self._hook_timeout,
                    )
                except SitepairError as exc:
                    log.warning(
                        "post-checkpoint hook failed",
                        extra={"fields": {"vm": spec.name, "error": str(exc)}},
                    )

    def outstanding_cut(self, folder: Path, spec: VmSpec) -> Cut | None:
        with vmlock.operations_lock(folder):
            state = cutstate.load(folder)
            if state.pending is None and state.releasing is None:
                return self._latest_view(folder, read_vm(folder), state)
        with self._exclusive(folder, spec.name):
            state = self._recover(folder)
            return self._latest_view(folder, read_vm(folder), state)

    def release_cut(self, folder: Path, spec: VmSpec, cut_id: str) -> None:
        with self._exclusive(folder, spec.name):
            state = self._recover(folder)
            record = state.find(cut_id)
            if record is None:
                raise NotFound(
                    f"VM {spec.name} has no cut {cut_id} ({cutstate.state_path(folder)})"
                )
            if record.released:
                return
            spec = read_vm(folder)
            self._verify(folder, spec, state, state.seq + 1)
            layers: dict[str, list[str]] = {}
            for cd in record.disks:
                chain = list(spec.disk(cd.disk_id).chain)
                if cd.frozen not in chain:
                    raise FailedPrecondition(
                        f"VM {spec.name} disk {cd.disk_id}: cut {cut_id} froze "
                        f"{folder / cd.frozen}, which is no longer in the disk's chain"
                    )
                layers[cd.disk_id] = chain[1 : chain.index(cd.frozen) + 1]
            state.releasing = Releasing(cut_id=cut_id, seq=record.seq, layers=layers)
            cutstate.save(folder, state)
            self._fault("release:journal")
            cutrelease.release_run(folder, state, self._fault)

    def reset_tracking(self, folder: Path, spec: VmSpec, cut_id: str) -> None:
        with self._exclusive(folder, spec.name):
            state = self._recover(folder)
            record = state.find(cut_id)
            if record is None:
                raise NotFound(
                    f"VM {spec.name} has no cut {cut_id} ({cutstate.state_path(folder)})"
                )
            state.taints = [t for t in state.taints if t.seq > record.seq]
            state.baseline_seq = max(state.baseline_seq, record.seq)
            cutstate.save(folder, state)
            cutrelease.collect_garbage(folder, read_vm(folder), state)

    def recover(self, folder: Path, spec: VmSpec) -> None:
        """Finish or undo an operation a dead process left half done (every other operation,
        and a writer that finds one, does this first)."""
        with self._exclusive(folder, spec.name):
            self._recover(folder)

    # -- internals: locking and recovery ------------------------------------------------------
    def _fault(self, point: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(point)

    @contextlib.contextmanager
    def _exclusive(self, folder: Path, name: str) -> Iterator[None]:
        with vmlock.exclusive(folder, what=f"VM {name}", timeout=self._lock_timeout) as section:
            # Writers reread vm.json whenever they come back; chains may change below.
            section.bump_generation()
            yield

    def _recover(self, folder: Path) -> TrackingState:
        """Finish or undo what an interrupted take_cut or release_cut left (exclusive lock
        held)."""
        state = cutstate.load(folder)
        if state.pending is not None:
            spec = read_vm(folder)
            pending = state.pending
            committed = all(
                _active_of(spec, cd.disk_id) == pending.children.get(cd.disk_id)
                for cd in pending.record.disks
            )
            if committed:
                self._finish_cut(folder, state)
            else:
                self._roll_back_cut(folder, spec, state)
        if state.releasing is not None:
            cutrelease.release_run(folder, state, self._fault)
        return state

    # -- internals: taking a cut ----------------------------------------------------------
    def _current_boot(self) -> uuid.UUID:
        return changelog.boot_uuid(self._boot_id())

    def _verify(self, folder: Path, spec: VmSpec, state: TrackingState, seq: int) -> None:
        """Record a taint for every reason the tracking of this VM cannot be trusted, and
        re-record identities so each outside change is reported once."""
        boot = self._current_boot()
        for disk in spec.disks:
            where = f"VM {spec.name} disk {disk.id}"
            active = folder / disk.active
            lp = changelog.log_path(folder, disk.id, disk.active)
            try:
                header = changelog.read_header(lp)
                changelog.check_header(header, lp, disk_id=disk.id, layer=disk.active)
            except changelog.ChangeLogMissing:
                state.add_taint(
                    seq,
                    f"{where}: no change log for the active layer {active} ({lp} is missing), "
                    "so writes to it are not tracked",
                )
            except changelog.ChangeLogError as exc:
                state.add_taint(
                    seq, f"{where}: the change log of {active} is damaged: {exc.message}"
                )
            else:
                if header.flags & changelog.FLAG_UNTRACKED:
                    state.add_taint(
                        seq,
                        f"{where}: {active} was opened for writing without a change log; the "
                        f"writer started {lp}, but earlier writes are unknown",
                    )
                if header.flags & changelog.FLAG_REPLACED:
                    state.add_taint(
                        seq,
                        f"{where}: a writer found the change log of {active} damaged and "
                        f"started a new one ({lp}); earlier writes are unknown",
                    )
                if header.flags & changelog.FLAG_REBOOT or (
                    header.state == changelog.STATE_OPEN and header.boot != boot
                ):
                    state.add_taint(
                        seq,
                        f"{where}: the host restarted or lost power while {active} was open "
                        f"for writing (its change log {lp} was left open in an earlier boot), "
                        "so writes in flight may be missing from the log",
                    )
                if header.state == changelog.STATE_FROZEN:
                    state.add_taint(
                        seq, f"{where}: the change log {lp} of the active layer is frozen"
                    )
                if header.state == changelog.STATE_CLEAN:
                    current = changelog.layer_identity(active)
                    if current != header.identity:
                        state.add_taint(seq, _modified(where, active, current, header.identity))
                        changelog.set_identity(lp, current)
            known = state.identities.setdefault(disk.id, {})
            for entry in disk.chain[:-1]:
                path = folder / entry
                current = changelog.layer_identity(path)
                recorded = known.get(entry)
                if recorded is None:
                    state.add_taint(
                        seq,
                        f"{where}: sitepair has no record of the layer {path} (it was not "
                        "made by sitepair's checkpoints), so its changes are unknown",
                    )
                elif recorded != current:
                    state.add_taint(seq, _modified(where, path, current, recorded))
                known[entry] = current

    def _cut_locked(
        self, folder: Path, spec: VmSpec, state: TrackingState, *, app_consistent: bool
    ) -> CutRecord:
        seq = state.seq + 1
        self._verify(folder, spec, state, seq)
        record = CutRecord(
            cut_id=str(uuid.uuid4()),
            seq=seq,
            taken_at=self._clock(),
            app_consistent=app_consistent,
            since_seq=state.baseline_seq,
            untrusted_reason="",
            disks=[],
        )
        children: dict[str, str] = {}
        for disk in spec.disks:
            fmt = vdisk.detect_format(folder / disk.active)
            if fmt not in (vdisk.DiskFormat.VHD, vdisk.DiskFormat.VHDX):
                raise FailedPrecondition(
                    f"VM {spec.name} disk {disk.id}: {folder / disk.active} is not a VHD or "
                    "VHDX image; only those can have checkpoints"
                )
            children[disk.id] = _child_entry(folder, disk, seq, fmt)
            record.disks.append(
                CutDisk(disk_id=disk.id, frozen=disk.active, virtual_size=0, format=fmt.value)
            )
        state.seq = seq
        state.pending = PendingCut(record=record, children=children)
        cutstate.save(folder, state)
        self._fault("take_cut:intent")
        try:
            new_disks = []
            for disk, cd in zip(spec.disks, record.disks, strict=True):
                cd.virtual_size = self._make_child(folder, spec, disk, children[disk.id])
                new_disks.append(dataclasses.replace(disk, chain=(*disk.chain, children[disk.id])))
                self._fault("take_cut:child")
            cutstate.save(folder, state)  # the sizes
            write_vm(folder, dataclasses.replace(spec, disks=tuple(new_disks)))
        except BaseException:
            with contextlib.suppress(Exception):
                if read_vm(folder).disks == spec.disks:
                    self._roll_back_cut(folder, spec, state)
            raise
        self._fault("take_cut:commit")
        return self._finish_cut(folder, state)

    def _make_child(self, folder: Path, spec: VmSpec, disk: DiskSpec, child: str) -> int:
        parent_path = folder / disk.active
        child_path = folder / child
        try:
            fmt = vdisk.detect_format(parent_path)
            with vdisk.create_disk(
                child_path,
                format=fmt or vdisk.DiskFormat.VHDX,
                subformat=vdisk.SubFormat.DIFFERENCING,
                parent=parent_path,
                block_size=CHILD_VHDX_BLOCK_SIZE,
            ) as created:
                size = created.virtual_size
        except SitepairError as exc:
            raise type(exc)(
                f"VM {spec.name} disk {disk.id}: cannot create the checkpoint layer "
                f"{child_path}: {exc.message}",
                hint=exc.hint,
            ) from exc
        changelog.create_log(
            changelog.log_path(folder, disk.id, child),
            disk_id=disk.id,
            layer=child,
            virtual_size=size,
            identity=changelog.layer_identity(child_path),
        )
        return size

    def _roll_back_cut(self, folder: Path, spec: VmSpec, state: TrackingState) -> None:
        """Undo a take_cut that did not reach its commit point: delete the children."""
        pending = state.pending
        assert pending is not None
        # Compared as files: a chain may name a layer by an absolute path (a failed-over VM's
        # chains) where the cut names its child relative to the VM folder.
        in_use = {(folder / entry).resolve() for d in spec.disks for entry in d.chain}
        for disk_id, child in pending.children.items():
            if (folder / child).resolve() in in_use:
                continue
            for path in (folder / child, changelog.log_path(folder, disk_id, child)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    fsync_dir(path.parent)
        state.pending = None
        cutstate.save(folder, state)

    def _finish_cut(self, folder: Path, state: TrackingState) -> CutRecord:
        """Steps 5-6 of a cut (after the commit point); idempotent."""
        pending = state.pending
        assert pending is not None
        record = pending.record
        for cd in record.disks:
            path = folder / cd.frozen
            identity = changelog.layer_identity(path)
            with contextlib.suppress(changelog.ChangeLogError, changelog.ChangeLogMissing):
                changelog.freeze(
                    changelog.log_path(folder, cd.disk_id, cd.frozen), identity=identity
                )
            state.identities.setdefault(cd.disk_id, {})[cd.frozen] = identity
            if not cd.virtual_size:
                with vdisk.open_disk(path, read_only=True) as d:
                    cd.virtual_size = d.virtual_size
        self._fault("take_cut:frozen")
        reason = "; ".join(t.reason for t in state.taints)
        if not reason:
            try:
                for cd in record.disks:
                    cd.bits = self._write_union(folder, state, record, cd)
            except SitepairError as exc:
                state.add_taint(record.seq, exc.message)
                reason = "; ".join(t.reason for t in state.taints)
        if reason:
            for cd in record.disks:
                if cd.bits:
                    with contextlib.suppress(FileNotFoundError):
                        (folder / "changes" / cd.bits).unlink()
                cd.bits = ""
        record.untrusted_reason = reason
        state.cuts = [c for c in state.cuts if c.cut_id != record.cut_id] + [record]
        state.pending = None
        cutstate.save(folder, state)
        return record

    def _write_union(
        self, folder: Path, state: TrackingState, record: CutRecord, cd: CutDisk
    ) -> str:
        """OR the logs of every layer of ``cd``'s disk frozen in cuts (since_seq, seq] into
        the cut's bitmap file; returns its name relative to ``changes/``."""
        layers = [
            other.frozen
            for c in state.outstanding()
            if record.since_seq < c.seq < record.seq
            for other in c.disks
            if other.disk_id == cd.disk_id
        ]
        layers.append(cd.frozen)
        size = changelog.bitmap_bytes(cd.virtual_size)
        bitmaps = []
        for entry in layers:
            lp = changelog.log_path(folder, cd.disk_id, entry)
            try:
                header = changelog.read_header(lp)
                changelog.check_header(header, lp, disk_id=cd.disk_id, layer=entry)
                if header.virtual_size != cd.virtual_size:
                    raise changelog.ChangeLogError(
                        f"it describes a {header.virtual_size}-byte disk, not "
                        f"{cd.virtual_size} bytes"
                    )
                bitmaps.append(changelog.read_bitmap(lp, header))
            except (changelog.ChangeLogError, changelog.ChangeLogMissing, OSError) as exc:
                raise FailedPrecondition(
                    f"disk {cd.disk_id}: the change log {lp} of {folder / entry} cannot be "
                    f"read: {exc}"
                ) from exc
        bits = changelog.union(bitmaps, size)
        name = f"cuts/{record.seq:06d}-{cd.disk_id}.bits"
        atomic_write(
            folder / "changes" / name,
            _BITS_HEADER.pack(_BITS_MAGIC, cd.virtual_size, zlib.crc32(bits)) + bits,
        )
        return name

    def _read_changed(self, folder: Path, cd: CutDisk) -> tuple[tuple[int, int], ...] | str:
        """The changed ranges of a cut's disk, or the reason they cannot be read."""
        path = folder / "changes" / cd.bits
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"disk {cd.disk_id}: the cut's changed-block file {path} cannot be read: {exc}"
        if len(data) >= _BITS_HEADER.size:
            magic, virtual_size, crc = _BITS_HEADER.unpack_from(data)
            bits = data[_BITS_HEADER.size :]
            if magic == _BITS_MAGIC and zlib.crc32(bits) == crc:
                return changelog.bitmap_ranges(bits, virtual_size)
        return f"disk {cd.disk_id}: the cut's changed-block file {path} is damaged"

    def _cut_view(self, folder: Path, spec: VmSpec, record: CutRecord) -> Cut:
        reason = record.untrusted_reason
        disks: list[FrozenDisk] = []
        changed: list[tuple[tuple[int, int], ...] | None] = []
        for cd in record.disks:
            chain = spec.disk(cd.disk_id).chain
            if cd.frozen not in chain:
                raise FailedPrecondition(
                    f"VM {spec.name} disk {cd.disk_id}: the top of cut {record.cut_id}, "
                    f"{folder / cd.frozen}, is no longer in the disk's chain"
                )
            top = chain.index(cd.frozen)
            ranges: tuple[tuple[int, int], ...] | None = None
            if not reason:
                got = self._read_changed(folder, cd)
                if isinstance(got, str):
                    reason = f"VM {spec.name} {got}"
                else:
                    ranges = got
            changed.append(ranges)
            disks.append(
                FrozenDisk(
                    disk_id=cd.disk_id,
                    chain=tuple((folder / e).absolute() for e in chain[: top + 1]),
                    virtual_size=cd.virtual_size,
                    format=cd.format,
                    changed=None,
                )
            )
        if not reason:
            disks = [dataclasses.replace(d, changed=c) for d, c in zip(disks, changed, strict=True)]
        return Cut(
            vm_id=spec.id,
            cut_id=record.cut_id,
            taken_at=record.taken_at,
            app_consistent=record.app_consistent,
            disks=tuple(disks),
            untrusted_reason=reason,
        )

    def _latest_view(self, folder: Path, spec: VmSpec, state: TrackingState) -> Cut | None:
        outstanding = state.outstanding()
        return self._cut_view(folder, spec, outstanding[-1]) if outstanding else None


def _active_of(spec: VmSpec, disk_id: str) -> str | None:
    for d in spec.disks:
        if d.id == disk_id:
            return d.active
    return None


def _child_entry(folder: Path, disk: DiskSpec, seq: int, fmt: vdisk.DiskFormat) -> str:
    """The chain entry of the checkpoint child made for cut ``seq``: next to the active layer,
    named after the base (``disks/os.vhdx`` -> ``disks/os_000003.avhdx``).

    The name must be free: after a failover re-registers a VM its cut numbers start over while
    its chain may still hold a layer of the same name (the adopted replica kept the old VM's
    ``os_000001.avhdx``), so a taken name gets a ``-2``, ``-3``... suffix. A cut's children are
    therefore always files the cut itself created, and rolling one back deletes nothing else."""
    suffix = ".avhdx" if fmt is vdisk.DiskFormat.VHDX else ".avhd"
    stem = f"{PurePosixPath(disk.chain[0].replace(chr(92), '/')).stem}_{seq:06d}"
    active = disk.active
    in_chain = {(folder / entry).resolve() for entry in disk.chain}
    for n in itertools.count(1):
        name = stem + (f"-{n}" if n > 1 else "") + suffix
        if Path(active).is_absolute():
            entry = str(Path(active).parent / name)
        else:
            entry = str(PurePosixPath(active.replace("\\", "/")).parent / name)
        path = folder / entry
        if path.resolve() not in in_chain and not path.exists():
            return entry
    raise AssertionError("unreachable")


def _modified(where: str, path: Path, current: str, recorded: str) -> str:
    return (
        f"{where}: {path} was modified outside sitepair (it now has "
        f"{changelog.describe_identity(current)}, where sitepair left it with "
        f"{changelog.describe_identity(recorded)}), so its changes are not in the change log"
    )
