"""The replica of one relationship on the recovery host: disks, recovery points, staged cycles.

Layout (``root`` is ``<replica folder>/<relationship id>``)::

    state.json                       committed sequence, epoch, disk chains, recovery points
    disks/<disk>/base.vhdx           the replica disk (the oldest recovery point when there are any)
    disks/<disk>/p-<seq>.avhdx       differencing layers: one per later recovery point, and the
                                     active layer that cycles are applied to
    staging/<seq>/header.bin         the cycle being received
    staging/<seq>/batches.dat        framed records: the verified batches (metadata only when
                                     the cycle is written straight into new disks)
    staging/<seq>/progress.json      how many batches are durable (what the sender may skip)
    staging/<seq>/COMPLETE           the trailer; its presence is the commit decision

**Atomicity.** A delta cycle is staged in full (each batch verified against its digests before
it is written, made durable before it is acknowledged), its trailer is checked (counts and the
cycle digest), and only then is ``COMPLETE`` written: that rename is the commit point. Applying
the staged blocks to the active layer comes after, and is redone from the staged records if the
process dies half-way (the writes are idempotent); ``state.json`` records the new sequence once
the disks are flushed. So after any crash, :meth:`ReplicaStore.recover` brings the replica to
exactly the last committed cycle: the one before, if ``COMPLETE`` was not written; this one, by
finishing the apply, if it was. An initial cycle writes straight into new disk files named
``initial-<seq>.*`` (nothing to protect yet), and commits by renaming them. Receiving and
staging a cycle is :mod:`agent.replication.incoming`; this module keeps the replica's state and
disks, commits staged cycles into them and manages the recovery points.

**Recovery points.** With N > 0 points, committing a cycle may seal the active layer as a point
(when the point interval has passed, or the cycle is application-consistent): the active layer is
frozen and a new differencing child becomes the active layer. The oldest point is always the
base; when there are more than N points, the layer of the second oldest is merged into the base
and the oldest point is dropped (never while a failover or test failover pins any point: its VM
runs on every layer up to its point, so points accumulate until it is cleaned up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from agent.replication import codes, incoming
from agent.replication.blocks import BLOCK
from agent.replication.incoming import DECODER, Incoming, Refusal, write_blocks
from agent.replication.records import RecordFile
from sitepair import paths, vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound, SitepairError
from sitepair.fsutil import atomic_write, ensure_private_dir, fsync_dir, private_file
from sitepair.logsafe import shown
from sitepair.protoconv import seconds
from sitepair.v1 import replication_pb2
from sitepair.vdisk import ops as vdisk_ops

log = logging.getLogger("sitepair.agent.replica")

FORMAT = 1
#: Block size of the differencing layers we create (Hyper-V uses 2 MiB for AVHDX too).
LAYER_BLOCK = 2 * 1024 * 1024


@dataclasses.dataclass
class DiskState:
    virtual_size: int
    format: str
    logical_sector_size: int
    physical_sector_size: int
    chain: list[str]  # relative to the root; base first, active layer last


@dataclasses.dataclass
class Point:
    sequence: int
    cut_at: float
    sealed_at: float
    app_consistent: bool
    layers: dict[str, str]  # disk id -> layer (relative path) holding the point's top
    pins: list[str] = dataclasses.field(default_factory=list)
    #: Disk id -> hex digest of the point's content when an exact proof first read it (see
    #: agent.replication.failover.prove_test); empty until then. A later proof that reads
    #: another digest has found the point's layers changed at rest.
    proven_digests: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class State:
    relationship: str
    vm_id: str
    epoch: int = 0
    committed_sequence: int = 0
    committed_at: float = 0.0
    cut_at: float = 0.0
    app_consistent: bool = False
    disks: dict[str, DiskState] = dataclasses.field(default_factory=dict)
    points: list[Point] = dataclasses.field(default_factory=list)
    intent: dict[str, Any] | None = None
    #: The failover made from this replica (see agent.replication.failover), if any.
    failover: dict[str, Any] | None = None
    #: Test failovers in place, by tag.
    tests: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = dataclasses.asdict(self)
        doc["format"] = FORMAT
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> State:
        try:
            doc = json.loads(data)
            if doc.pop("format", None) != FORMAT:
                raise ValueError("unknown format")
            doc["disks"] = {k: DiskState(**v) for k, v in doc["disks"].items()}
            doc["points"] = [Point(**p) for p in doc["points"]]
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as exc:
            raise SitepairError(f"replica state {where} is damaged: {exc}") from exc


class ReplicaStore:
    """One relationship's replica. All methods take the store's lock: one operation at a time.

    Besides the operations below, its public surface for the modules that change a replica
    (:mod:`incoming`, :mod:`failover`, :mod:`offline`) is :attr:`state` and :attr:`lock` (change
    the state only with the lock held, then :meth:`save`), :meth:`commit_initial`,
    :meth:`apply_staged`, :meth:`seal` and :meth:`now`.
    """

    def __init__(self, root: Path, state: State, *, clock: Any = None) -> None:
        self.root = root
        self.state = state
        self.lock = threading.RLock()
        self._clock = clock.now if clock is not None else time.time

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        relationship: str,
        vm_id: str,
        epoch: int,
        clock: Any = None,
        adopt: bool = False,
    ) -> ReplicaStore:
        """Open the replica in ``root``, creating it if needed. With ``adopt``, a replica of the
        same VM left by an earlier relationship is taken over (disks and recovery points kept)
        so that a checksum resync, not a full copy, brings it up to date."""
        for folder in (root, root / "disks", root / "staging"):
            # 0700: a replica holds a VM's disks; nobody but the agent's account reads them,
            # wherever the storage folder is (replicas made before this was done included).
            ensure_private_dir(folder)
        state_file = root / "state.json"
        if state_file.exists():
            store = cls.open(root, clock=clock)
            if store.state.relationship != relationship:
                if not adopt or store.state.vm_id != vm_id:
                    raise FailedPrecondition(
                        f"{root} holds the replica of relationship {store.state.relationship} "
                        f"(VM {store.state.vm_id})",
                        hint="choose another folder, or adopt it when it is a replica of this VM",
                    )
                log.info(
                    "adopting an existing replica",
                    extra={
                        "fields": {
                            "from": store.state.relationship,
                            "to": relationship,
                            "sequence": store.state.committed_sequence,
                        }
                    },
                )
                with store.lock:
                    for d in (root / "staging").iterdir():
                        shutil.rmtree(d, ignore_errors=True)
                    store.state.relationship = relationship
                    store.state.epoch = epoch
                    store.save()
            return store
        state = State(relationship=relationship, vm_id=vm_id, epoch=epoch)
        atomic_write(state_file, state.to_json())
        return cls(root, state, clock=clock)

    @classmethod
    def open(cls, root: Path, *, clock: Any = None) -> ReplicaStore:
        path = root / "state.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no replica in {root}") from exc
        store = cls(root, State.from_json(data, path), clock=clock)
        store.recover()
        return store

    def save(self) -> None:
        """Write ``state.json`` atomically. Whoever changes :attr:`state` calls this before
        letting go of :attr:`lock`: the file on disk is the replica's commit record."""
        atomic_write(self.root / "state.json", self.state.to_json())

    def path(self, rel: str) -> Path:
        return self.root / rel

    def now(self) -> float:
        """The store's clock (injected in tests): when a cycle commits, a point is sealed."""
        return self._clock()

    def recover(self) -> None:
        """Finish what a crash interrupted: a committed-but-unapplied cycle, a prune."""
        with self.lock:
            if self.state.intent is not None:
                self._finish_intent()
            staging = self.root / "staging"
            for d in sorted(staging.iterdir()) if staging.exists() else []:
                if not d.name.isdigit():
                    continue
                seq = int(d.name)
                if seq <= self.state.committed_sequence:
                    shutil.rmtree(d, ignore_errors=True)
                elif (d / "COMPLETE").exists() and seq == self.state.committed_sequence + 1:
                    log.warning(
                        "finishing a committed cycle interrupted during apply",
                        extra={
                            "fields": {"relationship": self.state.relationship, "sequence": seq}
                        },
                    )
                    self.apply_staged(d)

    # -- what the sender needs to know ------------------------------------------------------
    def partial(self) -> tuple[int, int, bytes]:
        """(sequence, durable batches, header digest) of a staged, uncommitted cycle, or zeros."""
        with self.lock:
            seq = self.state.committed_sequence + 1
            d = self.root / "staging" / str(seq)
            progress = incoming.read_progress(d)
            if not progress:
                return 0, 0, b""
            return seq, int(progress["acked"]), bytes.fromhex(progress["header_digest"])

    # -- receiving a cycle ------------------------------------------------------------------
    def disk_folder(self, disk_id: str) -> Path:
        """``disks/<disk id>`` of this replica: the id passes the name rule and the folder,
        symlinks resolved, stays inside the replica (sitepair.paths)."""
        try:
            return paths.inside(self.root / "disks", disk_id, what="disk id")
        except InvalidArgument as exc:
            raise Refusal(codes.BAD_HEADER, str(exc)) from exc

    def begin(
        self, header: replication_pb2.CycleHeader, *, granted: Collection[str] = ()
    ) -> Incoming:
        """Check a cycle's header and open its receiving session (:func:`incoming.begin`)."""
        return incoming.begin(self, header, granted=granted)

    # -- applying ---------------------------------------------------------------------------
    def _open_active(self) -> dict[str, vdisk.VirtualDisk]:
        disks: dict[str, vdisk.VirtualDisk] = {}
        try:
            for disk_id, ds in self.state.disks.items():
                disks[disk_id] = vdisk.open_disk(self.path(ds.chain[-1]))
        except BaseException:
            for d in disks.values():
                d.close()
            raise
        return disks

    def apply_staged(self, d: Path) -> int:
        """Apply the staged delta cycle in ``d`` (``COMPLETE`` written) to the active layers
        and record it as committed; redo-safe after a crash. Returns the bytes written. The
        caller holds :attr:`lock`."""
        header = replication_pb2.CycleHeader.FromString((d / "header.bin").read_bytes())
        written = 0
        disks = self._open_active()
        try:
            records = RecordFile(d / "batches.dat")
            try:
                for _, rec in records:
                    batch = replication_pb2.BlockBatch.FromString(rec)
                    written += write_blocks(disks, DECODER.decode(batch), zeros=True)
            finally:
                records.close()
            for disk in disks.values():
                disk.flush()
        finally:
            for disk in disks.values():
                disk.close()
        self._committed(header, d)
        return written

    def _committed(self, header: replication_pb2.CycleHeader, d: Path) -> None:
        st = self.state
        st.committed_sequence = header.sequence
        st.committed_at = self.now()
        st.cut_at = seconds(header.cut_at)
        st.app_consistent = header.app_consistent
        st.epoch = max(st.epoch, header.epoch)
        self.save()
        shutil.rmtree(d, ignore_errors=True)

    def commit_initial(self, header: replication_pb2.CycleHeader, d: Path) -> None:
        """Commit the initial cycle staged in ``d``: its new disk files become the bases of
        the replica's chains. The caller holds :attr:`lock`."""
        st = self.state
        for spec in header.disks:
            fmt = spec.format or "vhdx"
            folder = self.disk_folder(spec.disk_id)
            partial = folder / f"initial-{header.sequence}.{fmt}"
            final = folder / f"base.{fmt}"
            if partial.exists():
                partial.replace(final)
                fsync_dir(folder)
            st.disks[spec.disk_id] = DiskState(
                virtual_size=spec.virtual_size,
                format=fmt,
                logical_sector_size=spec.logical_sector_size or 512,
                physical_sector_size=spec.physical_sector_size or 4096,
                chain=[f"disks/{spec.disk_id}/base.{fmt}"],
            )
        self._committed(header, d)

    # -- recovery points --------------------------------------------------------------------
    def maybe_seal(
        self, *, max_points: int, interval: float, app_consistent: bool, force: bool = False
    ) -> Point | None:
        """After a commit: seal the active layer as a recovery point if one is due."""
        with self.lock:
            st = self.state
            if max_points <= 0 or not st.disks:
                return None
            now = self.now()
            last = st.points[-1] if st.points else None
            due = force or last is None or now - last.sealed_at >= interval or app_consistent
            if not due or (last is not None and last.sequence == st.committed_sequence):
                return None
            point = self.seal(now)
            self.prune(max_points)
            return point

    def seal(self, now: float) -> Point:
        """Seal the active layer of every disk as a recovery point at the committed sequence
        (a new differencing child becomes the active layer); returns the point. The caller
        holds :attr:`lock` and has checked that the committed sequence is not sealed yet."""
        st = self.state
        layers: dict[str, str] = {}
        new_chains: dict[str, list[str]] = {}
        for disk_id, ds in st.disks.items():
            top = ds.chain[-1]
            layers[disk_id] = top
            ext = "avhdx" if ds.format == "vhdx" else "avhd"
            child = f"disks/{disk_id}/p-{st.committed_sequence:09d}.{ext}"
            child_path = self.path(child)
            child_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                child_path.unlink()  # left by a crash before the state named it
            created = vdisk.create_disk(
                child_path,
                format=ds.format,
                subformat=vdisk.SubFormat.DIFFERENCING,
                parent=self.path(top),
                block_size=LAYER_BLOCK if ds.format == "vhdx" else None,
            )
            created.close()
            private_file(child_path)
            new_chains[disk_id] = [*ds.chain, child]
        point = Point(
            sequence=st.committed_sequence,
            cut_at=st.cut_at,
            sealed_at=now,
            app_consistent=st.app_consistent,
            layers=layers,
        )
        for disk_id, chain in new_chains.items():
            st.disks[disk_id].chain = chain
        st.points.append(point)
        self.save()
        log.info(
            "recovery point sealed",
            extra={"fields": {"relationship": st.relationship, "sequence": point.sequence}},
        )
        return point

    def prune(self, max_points: int) -> int:
        """Merge away the oldest points beyond ``max_points``; returns how many were dropped."""
        dropped = 0
        with self.lock:
            st = self.state
            while len(st.points) > max(max_points, 0) and len(st.points) >= 2:
                if any(p.pins for p in st.points):
                    # A pinned point's VM runs on every layer up to its own, the base included,
                    # and a merge rewrites the base and deletes the second oldest layer.
                    break
                st.intent = {"op": "prune", "sequence": st.points[0].sequence}
                self.save()
                self._finish_intent()
                dropped += 1
            if max_points <= 0 and len(st.points) == 1 and not st.points[0].pins:
                # No points wanted: the lone point's layer is the base, nothing to merge.
                st.points = []
                self.save()
        return dropped

    def _finish_intent(self) -> None:
        st = self.state
        intent = st.intent
        if intent is None:
            return
        if intent.get("op") != "prune":
            raise SitepairError(f"unknown pending operation {intent!r} in {self.root}")
        oldest = st.points[0] if st.points else None
        if oldest is None or oldest.sequence != intent["sequence"] or len(st.points) < 2:
            st.intent = None
            self.save()
            return
        second = st.points[1]
        for disk_id, ds in st.disks.items():
            base = oldest.layers[disk_id]  # always the base (chain[0])
            layer = second.layers[disk_id]
            if layer not in ds.chain:
                continue  # merged before a crash
            idx = ds.chain.index(layer)
            above = ds.chain[idx + 1] if idx + 1 < len(ds.chain) else None
            layer_path = self.path(layer)
            if layer_path.exists():
                vdisk_ops.merge(layer_path, relink=[self.path(above)] if above else [])
            elif above is not None:
                vdisk.set_parent(self.path(above), self.path(base))
            ds.chain = [c for c in ds.chain if c != layer]
            self.save()
        second.layers = dict(oldest.layers)
        st.points.pop(0)
        st.intent = None
        self.save()
        log.info(
            "oldest recovery point merged away",
            extra={"fields": {"relationship": st.relationship, "sequence": oldest.sequence}},
        )

    # -- reading ----------------------------------------------------------------------------
    def iter_digest_batches(
        self, disk_id: str, block: int = BLOCK
    ) -> Iterator[replication_pb2.DigestBatch]:
        """The latest committed content of a disk as DigestBatch messages (BLAKE3 per block,
        and which blocks hold data), computed a window at a time so that memory does not grow
        with the disk's virtual size. The caller keeps cycles of the relationship out while
        it iterates (the receiver holds the relationship's busy lock)."""
        with self.lock:
            ds = self.state.disks.get(disk_id)
            if ds is None:
                raise NotFound(f"the replica has no disk {shown(disk_id, 80)}")
            top = self.path(ds.chain[-1])
        with vdisk.open_disk(top, read_only=True) as disk:
            for first, digests, allocated in vdisk_ops.iter_digests(disk, block):
                bits = bytearray((len(digests) + 7) // 8)
                for index in allocated:
                    i = index - first
                    bits[i // 8] |= 1 << (i % 8)
                yield replication_pb2.DigestBatch(
                    disk_id=disk_id,
                    first_block=first,
                    digests=b"".join(digests),
                    allocated=bytes(bits),
                )

    def latest_chain(self, disk_id: str) -> Path:
        ds = self.state.disks[disk_id]
        return self.path(ds.chain[-1])

    def point(self, sequence: int) -> Point:
        for p in self.state.points:
            if p.sequence == sequence:
                return p
        raise NotFound(f"no recovery point at sequence {sequence} in {self.state.relationship}")

    def free_space(self) -> int:
        return shutil.disk_usage(self.root).free

    def remove(self) -> None:
        with self.lock:
            shutil.rmtree(self.root)
