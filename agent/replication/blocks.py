"""Blocks and batches: how a cycle's data is cut up, encoded, checked and summarised.

A cycle carries blocks of at most :data:`BLOCK` bytes (the change-tracking granularity),
aligned to it, grouped into batches of about :data:`BATCH_TARGET` bytes of guest data. Each
block travels as DATA (its bytes are part of the batch payload, with the BLAKE3 digest of the
uncompressed bytes) or ZERO (no bytes at all). A batch's payload is the concatenation of its DATA
blocks, compressed with zstd when that pays.

Both sides compute the same two digests:

* the **plan digest**, over every block's (disk, offset, length): it names the layout of the
  cycle, so a receiver resumes an interrupted cycle only if the sender is sending the same one;
* the **cycle digest**, over every block's (disk, offset, length, kind, data digest): the trailer
  carries the sender's, and the receiver commits only if its own matches.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence

import blake3
import zstandard

from sitepair.errors import SitepairError
from sitepair.v1 import replication_pb2

BLOCK = 64 * 1024
BATCH_TARGET = 1024 * 1024
#: The most a batch may claim to decompress to (a batch is ~1 MiB; anything bigger is refused
#: before a byte is decompressed, so a hostile sender cannot make the receiver allocate).
MAX_BATCH_RAW = 4 * 1024 * 1024
#: Compressed output must be at most this fraction of the input, or the batch travels raw.
COMPRESS_WORTH = 0.92
ZSTD_LEVEL = 1
DIGEST_SIZE = 32

_ZEROS = bytes(BLOCK)
_LAYOUT = struct.Struct("<QI")


class BadBatch(SitepairError):
    """A batch failed verification: wrong digest, size, index or encoding. Never applied."""

    status = "DATA_LOSS"


@dataclasses.dataclass(frozen=True, slots=True)
class BlockRef:
    disk_id: str
    offset: int
    length: int


def blocks_for(
    disk_id: str, ranges: Iterable[tuple[int, int]], virtual_size: int, *, block: int = BLOCK
) -> Iterator[BlockRef]:
    """Aligned blocks covering ``ranges`` (sorted, may overlap or touch), each once."""
    next_free = 0
    for off, length in ranges:
        if length <= 0:
            continue
        start = max((off // block) * block, next_free)
        end = min(-(-(off + length) // block) * block, virtual_size)
        pos = start
        while pos < end:
            n = min(block, virtual_size - pos)
            yield BlockRef(disk_id, pos, n)
            pos += block
        next_free = max(next_free, end)


def group(blocks: Iterable[BlockRef], *, target: int = BATCH_TARGET) -> list[list[BlockRef]]:
    """Consecutive blocks grouped into batches of at most ``target`` guest bytes."""
    out: list[list[BlockRef]] = []
    cur: list[BlockRef] = []
    size = 0
    for b in blocks:
        if cur and size + b.length > target:
            out.append(cur)
            cur, size = [], 0
        cur.append(b)
        size += b.length
    if cur:
        out.append(cur)
    return out


def _layout_bytes(b: BlockRef) -> bytes:
    return b.disk_id.encode() + b"\0" + _LAYOUT.pack(b.offset, b.length)


def plan_digest(batches: Sequence[Sequence[BlockRef]]) -> bytes:
    h = blake3.blake3()
    for batch in batches:
        h.update(b"B")
        for b in batch:
            h.update(_layout_bytes(b))
    return h.digest()


class CycleDigest:
    """Running digest over the blocks of a cycle, in order."""

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def add(self, b: BlockRef, kind: int, digest: bytes) -> None:
        self._h.update(_layout_bytes(b) + bytes([kind]) + digest)

    def digest(self) -> bytes:
        return self._h.digest()


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n == BLOCK:
        return data == _ZEROS
    return data == _ZEROS[:n] if n < BLOCK else data == bytes(n)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: Wire tags (field number << 3 | length-delimited) of CycleMessage.batch and BlockBatch.payload.
_BATCH_TAG = bytes([2 << 3 | 2])
_PAYLOAD_TAG = bytes([4 << 3 | 2])


def _batch_message(head: bytes, payload: Sequence[bytes]) -> bytes:
    """``CycleMessage{batch=...}`` serialized, from the batch serialized without its payload
    (``head``) and the payload's pieces, joined once.

    A protobuf message is the concatenation of its fields in any order, so appending the
    payload field to ``head`` is the same message that setting ``batch.payload`` and
    serializing would give; building it here copies the ~1 MiB payload once instead of three
    times (into the message, into the CycleMessage, out again), and allocates one large buffer
    instead of several (large allocations are what glibc's default malloc makes slow)."""
    size = sum(len(p) for p in payload)
    if size:
        field = [_PAYLOAD_TAG, _varint(size)]
        body = len(head) + 1 + len(field[1]) + size
    else:
        field, body = [], len(head)  # proto3 leaves an empty bytes field out
    return b"".join([_BATCH_TAG, _varint(body), head, *field, *payload])


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    index: int
    message: bytes  # a serialized CycleMessage{batch=...}, ready for the wire
    raw_bytes: int  # guest bytes of DATA blocks
    wire_bytes: int
    zero_blocks: int
    data_blocks: int
    kinds_digests: tuple[tuple[int, bytes], ...]  # per block, for the cycle digest


class Encoder:
    """Turns blocks read from a disk into wire-ready batches. One per thread (zstd contexts are
    not shared between threads)."""

    def __init__(self, *, compress: bool, level: int = ZSTD_LEVEL) -> None:
        self._compress = compress
        self._local = threading.local()
        self._level = level

    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self._level, write_content_size=False)
            self._local.c = c
        return c

    def encode(
        self,
        index: int,
        blocks: Sequence[BlockRef],
        datas: Sequence[bytes],
        *,
        compress: bool | None = None,
    ) -> EncodedBatch:
        """``compress`` overrides the encoder's setting for this batch (the adaptive
        governor's choice); zstd is used only where it pays even then."""
        batch = replication_pb2.BlockBatch(index=index)
        parts: list[bytes] = []
        kinds: list[tuple[int, bytes]] = []
        zeros = 0
        for b, data in zip(blocks, datas, strict=True):
            if len(data) != b.length:
                raise BadBatch(f"read {len(data)} bytes for a {b.length}-byte block")
            if is_zero(data):
                batch.blocks.add(
                    disk_id=b.disk_id,
                    offset=b.offset,
                    length=b.length,
                    kind=replication_pb2.Block.ZERO,
                )
                kinds.append((replication_pb2.Block.ZERO, b""))
                zeros += 1
                continue
            digest = blake3.blake3(data).digest()
            batch.blocks.add(
                disk_id=b.disk_id,
                offset=b.offset,
                length=b.length,
                kind=replication_pb2.Block.DATA,
                digest=digest,
            )
            kinds.append((replication_pb2.Block.DATA, digest))
            parts.append(data)
        raw_length = sum(len(p) for p in parts)
        batch.raw_length = raw_length
        payload: list[bytes] = parts
        batch.codec = replication_pb2.CODEC_NONE
        if (self._compress if compress is None else compress) and raw_length:
            packed = self._compressor().compress(b"".join(parts))
            if len(packed) <= raw_length * COMPRESS_WORTH:
                payload = [packed]
                batch.codec = replication_pb2.CODEC_ZSTD
        message = _batch_message(batch.SerializeToString(), payload)
        return EncodedBatch(
            index=index,
            message=message,
            raw_bytes=raw_length,
            wire_bytes=len(message),
            zero_blocks=zeros,
            data_blocks=len(parts),
            kinds_digests=tuple(kinds),
        )

    def summarize(
        self, index: int, blocks: Sequence[BlockRef], datas: Sequence[bytes]
    ) -> EncodedBatch:
        """What :meth:`encode` would report for the cycle digest, without compressing or
        building a message (for batches the receiver already holds)."""
        kinds: list[tuple[int, bytes]] = []
        raw = zeros = 0
        for b, data in zip(blocks, datas, strict=True):
            if len(data) != b.length:
                raise BadBatch(f"read {len(data)} bytes for a {b.length}-byte block")
            if is_zero(data):
                kinds.append((replication_pb2.Block.ZERO, b""))
                zeros += 1
            else:
                kinds.append((replication_pb2.Block.DATA, blake3.blake3(data).digest()))
                raw += b.length
        return EncodedBatch(
            index=index,
            message=b"",
            raw_bytes=raw,
            wire_bytes=0,
            zero_blocks=zeros,
            data_blocks=len(blocks) - zeros,
            kinds_digests=tuple(kinds),
        )


@dataclasses.dataclass(frozen=True)
class DecodedBlock:
    ref: BlockRef
    kind: int
    data: memoryview | None  # None for ZERO
    digest: bytes


class Decoder:
    """Verifies batches as they arrive; one per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = zstandard.ZstdDecompressor()
            self._local.d = d
        return d

    def _decompress(self, payload: bytes, limit: int, index: int) -> bytes:
        """Decompress at most ``limit`` bytes, whatever the frames claim.

        ``ZstdDecompressor.decompress(max_output_size=...)`` is no cap: when a frame declares
        its content size, python-zstandard allocates and decodes that size (a 32 KiB frame
        declaring 1 GiB took 1 GiB). So a frame that declares a size other than the batch's is
        refused before anything is allocated, and the output is read from a streaming reader
        that never returns more than ``limit + 1`` bytes (one more, to notice a payload that
        holds more than it should, in further frames too)."""
        try:
            declared = zstandard.get_frame_parameters(payload).content_size
        except zstandard.ZstdError as exc:
            raise BadBatch(f"batch {index} is not a zstd frame: {exc}") from exc
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, limit):
            raise BadBatch(
                f"batch {index}: its zstd frame declares {declared} bytes, the batch {limit}"
            )
        try:
            with self._decompressor().stream_reader(payload, read_across_frames=True) as reader:
                raw: bytes = reader.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise BadBatch(f"batch {index} does not decompress: {exc}") from exc
        return raw

    def decode(
        self, batch: replication_pb2.BlockBatch, *, expected: Sequence[BlockRef] | None = None
    ) -> list[DecodedBlock]:
        """Decompress (bounded) and check every block's size and digest; raise BadBatch."""
        if batch.raw_length > MAX_BATCH_RAW:
            raise BadBatch(
                f"batch {batch.index} claims {batch.raw_length} bytes (more than {MAX_BATCH_RAW})"
            )
        if batch.codec == replication_pb2.CODEC_NONE:
            raw = batch.payload
        elif batch.codec == replication_pb2.CODEC_ZSTD:
            raw = self._decompress(batch.payload, batch.raw_length, batch.index)
        else:
            raise BadBatch(f"batch {batch.index} uses an unknown codec {batch.codec}")
        if len(raw) != batch.raw_length:
            raise BadBatch(
                f"batch {batch.index} holds {len(raw)} bytes, its header says {batch.raw_length}"
            )
        if expected is not None and len(expected) != len(batch.blocks):
            raise BadBatch(
                f"batch {batch.index} has {len(batch.blocks)} blocks, the plan {len(expected)}"
            )
        view = memoryview(raw)
        pos = 0
        out: list[DecodedBlock] = []
        for i, blk in enumerate(batch.blocks):
            ref = BlockRef(blk.disk_id, blk.offset, blk.length)
            if expected is not None and ref != expected[i]:
                raise BadBatch(
                    f"batch {batch.index} block {i} is {ref}, the plan says {expected[i]}"
                )
            if blk.length <= 0 or blk.length > BLOCK:
                raise BadBatch(f"batch {batch.index} block {i} has length {blk.length}")
            if blk.kind == replication_pb2.Block.ZERO:
                out.append(DecodedBlock(ref, blk.kind, None, b""))
                continue
            if blk.kind != replication_pb2.Block.DATA:
                raise BadBatch(f"batch {batch.index} block {i} has unknown kind {blk.kind}")
            data = view[pos : pos + blk.length]
            if len(data) != blk.length:
                raise BadBatch(f"batch {batch.index} payload is shorter than its blocks")
            pos += blk.length
            if blake3.blake3(data).digest() != blk.digest:
                raise BadBatch(
                    f"batch {batch.index}: block at offset {blk.offset} of disk {blk.disk_id} "
                    "does not match its digest (corrupted in transit?)"
                )
            out.append(DecodedBlock(ref, blk.kind, data, bytes(blk.digest)))
        if pos != len(raw):
            raise BadBatch(f"batch {batch.index} payload has {len(raw) - pos} bytes no block uses")
        return out
