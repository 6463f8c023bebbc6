"""Consistent cuts and change tracking of a running QEMU VM: qcow2 overlays on its VHDX disks.

**Design.** QEMU cannot open a differencing VHDX, so a cut cannot be a Hyper-V-style AVHDX
child. Instead every disk of a VM runs as a chain ``base.vhdx <- overlay.qcow2``: the guest
writes into the overlay, and the VHDX (what replicates) changes only when sitepair folds an
overlay into it. The overlay's allocated clusters (64 KiB) are then exactly what the guest wrote
since the overlay was put there: the overlay *is* the change log, on disk, so it survives an
agent restart and a clean VM restart (a QMP dirty bitmap would be lost with QEMU and can only be
read through an NBD export).

* **Cut** (running VM): a new overlay per disk goes on top of the current one in **one QMP
  ``transaction``** of ``blockdev-snapshot`` actions: every disk at the same instant, the guest
  never paused (QEMU drains in-flight requests for the transaction and flushes the old top).
  The old top is frozen from then on; the cut is ``base <- frozen overlay``, read by the sender
  with ``sitepair.vdisk`` (the qcow2 reader over the VHDX), and its ``changed`` ranges are the
  frozen overlay's allocated clusters plus whatever earlier unreleased cuts had.
* **Release**: ``block-commit`` folds the frozen overlay into the VHDX while the guest runs;
  the overlay leaves the graph (``blockdev-del``) and its file is deleted. The VHDX is then
  exactly the released cut. A VM that is off is folded by sitepair itself (the overlay's
  clusters copied into the VHDX through ``sitepair.vdisk``).
* **A new cut while one is outstanding** (its cycle failed): the older frozen overlay is folded
  first and its clusters are remembered (``pending``), so the new cut covers both.
* **Start**: QEMU starts paused with the chain as it is on disk; if the top is not an overlay
  sitepair can keep tracking in, a fresh one goes on before the guest runs.

**Trust.** Tracking is trusted only while sitepair can show that every write since the last
released cut is in an overlay it knows. It is not after: a QEMU that ended without closing its
disks (killed, crashed: the overlay's qcow2 "dirty" flag is still set, since overlays use lazy
refcounts); a base image whose size or modification time changed while the VM was off; a disk
graph in QEMU that is not the one recorded (someone else started the VM, or added layers); an
operation interrupted half-way; a VM that ran without an overlay. The cut then says why
(``untrusted_reason``) and replication does a checksum resync, after which
:meth:`Layers.reset_tracking` trusts it again.

State lives in ``<vm>/layers.json`` (replaced atomically); overlays in ``<vm>/overlays/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.hosts import qemu_vm
from agent.hosts.base import Cut, FrozenDisk
from agent.hosts.qemu_monitor import QmpSession
from agent.hosts.qemu_vm import QemuVmSpec, node
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, SitepairError
from sitepair.fsutil import atomic_write
from sitepair.vdisk.qcow2 import Qcow2Disk

log = logging.getLogger("sitepair.agent.qemu")

FORMAT = 1
#: Cluster size of the overlays: the change-tracking granularity (the replication block).
OVERLAY_CLUSTER = 64 * 1024
#: How long a block-commit may take (it copies what the guest wrote since the cut).
COMMIT_TIMEOUT = 3600.0
#: Offline folds copy in pieces of COPY_CHUNK, COPY_BATCH bytes between opening the chain and
#: opening the base.
COPY_CHUNK = 4 << 20
COPY_BATCH = 64 << 20


@dataclasses.dataclass
class CutRecord:
    cut_id: str
    taken_at: float
    app_consistent: bool
    #: Per disk: how many overlays from the bottom are frozen in this cut.
    frozen: dict[str, int]
    #: Per disk: changed ranges since the last released cut; None when untrusted.
    changed: dict[str, list[list[int]]] | None
    untrusted_reason: str = ""


@dataclasses.dataclass
class LayerState:
    #: Per disk: overlay numbers above the base, bottom first.
    overlays: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    next_overlay: int = 1
    cut: CutRecord | None = None
    #: Changed ranges (per disk) of overlays folded before their cut was released.
    pending: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    trusted: bool = False
    untrusted_reason: str = "change tracking has not started yet"
    #: The last released cut.
    released: str = ""
    #: The QEMU process whose overlays these are ({"pid", "create_time"}), while it runs.
    instance: dict[str, float] | None = None
    #: Per disk: (size, mtime_ns) of the base when sitepair last wrote or checked it.
    bases: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: An operation in progress; found at the next call, it makes tracking untrusted.
    intent: str = ""

    def to_json(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["format"] = FORMAT
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> LayerState:
        doc = json.loads(data)
        if doc.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        cut = doc.pop("cut", None)
        state = cls(**doc)
        state.cut = CutRecord(**cut) if cut else None
        return state


class Layers:
    """The overlays and tracking of one VM (``folder``). Callers serialise operations."""

    def __init__(self, folder: Path, spec: QemuVmSpec, *, locked: bool = True) -> None:
        """``locked``: the caller holds the VM's lock (it may act on the layers). A reader
        without it (the inventory) only looks: an intent it finds belongs to an operation in
        progress, not to an interrupted one."""
        self.folder = folder
        self.spec = spec
        self.path = folder / "layers.json"
        self.locked = locked
        self.state = self._load()

    # -- state --------------------------------------------------------------------------------
    def _load(self) -> LayerState:
        try:
            state = LayerState.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return LayerState()
        except (ValueError, TypeError, KeyError) as exc:
            log.warning(
                "layers.json unreadable; change tracking restarts",
                extra={"fields": {"vm": self.spec.name, "error": str(exc)}},
            )
            return LayerState(untrusted_reason=f"the layer record was damaged ({exc})")
        if state.intent and self.locked:
            self._distrust(state, f"an operation was interrupted ({state.intent})")
            state.intent = ""
        return state

    def save(self) -> None:
        if not self.locked:
            raise FailedPrecondition("the layers were read without the VM's lock")
        atomic_write(self.path, self.state.to_json())

    def _distrust(self, state: LayerState, reason: str) -> None:
        if state.trusted or not state.untrusted_reason:
            log.warning(
                "change tracking untrusted", extra={"fields": {"vm": self.spec.name, "why": reason}}
            )
        state.trusted = False
        state.untrusted_reason = reason

    def distrust(self, reason: str) -> None:
        self._distrust(self.state, reason)
        self.save()

    def overlay_path(self, disk_id: str, number: int) -> Path:
        return self.folder / "overlays" / f"{disk_id}-{number:06d}.qcow2"

    def chain(self, disk_id: str) -> list[Path]:
        """The disk's layers on disk, base first."""
        base = qemu_vm.base_path(self.folder, self.spec.disk(disk_id))
        return [
            base,
            *(self.overlay_path(disk_id, n) for n in self.state.overlays.get(disk_id, [])),
        ]

    def _base_identity(self, disk_id: str) -> list[int]:
        st = qemu_vm.base_path(self.folder, self.spec.disk(disk_id)).stat()
        return [st.st_size, st.st_mtime_ns]

    def note_bases(self) -> None:
        self.state.bases = {d.id: self._base_identity(d.id) for d in self.spec.disks}

    def check_offline(self, alive: bool) -> None:
        """What may have happened while nobody watched: QEMU ended without closing its disks,
        or a base changed behind sitepair's back."""
        st = self.state
        if st.instance is not None and not alive:
            dirty = [
                p.name
                for d in self.spec.disks
                for p in self.chain(d.id)[1:]
                if p.exists() and _qcow2_dirty(p)
            ]
            if dirty:
                self._distrust(
                    st,
                    "QEMU of the VM ended without closing its disks (killed or crashed); "
                    f"{', '.join(dirty)} may lack writes",
                )
            st.instance = None
            self.save()
        for d in self.spec.disks:
            recorded = st.bases.get(d.id)
            if recorded is not None and recorded != self._base_identity(d.id):
                self._distrust(st, f"the base image of disk {d.id} changed outside sitepair")
                self.note_bases()
                self.save()

    # -- running VM ---------------------------------------------------------------------------
    def check_graph(self, qmp: QmpSession) -> None:
        """QEMU's block graph must be the recorded one (every device on its recorded top)."""
        tops = {
            b.get("qdev", ""): b.get("inserted", {}).get("node-name", "")
            for b in qmp.execute("query-block")
        }
        for i, d in enumerate(self.spec.disks):
            overlays = self.state.overlays.get(d.id, [])
            want = node(i, f"o{overlays[-1]}") if overlays else node(i, "b")
            found = next(
                (t for q, t in tops.items() if q.startswith(f"disk{i}") or f"/disk{i}/" in q), None
            )
            if found != want:
                self._distrust(
                    self.state,
                    f"disk {d.id} of the running VM is on {found or 'nothing'}, not on the layer "
                    f"sitepair recorded ({want})",
                )
                self.save()
                raise FailedPrecondition(
                    f"the disks of VM {self.spec.name} are not where sitepair left them",
                    hint="stop the VM and start it again through sitepair; the next cycle "
                    "resynchronizes",
                )

    def _add_overlay(self, qmp: QmpSession, index: int, disk_id: str, number: int) -> str:
        """Create overlay ``number`` over the disk's current top and add it to QEMU's graph
        (not yet attached: the snapshot transaction attaches it)."""
        path = self.overlay_path(disk_id, number)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        below = self.chain(disk_id)[-1]
        below_fmt = qemu_vm.qemu_driver(
            "qcow2" if len(self.chain(disk_id)) > 1 else self.spec.disk(disk_id).format
        )
        name = node(index, f"o{number}")
        size = _virtual_size(below)
        qmp.run_job(
            "blockdev-create",
            {
                "job-id": f"{name}-cf",
                "options": {"driver": "file", "filename": str(path), "size": 0},
            },
            timeout=60,
        )
        qmp.execute(
            "blockdev-add", {"driver": "file", "filename": str(path), "node-name": f"{name}f"}
        )
        qmp.run_job(
            "blockdev-create",
            {
                "job-id": f"{name}-c",
                "options": {
                    "driver": "qcow2",
                    "file": f"{name}f",
                    "size": size,
                    "backing-file": str(below),
                    "backing-fmt": below_fmt,
                    "cluster-size": OVERLAY_CLUSTER,
                    # The dirty flag then says whether QEMU closed the overlay cleanly.
                    "lazy-refcounts": True,
                },
            },
            timeout=60,
        )
        qmp.execute(
            "blockdev-add",
            {"driver": "qcow2", "file": f"{name}f", "node-name": name, "backing": None},
        )
        path.chmod(0o600)
        return name

    def put_overlays(
        self,
        qmp: QmpSession,
        *,
        quiesce: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> None:
        """A fresh overlay on every disk, in one transaction (tracking continues in it).
        ``quiesce``: a context the transaction runs in (the guest's filesystems frozen), entered
        only once the overlays are made, so the guest is frozen for the transaction alone."""
        st = self.state
        number = st.next_overlay
        st.next_overlay += 1
        st.intent = f"adding overlay {number}"
        self.save()
        actions = []
        for i, d in enumerate(self.spec.disks):
            overlays = st.overlays.get(d.id, [])
            top = node(i, f"o{overlays[-1]}") if overlays else node(i, "b")
            name = self._add_overlay(qmp, i, d.id, number)
            actions.append({"type": "blockdev-snapshot", "data": {"node": top, "overlay": name}})
        with quiesce() if quiesce is not None else contextlib.nullcontext():
            qmp.execute("transaction", {"actions": actions})
        for d in self.spec.disks:
            st.overlays.setdefault(d.id, []).append(number)
        st.intent = ""
        self.save()

    def fold(self, qmp: QmpSession | None, count: dict[str, int]) -> dict[str, list[list[int]]]:
        """Fold the ``count[disk]`` bottom overlays of each disk into its base; returns the
        ranges they held. With ``qmp`` (VM running) QEMU commits them; without, sitepair
        copies them (VM off)."""
        st = self.state
        folded: dict[str, list[list[int]]] = {}
        st.intent = "folding overlays into the base"
        self.save()
        for i, d in enumerate(self.spec.disks):
            n = count.get(d.id, 0)
            if n <= 0:
                continue
            layers = st.overlays.get(d.id, [])[:n]
            paths = [self.overlay_path(d.id, x) for x in layers]
            if qmp is not None:
                # Read what the layers hold first (flushed: they are frozen backing files).
                ranges = _union(_layer_ranges(p) for p in paths)
                above = st.overlays[d.id][n] if len(st.overlays[d.id]) > n else None
                if above is None:
                    raise FailedPrecondition(f"disk {d.id}: cannot fold the active layer")
                qmp.run_job(
                    "block-commit",
                    {
                        "job-id": f"d{i}-commit",
                        "device": node(i, f"o{st.overlays[d.id][-1]}"),
                        "top-node": node(i, f"o{layers[-1]}"),
                        "base-node": node(i, "b"),
                    },
                    timeout=COMMIT_TIMEOUT,
                )
                # Top first: a layer still backs the one above it until that one is gone.
                for x in reversed(layers):
                    qmp.execute("blockdev-del", {"node-name": node(i, f"o{x}")})
                    qmp.execute("blockdev-del", {"node-name": node(i, f"o{x}") + "f"})
            else:
                ranges = _union(_layer_ranges(p) for p in paths)
                _copy_down(paths[-1], self.chain(d.id)[0], ranges)
            folded[d.id] = ranges
            st.overlays[d.id] = st.overlays[d.id][n:]
            for p in paths:
                p.unlink(missing_ok=True)
        self.note_bases()
        st.intent = ""
        self.save()
        return folded

    # -- cuts ---------------------------------------------------------------------------------
    def take_cut(
        self,
        qmp: QmpSession | None,
        *,
        app_consistent: bool,
        now: float,
        quiesce: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ) -> Cut:
        """``qmp``: the running VM's monitor (None: the VM is off and nothing writes).
        ``quiesce``: see :meth:`put_overlays` (an application-consistent cut)."""
        st = self.state
        if st.cut is not None and qmp is not None:
            # The previous cut was never released: fold its layers, keep their ranges.
            folded = self.fold(qmp, st.cut.frozen)
            for disk_id, ranges in folded.items():
                st.pending[disk_id] = _merge(st.pending.get(disk_id, []) + ranges)
            st.cut = None
            self.save()
        cut_id = uuid.uuid4().hex
        if qmp is not None:
            had_overlays = all(st.overlays.get(d.id) for d in self.spec.disks)
            if not had_overlays:
                self._distrust(st, "the VM ran without a tracking layer")
            self.put_overlays(qmp, quiesce=quiesce)
            frozen = {d.id: len(st.overlays[d.id]) - 1 for d in self.spec.disks}
        else:
            frozen = {d.id: len(st.overlays.get(d.id, [])) for d in self.spec.disks}
        changed: dict[str, list[list[int]]] | None = None
        if st.trusted:
            changed = {}
            for d in self.spec.disks:
                layers = [
                    self.overlay_path(d.id, x) for x in st.overlays.get(d.id, [])[: frozen[d.id]]
                ]
                changed[d.id] = _merge(
                    st.pending.get(d.id, []) + _union(_layer_ranges(p) for p in layers)
                )
        st.cut = CutRecord(
            cut_id=cut_id,
            taken_at=now,
            app_consistent=app_consistent,
            frozen=frozen,
            changed=changed,
            untrusted_reason="" if st.trusted else st.untrusted_reason,
        )
        self.save()
        return self.describe(st.cut)

    def describe(self, rec: CutRecord) -> Cut:
        disks = []
        for d in self.spec.disks:
            chain = self.chain(d.id)[: 1 + rec.frozen.get(d.id, 0)]
            size = _virtual_size(chain[0])
            changed = None
            if rec.changed is not None:
                changed = tuple(
                    (int(o), min(int(n), size - int(o))) for o, n in rec.changed.get(d.id, [])
                )
            disks.append(
                FrozenDisk(
                    disk_id=d.id,
                    chain=tuple(chain),
                    virtual_size=size,
                    format=d.format,
                    changed=changed,
                )
            )
        return Cut(
            vm_id=self.spec.id,
            cut_id=rec.cut_id,
            taken_at=rec.taken_at,
            app_consistent=rec.app_consistent,
            disks=tuple(disks),
            untrusted_reason=rec.untrusted_reason,
        )

    def outstanding(self) -> Cut | None:
        return self.describe(self.state.cut) if self.state.cut is not None else None

    def release(self, qmp: QmpSession | None, cut_id: str) -> None:
        st = self.state
        if st.cut is None or st.cut.cut_id != cut_id:
            if st.released != cut_id:
                log.info(
                    "release of a cut that is not outstanding ignored",
                    extra={"fields": {"vm": self.spec.name, "cut": cut_id}},
                )
            return
        count = dict(st.cut.frozen)
        later: dict[str, list[list[int]]] = {}
        if qmp is None:
            # Off: QEMU is not there to point the layers above the cut at the base, and
            # sitepair does not write qcow2 headers. So they are folded too, and what they hold
            # (written after the cut) is remembered as changed since it.
            for d in self.spec.disks:
                above = st.overlays.get(d.id, [])[count.get(d.id, 0) :]
                if above:
                    later[d.id] = _union(_layer_ranges(self.overlay_path(d.id, x)) for x in above)
                count[d.id] = len(st.overlays.get(d.id, []))
        self.fold(qmp, count)
        st.cut = None
        st.pending = later
        st.released = cut_id
        self.save()

    def reset_tracking(self, cut_id: str) -> None:
        st = self.state
        if st.released != cut_id and (st.cut is None or st.cut.cut_id != cut_id):
            return
        if not all(st.overlays.get(d.id) for d in self.spec.disks) and st.instance is not None:
            return  # a running VM without a tracking layer cannot be trusted yet
        st.trusted = True
        st.untrusted_reason = ""
        self.save()


# -- ranges and qcow2 --------------------------------------------------------------------------


def _merge(ranges: Iterable[list[int] | tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for off, n in sorted((int(r[0]), int(r[1])) for r in ranges):
        if n <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return out


def _union(groups: Iterable[list[list[int]]]) -> list[list[int]]:
    return _merge(r for g in groups for r in g)


def _virtual_size(path: Path) -> int:
    with vdisk.open_disk(path, read_only=True) as d:
        return int(d.virtual_size)


def _layer_ranges(path: Path) -> list[list[int]]:
    """The guest ranges this qcow2 layer itself holds (data or zero clusters): what the guest
    wrote while it was the top layer."""
    with vdisk.open_disk(path, read_only=True, format="qcow2") as d:
        if not isinstance(d, Qcow2Disk):
            raise FailedPrecondition(f"{path} is not a qcow2 overlay")
        return [[o, n] for o, n in d.allocated_ranges(this_layer_only=True)]


def _qcow2_dirty(path: Path) -> bool:
    """True when QEMU did not close the overlay cleanly (or it cannot even be read)."""
    try:
        with vdisk.open_disk(path, read_only=True, format="qcow2") as d:
            return bool(getattr(d, "dirty", True))
    except SitepairError:
        return True


def _copy_down(top: Path, base: Path, ranges: list[list[int]]) -> None:
    """Write the guest bytes of ``ranges``, as ``top`` (a chain over ``base``) reads them,
    into ``base``: an offline commit. Idempotent (the same bytes at the same offsets).

    Reading ``top`` opens ``base`` too (as its backing file, read-only), and an image open for
    reading cannot be opened for writing: so the bytes are read a batch at a time (at most
    :data:`COPY_BATCH`), the chain closed, then the batch written."""
    pieces = [
        (pos, min(COPY_CHUNK, off + n - pos))
        for off, n in ranges
        for pos in range(off, off + n, COPY_CHUNK)
    ]
    while pieces:
        batch: list[tuple[int, int]] = []
        size = 0
        while pieces and size < COPY_BATCH:
            batch.append(pieces.pop(0))
            size += batch[-1][1]
        with vdisk.open_disk(top, read_only=True) as src:
            datas = [src.read(pos, n) for pos, n in batch]
        with vdisk.open_disk(base) as dst:
            for (pos, n), data in zip(batch, datas, strict=True):
                if data.count(0) == n:
                    dst.write_zeroes(pos, n)
                else:
                    dst.write(pos, data)
            dst.flush()
