"""Receiving one cycle into a replica: the header checked, the batches staged, the commit.

:func:`begin` checks a cycle's header against the replica (:class:`agent.replication.replica.
ReplicaStore`) and opens its staging folder, ``staging/<seq>`` (layout in that module), resuming
a cycle staged earlier when the sender sends the same header again. :class:`Incoming` takes the
batches: each is verified against its digests before it is written, and made durable before it
is acknowledged. :meth:`Incoming.finish` checks the trailer (counts and the cycle digest), writes
``COMPLETE`` (the commit point) and hands the staged cycle to the store to commit:
:meth:`ReplicaStore.commit_initial` for an initial cycle, written straight into new disks, or
:meth:`ReplicaStore.apply_staged` for a delta cycle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from agent.replication import codes
from agent.replication.blocks import BadBatch, BlockRef, CycleDigest, DecodedBlock, Decoder
from agent.replication.records import RecordFile
from sitepair import vdisk
from sitepair.errors import SitepairError
from sitepair.fsutil import atomic_write, ensure_private_dir, fsync_dir, private_file
from sitepair.logsafe import shown
from sitepair.v1 import replication_pb2

if TYPE_CHECKING:
    from agent.replication.replica import ReplicaStore

log = logging.getLogger("sitepair.agent.replica")

#: Free space kept in reserve beyond what a cycle needs, before it is committed.
SPACE_MARGIN = 64 * 1024 * 1024
#: Acknowledge (make durable) after this many batches (~1 MiB each), then after twice as many
#: each time, up to ACK_MAX. Each point costs about six fsyncs (the disk's data, log entry and
#: metadata, the records, progress.json and its folder): at a fixed 8 batches they took a
#: fifth of the receiver's time in a 2 GiB initial cycle. Small cycles still get early resume
#: points; an interrupted large cycle resends at most ACK_MAX batches, and a stream that ends
#: early still makes everything it received durable (see :meth:`Incoming.abort`).
#: Between acknowledgement points every batch's writes are handed to the kernel's writeback at
#: once (``start_writeback``), so the disk works while batches arrive and the fsync at the next
#: point finds little left: without it, on ext4, the writes between fsyncs stalled behind each
#: fsync's journal commit, and a 2 GiB initial cycle took 15-20 % longer (docs/benchmarks.md).
ACK_FIRST = 8
ACK_MAX = 64
#: One decoder for every replica of the process: it keeps a zstd context per thread (with
#: its window buffer, about a MiB once used). A decoder per replica kept one per replica and
#: receiver thread, for as long as the process lived: 3,000 relationships fuzzed through a
#: receiver grew it by a GiB.
DECODER = Decoder()
#: Most disks one VM's cycle may carry (Hyper-V allows 4 IDE + 4 x 64 SCSI).
MAX_DISKS = 260
#: The VHDX format's largest virtual size (64 TiB).
MAX_VIRTUAL_SIZE = 64 << 40


class Refusal(SitepairError):
    """A cycle the replica will not take; ``code`` goes back to the sender in ``Refused``."""

    status = "FAILED_PRECONDITION"

    def __init__(self, code: codes.ErrorCode, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def header_digest(header: replication_pb2.CycleHeader) -> bytes:
    return blake3.blake3(header.SerializeToString(deterministic=True)).digest()


def begin(
    store: ReplicaStore,
    header: replication_pb2.CycleHeader,
    *,
    granted: Collection[str] = (),
) -> Incoming:
    """Validate a cycle header against the replica; return the receiving session (which
    knows from which batch to resume). ``granted`` are the disk ids of the grant: the
    only ones a cycle may name (empty for a grant from an older broker: then the disks
    the replica holds, or for an initial cycle any ids that pass the name rule)."""
    with store.lock:
        st = store.state
        if header.relationship_id != st.relationship:
            raise Refusal(codes.WRONG_RELATIONSHIP, f"this replica belongs to {st.relationship}")
        if header.epoch < st.epoch:
            raise Refusal(
                codes.STALE_EPOCH,
                f"cycle epoch {header.epoch} is older than the replica's epoch {st.epoch}: "
                "this source was failed over from and is fenced",
            )
        if (
            header.sequence != st.committed_sequence + 1
            or header.base_sequence != st.committed_sequence
        ):
            raise Refusal(
                codes.WRONG_BASE,
                f"cycle {header.sequence} needs base {header.base_sequence}, "
                f"the replica holds {st.committed_sequence}",
            )
        initial = header.kind == replication_pb2.INITIAL
        names = [spec.disk_id for spec in header.disks]
        if len(set(names)) != len(names) or not names:
            raise Refusal(codes.BAD_HEADER, "a cycle must name each of its disks exactly once")
        if len(names) > MAX_DISKS:
            raise Refusal(codes.BAD_HEADER, f"a cycle may carry at most {MAX_DISKS} disks")
        for spec in header.disks:
            store.disk_folder(spec.disk_id)
            if granted and spec.disk_id not in granted:
                raise Refusal(
                    codes.WRONG_DISKS,
                    f"disk {shown(spec.disk_id, 80)} is not a disk of this relationship's "
                    f"grant ({', '.join(sorted(granted))})",
                    hint="the broker's inventory of the VM may be out of date: refresh the "
                    "primary host",
                )
            if (
                spec.virtual_size <= 0
                or spec.virtual_size > MAX_VIRTUAL_SIZE
                or spec.virtual_size % 512
            ):
                raise Refusal(
                    codes.BAD_HEADER,
                    f"disk {spec.disk_id} claims a virtual size of {spec.virtual_size} bytes",
                )
        if initial and granted and set(names) != set(granted):
            raise Refusal(
                codes.WRONG_DISKS,
                f"the initial cycle carries disks {', '.join(sorted(names))}; the grant "
                f"names {', '.join(sorted(granted))}",
            )
        if initial and st.disks:
            raise Refusal(codes.WRONG_BASE, "an initial cycle was sent to a replica that has disks")
        if not initial:
            if not st.disks:
                raise Refusal(
                    codes.WRONG_BASE, "the replica has no disks yet: send an initial cycle"
                )
            for spec in header.disks:
                disk = st.disks.get(spec.disk_id)
                if disk is None or disk.virtual_size != spec.virtual_size:
                    raise Refusal(
                        codes.WRONG_DISKS, f"disk {spec.disk_id} does not match the replica"
                    )
        if header.batch_count > 10_000_000:
            raise Refusal(codes.BAD_HEADER, "absurd batch count")
        # A higher epoch is recorded only when this cycle commits (_committed): a refused
        # or abandoned cycle must not fence the real source.
        d = store.root / "staging" / str(header.sequence)
        digest = header_digest(header)
        progress = read_progress(d)
        ensure_private_dir(d.parent)
        if progress and progress.get("header_digest") != digest.hex():
            log.info(
                "discarding a staged cycle the sender no longer sends",
                extra={"fields": {"relationship": st.relationship, "sequence": header.sequence}},
            )
            shutil.rmtree(d)
            progress = None
        if (d / "COMPLETE").exists() and progress:
            return Incoming(store, header, d, resume=int(progress["acked"]), complete=True)
        if not progress:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o700)
            (d / "header.bin").write_bytes(header.SerializeToString())
            if initial:
                _create_initial_disks(store, header, d)
            progress = {"header_digest": digest.hex(), "acked": 0, "records": 0}
            atomic_write(d / "progress.json", json.dumps(progress).encode())
            fsync_dir(d.parent)
        return Incoming(
            store, header, d, resume=int(progress["acked"]), records=int(progress["records"])
        )


def _create_initial_disks(
    store: ReplicaStore, header: replication_pb2.CycleHeader, d: Path
) -> None:
    for spec in header.disks:
        fmt = spec.format or "vhdx"
        if fmt not in ("vhdx", "vhd"):
            raise Refusal(codes.BAD_HEADER, f"disk {spec.disk_id}: unsupported format {fmt!r}")
        target = ensure_private_dir(store.disk_folder(spec.disk_id))
        path = target / f"initial-{header.sequence}.{fmt}"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        options: dict[str, Any] = {}
        if fmt == "vhdx":
            options = {
                "logical_sector_size": spec.logical_sector_size or 512,
                "physical_sector_size": spec.physical_sector_size or 4096,
            }
        disk = vdisk.create_disk(
            path,
            format=fmt,
            subformat=vdisk.SubFormat.DYNAMIC,
            size=spec.virtual_size,
            **options,
        )
        disk.close()
        private_file(path)


class Incoming:
    """Receiving one cycle: batches in, durable acknowledgements out, trailer, commit."""

    def __init__(
        self,
        store: ReplicaStore,
        header: replication_pb2.CycleHeader,
        staging: Path,
        *,
        resume: int,
        records: int = 0,
        complete: bool = False,
    ) -> None:
        self.store = store
        self.header = header
        self.staging = staging
        self.resume = resume
        self.complete = complete
        self.direct = header.kind == replication_pb2.INITIAL
        self.next_index = resume
        self.acked = resume
        self._ack_gap = ACK_FIRST
        self._digest = CycleDigest()
        self._blocks = 0
        self._data_bytes = 0
        self._disks: dict[str, vdisk.VirtualDisk] = {}
        self._records = RecordFile(staging / "batches.dat")
        if not complete:
            self._records.truncate_to(records)
        # Rebuild the running totals from what is already durable.
        for _, rec in self._records:
            batch = replication_pb2.BlockBatch.FromString(rec)
            for blk in batch.blocks:
                self._account(
                    BlockRef(blk.disk_id, blk.offset, blk.length), blk.kind, bytes(blk.digest)
                )
        if self.direct and not complete:
            for spec in header.disks:
                fmt = spec.format or "vhdx"
                self._disks[spec.disk_id] = vdisk.open_disk(
                    store.disk_folder(spec.disk_id) / f"initial-{header.sequence}.{fmt}"
                )

    def _account(self, ref: BlockRef, kind: int, digest: bytes) -> None:
        self._digest.add(ref, kind, digest)
        self._blocks += 1
        if kind == replication_pb2.Block.DATA:
            self._data_bytes += ref.length

    def add(self, batch: replication_pb2.BlockBatch) -> bool:
        """Verify and keep one batch; True if an acknowledgement point was reached (call
        :meth:`make_durable` then ack ``self.acked``)."""
        if self.complete:
            raise Refusal(codes.PROTOCOL, "the cycle is already complete")
        if batch.index != self.next_index:
            raise Refusal(codes.PROTOCOL, f"expected batch {self.next_index}, got {batch.index}")
        decoded = DECODER.decode(batch)
        sizes = {s.disk_id: s.virtual_size for s in self.header.disks}
        for blk in decoded:
            size = sizes.get(blk.ref.disk_id)
            if size is None:
                raise BadBatch(
                    f"batch {batch.index} names disk {blk.ref.disk_id}, not in this cycle"
                )
            if blk.ref.offset < 0 or blk.ref.offset + blk.ref.length > size:
                raise BadBatch(
                    f"batch {batch.index} writes beyond the end of disk {blk.ref.disk_id}"
                )
        if self.direct:
            write_blocks(self._disks, decoded, zeros=False)  # a new disk reads as zeros already
            meta = replication_pb2.BlockBatch(index=batch.index, blocks=batch.blocks, raw_length=0)
            self._records.append(meta.SerializeToString())
        else:
            self._records.append(batch.SerializeToString())
            self._records.start_writeback()
        for blk in decoded:
            self._account(blk.ref, blk.kind, blk.digest)
        self.next_index += 1
        return self.next_index - self.acked >= self._ack_gap

    def make_durable(self) -> int:
        """Flush what was received; returns the number of batches now durable."""
        if self.next_index == self.acked:
            return self.acked
        for disk in self._disks.values():
            disk.flush()
        self._records.sync()
        progress = {
            "header_digest": header_digest(self.header).hex(),
            "acked": self.next_index,
            "records": self._records.size,
        }
        atomic_write(self.staging / "progress.json", json.dumps(progress).encode())
        self.acked = self.next_index
        self._ack_gap = min(self._ack_gap * 2, ACK_MAX)
        return self.acked

    def finish(self, trailer: replication_pb2.CycleTrailer) -> int:
        """Check the trailer, commit, apply; returns the guest bytes applied."""
        store = self.store
        with store.lock:
            if not self.complete:
                self.make_durable()
                if (
                    trailer.batch_count != self.next_index
                    or trailer.batch_count != self.header.batch_count
                ):
                    raise Refusal(
                        codes.INCOMPLETE,
                        f"trailer says {trailer.batch_count} batches, {self.next_index} arrived, "
                        f"the header announced {self.header.batch_count}",
                    )
                if trailer.block_count != self._blocks or trailer.data_bytes != self._data_bytes:
                    raise Refusal(
                        codes.BAD_DIGEST, "the trailer's block or byte count does not match"
                    )
                if trailer.cycle_digest != self._digest.digest():
                    raise Refusal(codes.BAD_DIGEST, "the cycle digest does not match what arrived")
                if not self.direct:
                    need = self._data_bytes + SPACE_MARGIN
                    free = store.free_space()
                    if free < need:
                        raise Refusal(
                            codes.DISK_FULL,
                            f"the replica's disk has {free >> 20} MiB free; this cycle needs "
                            f"{need >> 20} MiB to be applied safely",
                            hint="free space on the recovery host; replication resumes by itself",
                        )
                self.close_disks()
                atomic_write(self.staging / "COMPLETE", trailer.SerializeToString())
                fsync_dir(self.staging)
                self.complete = True
            self._records.close()
            if self.direct:
                store.commit_initial(self.header, self.staging)
                return self._data_bytes
            return store.apply_staged(self.staging)

    def close_disks(self) -> None:
        for disk in self._disks.values():
            disk.close()
        self._disks.clear()

    def abort(self) -> None:
        """The stream ended early: keep what is durable for a resume, release files."""
        with contextlib.suppress(SitepairError, OSError):
            self.make_durable()
        self.close_disks()
        self._records.close()


def write_blocks(
    disks: dict[str, vdisk.VirtualDisk], blocks: list[DecodedBlock], *, zeros: bool
) -> int:
    """Write decoded blocks; consecutive DATA blocks of one disk go in one write (a 1 MiB write
    costs the VHDX driver ~0.2 ms, sixteen 64 KiB writes ~0.33 ms). ZERO blocks are written as
    zeroes when ``zeros``, skipped otherwise. Then start the writeback of every disk written
    (see ACK_FIRST). Returns the DATA bytes written."""
    written = 0
    touched: set[str] = set()
    i = 0
    while i < len(blocks):
        blk = blocks[i]
        disk = disks[blk.ref.disk_id]
        if blk.data is None:
            if zeros:
                disk.write_zeroes(blk.ref.offset, blk.ref.length)
                touched.add(blk.ref.disk_id)
            i += 1
            continue
        j = i + 1
        end = blk.ref.offset + blk.ref.length
        while (
            j < len(blocks)
            and blocks[j].data is not None
            and blocks[j].ref.disk_id == blk.ref.disk_id
            and blocks[j].ref.offset == end
        ):
            end += blocks[j].ref.length
            j += 1
        if j == i + 1:
            disk.write(blk.ref.offset, blk.data)
        else:
            disk.write(blk.ref.offset, b"".join(b.data for b in blocks[i:j] if b.data is not None))
        written += end - blk.ref.offset
        touched.add(blk.ref.disk_id)
        i = j
    for disk_id in touched:
        disks[disk_id].start_writeback()
    return written


def read_progress(staging: Path) -> dict[str, Any] | None:
    """The ``progress.json`` of a staged cycle (durable batches, header digest), or None."""
    try:
        doc = json.loads((staging / "progress.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
