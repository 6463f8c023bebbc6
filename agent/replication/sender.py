"""The sending side of a cycle: read, hash, compress and stream, pipelined across threads.

``ReplicaClient.send_cycle`` streams one cycle to the replica host: the header, then batches
produced by a small thread pool (read the blocks of a batch from the frozen disk chain, find
zero blocks, hash the rest with BLAKE3, compress with zstd when it pays) in order, with a bounded
number of batches in flight so disk, CPU and network overlap, then the trailer. Messages are
serialised once, in the worker threads, and handed to gRPC as bytes.

The replica answers with where to resume (batches it already holds durably from an interrupted
attempt of the same cycle); that answer is checked, and the sender still reads and hashes the
skipped batches so that its cycle digest covers the whole cycle.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from agent.identity import AgentIdentity
from agent.replication import codes
from agent.replication.adapt import CompressionGovernor
from agent.replication.blocks import (
    BLOCK,
    BlockRef,
    CycleDigest,
    EncodedBatch,
    Encoder,
    plan_digest,
)
from agent.replication.throttle import TokenBucket
from sitepair import pki, tickets, vdisk
from sitepair.errors import SitepairError, Unavailable
from sitepair.rpc import REPLICATION_MAX_MESSAGE, channel_options, error_from_rpc
from sitepair.v1 import replication_pb2

log = logging.getLogger("sitepair.agent.sender")

#: Batches encoded ahead of the one being sent.
WINDOW = 8
#: How long to wait for the replica to accept a header.
ACCEPT_TIMEOUT = 120.0


class CycleRefused(SitepairError):
    """The replica refused the cycle; ``code`` says why (ERROR_STALE_EPOCH, ERROR_WRONG_BASE,
    ERROR_DISK_FULL...)."""

    status = "FAILED_PRECONDITION"

    def __init__(self, code: codes.ErrorCode, message: str) -> None:
        super().__init__(f"the replica refused the cycle ({codes.code_name(code)}): {message}")
        self.code = code


@dataclasses.dataclass(frozen=True)
class DiskPlan:
    disk_id: str
    chain_top: Path  # opened read-only: the frozen view of the cut
    virtual_size: int
    format: str
    logical_sector_size: int = 512
    physical_sector_size: int = 4096


@dataclasses.dataclass(frozen=True)
class CyclePlan:
    kind: int
    disks: tuple[DiskPlan, ...]
    batches: tuple[tuple[BlockRef, ...], ...]

    # Cached: the engine's progress callback reads total_bytes on every acknowledgement, and
    # summing a 2 GiB plan's 32768 blocks each time held the GIL for ~1.5 s per initial cycle.
    @functools.cached_property
    def total_bytes(self) -> int:
        return sum(b.length for batch in self.batches for b in batch)

    @functools.cached_property
    def digest(self) -> bytes:
        return plan_digest(self.batches)


@dataclasses.dataclass
class CycleResult:
    sequence: int
    kind: int
    batches: int
    resumed_from: int
    raw_bytes: int = 0  # guest bytes of DATA blocks sent
    wire_bytes: int = 0
    zero_blocks: int = 0
    data_blocks: int = 0
    applied_bytes: int = 0
    seconds: float = 0.0
    throttled_seconds: float = 0.0
    #: Batches the compression governor had compressed / sent as they are (zstd may still have
    #: been skipped for a batch that did not shrink).
    compressed_batches: int = 0
    uncompressed_batches: int = 0
    #: BLAKE3 of every block the cycle covered, by disk and offset (b"" for a zero block).
    block_digests: dict[str, dict[int, bytes]] = dataclasses.field(default_factory=dict)


def read_batch(disks: dict[str, vdisk.VirtualDisk], blocks: Sequence[BlockRef]) -> list[bytes]:
    """Read a batch's blocks, one read per run of contiguous blocks of the same disk."""
    out: list[bytes] = []
    i = 0
    while i < len(blocks):
        j = i + 1
        while (
            j < len(blocks)
            and blocks[j].disk_id == blocks[i].disk_id
            and blocks[j].offset == blocks[j - 1].offset + blocks[j - 1].length
        ):
            j += 1
        start = blocks[i].offset
        data = disks[blocks[i].disk_id].read(
            start, blocks[j - 1].offset + blocks[j - 1].length - start
        )
        for b in blocks[i:j]:
            out.append(data[b.offset - start : b.offset - start + b.length])
        i = j
    return out


class ReplicaClient:
    """A connection to one replica host's receiver, as one source host."""

    def __init__(
        self,
        *,
        identity: AgentIdentity,
        replica_host: str,
        address: str,
        auth: str,
        ticket_provider: Callable[[], str] | None = None,
    ) -> None:
        self.address = address
        self.auth = auth
        self._ticket_provider = ticket_provider
        if auth == "certificate":
            creds = identity.channel_credentials()
        elif auth == "ticket":
            if ticket_provider is None:
                raise SitepairError("ticket authentication needs a ticket provider")
            creds = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem)
        else:
            raise SitepairError(f"unknown replication authentication {auth!r}")
        self._channel = grpc.secure_channel(
            address,
            creds,
            options=channel_options(
                target_name=pki.agent_dns_name(replica_host),
                max_message_bytes=REPLICATION_MAX_MESSAGE,
            ),
        )
        self._cycle = self._channel.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=lambda b: b,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        self._get_state = self._channel.unary_unary(
            "/sitepair.v1.Replication/GetState",
            request_serializer=replication_pb2.ReplicaStateRequest.SerializeToString,
            response_deserializer=replication_pb2.ReplicaState.FromString,
        )
        self._digests = self._channel.unary_stream(
            "/sitepair.v1.Replication/Digests",
            request_serializer=replication_pb2.DigestsRequest.SerializeToString,
            response_deserializer=replication_pb2.DigestBatch.FromString,
        )
        self.peer = f"replica at {address}"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.auth == "ticket":
            assert self._ticket_provider is not None
            return ((tickets.METADATA_KEY, self._ticket_provider()),)
        return ()

    def get_state(
        self, relationship: str, *, timeout: float = 30.0
    ) -> replication_pb2.ReplicaState:
        try:
            state: replication_pb2.ReplicaState = self._get_state(
                replication_pb2.ReplicaStateRequest(relationship_id=relationship),
                timeout=timeout,
                metadata=self._metadata(),
            )
            return state
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer=self.peer) from None

    def digests(
        self, relationship: str, disk_id: str, *, epoch: int, block: int = BLOCK
    ) -> tuple[list[bytes], set[int]]:
        """The replica's per-block digests of a disk and which blocks it has allocated."""
        digests: list[bytes] = []
        allocated: set[int] = set()
        try:
            for batch in self._digests(
                replication_pb2.DigestsRequest(
                    relationship_id=relationship, disk_id=disk_id, block_size=block, epoch=epoch
                ),
                metadata=self._metadata(),
                timeout=3600,
            ):
                if batch.first_block != len(digests) or len(batch.digests) % 32:
                    raise SitepairError("the replica sent digests out of order")
                n = len(batch.digests) // 32
                for i in range(n):
                    digests.append(batch.digests[i * 32 : (i + 1) * 32])
                    if batch.allocated[i // 8] >> (i % 8) & 1:
                        allocated.add(batch.first_block + i)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer=self.peer) from None
        return digests, allocated

    def send_cycle(
        self,
        header: replication_pb2.CycleHeader,
        plan: CyclePlan,
        *,
        compress: bool,
        adaptive: bool = True,
        buckets: Sequence[TokenBucket] = (),
        progress: Callable[[int, int], None] | None = None,
        threads: int = 2,
    ) -> CycleResult:
        """Send one cycle and wait until the replica has committed it.

        ``header`` carries the relationship, sequence, base, epoch and kind; the plan's disks,
        digest and batch count are filled in here. Raises CycleRefused when the replica says
        no, or a SitepairError (Unavailable, ...) when the stream breaks; an interrupted cycle
        is resumed by calling again with the same plan. With ``compress`` and ``adaptive``,
        batches are compressed only when that delivers more per second (see adapt.py)."""
        head = replication_pb2.CycleHeader()
        head.CopyFrom(header)
        del head.disks[:]
        for d in plan.disks:
            head.disks.add(
                disk_id=d.disk_id,
                virtual_size=d.virtual_size,
                format=d.format,
                block_size=BLOCK,
                logical_sector_size=d.logical_sector_size,
                physical_sector_size=d.physical_sector_size,
            )
        head.plan_digest = plan.digest
        head.batch_count = len(plan.batches)
        head.total_bytes = plan.total_bytes
        result = CycleResult(
            sequence=head.sequence, kind=head.kind, batches=len(plan.batches), resumed_from=0
        )
        accepted: queue.Queue[int | None] = queue.Queue()
        stop = threading.Event()
        failure: list[BaseException] = []
        started = time.monotonic()
        disks = {d.disk_id: vdisk.open_disk(d.chain_top, read_only=True) for d in plan.disks}
        encoder = Encoder(compress=compress)
        governor = CompressionGovernor(enabled=compress, adaptive=adaptive, window=WINDOW)
        pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="encode")

        def encode(i: int) -> EncodedBatch:
            blocks = plan.batches[i]
            datas = read_batch(disks, blocks)
            return encoder.encode(i, blocks, datas, compress=governor.want(i))

        def summarize(i: int) -> EncodedBatch:
            blocks = plan.batches[i]
            return encoder.summarize(i, blocks, read_batch(disks, blocks))

        def requests() -> Iterator[bytes]:
            try:
                yield replication_pb2.CycleMessage(header=head).SerializeToString()
                try:
                    resume = accepted.get(timeout=ACCEPT_TIMEOUT)
                except queue.Empty:
                    raise Unavailable(
                        f"{self.peer} did not accept the cycle header in time"
                    ) from None
                if resume is None or stop.is_set():
                    return
                if not 0 <= resume <= len(plan.batches):
                    raise SitepairError(
                        f"{self.peer} asked to resume at batch {resume} of {len(plan.batches)}; "
                        "refusing its resume state"
                    )
                result.resumed_from = resume
                digest = CycleDigest()
                blocks = data_bytes = 0

                def account(eb: EncodedBatch) -> None:
                    nonlocal blocks, data_bytes
                    for ref, (kind, dg) in zip(
                        plan.batches[eb.index], eb.kinds_digests, strict=True
                    ):
                        digest.add(ref, kind, dg)
                        result.block_digests.setdefault(ref.disk_id, {})[ref.offset] = dg
                        blocks += 1
                        if kind == replication_pb2.Block.DATA:
                            data_bytes += ref.length

                for eb in pool.map(summarize, range(resume)):
                    account(eb)
                pending: dict[int, concurrent.futures.Future[EncodedBatch]] = {}
                nxt = resume
                for i in range(resume, len(plan.batches)):
                    while nxt < len(plan.batches) and nxt < i + WINDOW:
                        pending[nxt] = pool.submit(encode, nxt)
                        nxt += 1
                    eb = pending.pop(i).result()
                    if stop.is_set():
                        return
                    account(eb)
                    for bucket in buckets:
                        result.throttled_seconds += bucket.consume(eb.wire_bytes)
                    result.raw_bytes += eb.raw_bytes
                    result.wire_bytes += eb.wire_bytes
                    result.zero_blocks += eb.zero_blocks
                    result.data_blocks += eb.data_blocks
                    governor.delivered(i, eb.raw_bytes, time.monotonic())
                    yield eb.message
                trailer = replication_pb2.CycleTrailer(
                    batch_count=len(plan.batches),
                    block_count=blocks,
                    data_bytes=data_bytes,
                    cycle_digest=digest.digest(),
                )
                yield replication_pb2.CycleMessage(trailer=trailer).SerializeToString()
            except BaseException as exc:
                failure.append(exc)
                raise

        try:
            call = self._cycle(requests(), metadata=self._metadata())
            for reply in call:
                kind = reply.WhichOneof("body")
                if kind == "accepted":
                    accepted.put(reply.accepted.resume_from_batch)
                elif kind == "batch_ack":
                    if progress is not None:
                        progress(reply.batch_ack.index, len(plan.batches))
                elif kind == "committed":
                    if reply.committed.sequence != head.sequence:
                        raise SitepairError(
                            f"{self.peer} committed {reply.committed.sequence}, not {head.sequence}"
                        )
                    result.applied_bytes = reply.committed.applied_bytes
                    result.compressed_batches = governor.compressed
                    result.uncompressed_batches = governor.skipped
                    result.seconds = time.monotonic() - started
                    if progress is not None:
                        progress(len(plan.batches), len(plan.batches))
                    return result
                elif kind == "refused":
                    raise CycleRefused(reply.refused.code, reply.refused.message)
            if failure and isinstance(failure[0], SitepairError):
                raise failure[0]
            raise Unavailable(f"{self.peer} ended the cycle without committing it")
        except grpc.RpcError as exc:
            if failure and isinstance(failure[0], SitepairError):
                raise failure[0] from None
            raise error_from_rpc(exc, peer=self.peer) from None
        finally:
            stop.set()
            accepted.put(None)
            pool.shutdown(wait=True, cancel_futures=True)
            for disk in disks.values():
                disk.close()
