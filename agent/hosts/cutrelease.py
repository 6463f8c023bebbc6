"""Releasing a cut of the ``directory`` backend: merging its frozen layers into the base.

The order and why it survives a crash are in :mod:`agent.hosts.checkpoints` (Release): with
the journal (``releasing`` in ``cuts.json``) written, :func:`release_run` merges, per disk and
from the bottom, each frozen layer into the base (relinking the layer above it), drops it from
``vm.json``, records the new layer identities, moves the baseline and clears the journal; run
again after a crash it finishes the job. :func:`collect_garbage` then deletes the change logs
and cut bitmaps no cut can need any more. Both run under the VM's exclusive lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

from agent.hosts import changelog, cutstate
from agent.hosts.cutstate import TrackingState
from agent.hosts.vmspec import VmSpec, read_vm, write_vm
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, SitepairError
from sitepair.fsutil import fsync_dir
from sitepair.vdisk import ops as vdisk_ops


def release_run(folder: Path, state: TrackingState, fault: Callable[[str], None]) -> None:
    """Carry out (or resume) the journalled release (``state.releasing``); see the module
    docstring. ``fault`` is called with the name of each crash-safety step (a test hook)."""
    journal = state.releasing
    assert journal is not None
    for disk_id, layers in journal.layers.items():
        for entry in layers:
            spec = read_vm(folder)
            disk = spec.disk(disk_id)
            chain = list(disk.chain)
            if entry not in chain:
                continue  # merged and dropped from vm.json already
            where = f"VM {spec.name} disk {disk_id}"
            position = chain.index(entry)
            if position != 1 or position + 1 >= len(chain):
                raise FailedPrecondition(
                    f"{where}: cannot merge {folder / entry}: it is not the layer right "
                    f"above the base {folder / chain[0]} with a layer above it"
                )
            frozen, base, above = (folder / entry, folder / chain[0], folder / chain[2])
            resume = journal.current.get(disk_id) == entry
            if not resume:
                journal.current[disk_id] = entry
                cutstate.save(folder, state)
                fault("release:merge-started")
            try:
                _merge_layer(frozen, base, above, resume=resume, fault=fault)
            except SitepairError as exc:
                raise type(exc)(
                    f"{where}: merging {frozen} into {base} failed: {exc.message}",
                    hint=exc.hint,
                ) from exc
            fault("release:merged")
            chain.remove(entry)
            new_disks = tuple(
                dataclasses.replace(d, chain=tuple(chain)) if d.id == disk_id else d
                for d in spec.disks
            )
            write_vm(folder, dataclasses.replace(spec, disks=new_disks))
            fault("release:chain-updated")
        _refresh_identities(folder, read_vm(folder), state, disk_id)
    for c in state.cuts:
        if c.seq <= journal.seq:
            c.released = True
    state.baseline_seq = max(state.baseline_seq, journal.seq)
    state.releasing = None
    state.trim_released()
    cutstate.save(folder, state)
    fault("release:recorded")
    collect_garbage(folder, read_vm(folder), state)


def _merge_layer(
    frozen: Path, base: Path, above: Path, *, resume: bool, fault: Callable[[str], None]
) -> None:
    if not frozen.exists():
        return  # merged and deleted; only vm.json was left to update
    if resume and _parent_is(above, base):
        # The merge wrote everything and relinked the layer above; only the delete is left.
        frozen.unlink()
        fsync_dir(frozen.parent)
        return
    if resume:
        # A partial merge may have changed the base (a VHDX base then has a new
        # DataWriteGuid the frozen layer no longer matches): relink, then merge again.
        vdisk.set_parent(frozen, base)
        fault("release:relinked-for-resume")
    vdisk_ops.merge(frozen, relink=[above])


def _refresh_identities(folder: Path, spec: VmSpec, state: TrackingState, disk_id: str) -> None:
    """After merges: record the identities of the layers the release changed (the base and
    the layer relinked onto it) and forget the merged ones."""
    disk = spec.disk(disk_id)
    known = state.identities.setdefault(disk_id, {})
    for entry in list(known):
        if entry not in disk.chain[:-1]:
            del known[entry]
    for entry in disk.chain[:2]:
        identity = changelog.layer_identity(folder / entry)
        if entry == disk.active:
            lp = changelog.log_path(folder, disk_id, entry)
            with contextlib.suppress(changelog.ChangeLogError, changelog.ChangeLogMissing):
                header = changelog.read_header(lp)
                if header.state == changelog.STATE_CLEAN:
                    changelog.set_identity(lp, identity)
        else:
            known[entry] = identity


def collect_garbage(folder: Path, spec: VmSpec, state: TrackingState) -> None:
    """Delete change logs and cut bitmaps no cut can need any more."""
    if state.pending is not None or state.releasing is not None:
        return
    keep_logs = {changelog.log_path(folder, d.id, d.active) for d in spec.disks}
    keep_bits: set[Path] = set()
    for c in state.outstanding():
        for cd in c.disks:
            if c.seq > state.baseline_seq:
                keep_logs.add(changelog.log_path(folder, cd.disk_id, cd.frozen))
            if cd.bits:
                keep_bits.add(folder / "changes" / cd.bits)
    changes = folder / "changes"
    for disk in spec.disks:
        for path in (changes / disk.id).glob("*.cbt"):
            if path not in keep_logs:
                path.unlink(missing_ok=True)
    for path in (changes / "cuts").glob("*.bits"):
        if path not in keep_bits:
            path.unlink(missing_ok=True)
    # Temporary files of atomic replacements a crash interrupted (no writer has its disks
    # open now, and the operations lock keeps other backend operations out).
    for folder_ in (changes, changes / "cuts", *(changes / d.id for d in spec.disks)):
        for path in folder_.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def _parent_is(child: Path, parent: Path) -> bool:
    """True if ``child`` opens and its parent is ``parent``."""
    try:
        with vdisk.open_disk(child, read_only=True) as disk:
            return disk.parent is not None and disk.parent.path.resolve() == parent.resolve()
    except SitepairError:
        return False
