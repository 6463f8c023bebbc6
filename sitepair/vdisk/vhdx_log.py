"""The VHDX metadata log ([MS-VHDX] 2.3): entries, the active-sequence search, replay.

The log is a ring buffer of 4 KiB sectors at ``LogOffset`` (``LogLength`` bytes). An entry is one
or more descriptor sectors (a 64-byte header, then 32-byte data or zero descriptors) followed by
one data sector per data descriptor. An entry may wrap around the end of the ring.

Reading: :func:`find_active_sequence` follows the procedure of section 2.3.3 step by step (the
candidate sequence, the current and old tail, the 4 KiB advance over invalid entries and the stop
when the tail wraps), validating every entry as section 2.3.1 asks: signature, CRC-32C over the
whole entry, LogGuid, sequence numbers in every descriptor and data sector, 4 KiB/1 MiB
alignments. We are stricter than the letter of the spec in one place: an entry whose descriptors
would write into the file identifier or headers (the first 192 KiB, which the spec forbids the log
to touch), into the log itself, or beyond 128 TiB is not valid.

Replaying builds an :class:`Overlay` - the replayed sectors and zeroed ranges as an interval map -
which a writable open writes into the file and a read-only open lays over every read, so a
read-only reader sees the image as if replayed without changing a byte of it.

Writing: :class:`LogWriter` appends one entry at a time after the previous one (wrapping), each
entry's Tail pointing at itself: our writer applies every entry in place and flushes before it
writes the next, so an entry never depends on an older one and an active sequence of ours is
always a single entry.
"""

from __future__ import annotations

import bisect
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sitepair.vdisk.vhdx_crc import checksum_with_field_zeroed
from sitepair.vdisk.vhdx_format import KiB, MiB, TiB

SECTOR = 4 * KiB
ENTRY_SIGNATURE = b"loge"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
ZERO_DESCRIPTOR_SIGNATURE = b"zero"
DATA_SECTOR_SIGNATURE = b"data"
ENTRY_HEADER_SIZE = 64
DESCRIPTOR_SIZE = 32
#: Descriptors in the first descriptor sector (after the 64-byte header) and in later ones.
FIRST_SECTOR_DESCRIPTORS = (SECTOR - ENTRY_HEADER_SIZE) // DESCRIPTOR_SIZE
#: The log may not write the file identifier or the headers (2.2.1, 2.2.2): region tables
#: (at 192 KiB and 256 KiB) and everything after them may be written through it.
LOWEST_LOGGED_OFFSET = 192 * KiB
HIGHEST_LOGGED_OFFSET = 128 * TiB
#: Logs larger than this are refused: real ones are 1 MiB (Hyper-V and qemu both default to it).
MAX_LOG_LENGTH = 256 * MiB

_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4s4s8sQQ")

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True)
class LogEntry:
    """One valid log entry."""

    offset: int  # within the log
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    #: ``(file offset, 4 KiB of data)`` for data descriptors, ``(file offset, zero length)``
    #: for zero descriptors, in descriptor order.
    operations: tuple[tuple[int, bytes | int], ...]


def descriptor_sectors(count: int) -> int:
    return -(-(ENTRY_HEADER_SIZE + count * DESCRIPTOR_SIZE) // SECTOR)


def read_ring(read: ReadFn, log_length: int, offset: int, length: int) -> bytes:
    """``length`` bytes of the ring starting at ``offset``, wrapping at ``log_length``."""
    first = min(length, log_length - offset)
    data = read(offset, first)
    if first < length:
        data += read(0, length - first)
    return data


def parse_entry(
    read: ReadFn,
    log_length: int,
    offset: int,
    log_guid: uuid.UUID,
    log_file_range: tuple[int, int],
) -> LogEntry | None:
    """The valid log entry at ``offset`` of the ring, or None if there is none (2.3.1)."""
    head = read_ring(read, log_length, offset, SECTOR)
    if len(head) < SECTOR or head[:4] != ENTRY_SIGNATURE:
        return None
    (
        _sig,
        checksum,
        entry_length,
        tail,
        seq,
        count,
        _reserved,
        raw_guid,
        flushed,
        last,
    ) = _ENTRY_HEADER.unpack_from(head)
    if entry_length < SECTOR or entry_length % SECTOR or entry_length > log_length:
        return None
    if tail % SECTOR or tail >= log_length or seq == 0:
        return None
    if uuid.UUID(bytes_le=raw_guid) != log_guid:
        return None
    if flushed % MiB or last % MiB or last > HIGHEST_LOGGED_OFFSET:
        return None
    n_desc_sectors = descriptor_sectors(count)
    if n_desc_sectors * SECTOR > entry_length:
        return None
    buf = read_ring(read, log_length, offset, entry_length)
    if len(buf) < entry_length or checksum_with_field_zeroed(buf) != checksum:
        return None
    log_start, log_end = log_file_range
    operations: list[tuple[int, bytes | int]] = []
    data_index = 0
    for i in range(count):
        sig, word, eight, file_offset, dseq = _DESCRIPTOR.unpack_from(
            buf, ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE
        )
        if dseq != seq or file_offset % SECTOR:
            return None
        if sig == ZERO_DESCRIPTOR_SIGNATURE:
            zero_length = struct.unpack("<Q", eight)[0]
            if zero_length % SECTOR:
                return None
            end = file_offset + zero_length
            payload: bytes | int = zero_length
        elif sig == DATA_DESCRIPTOR_SIGNATURE:
            sector_at = (n_desc_sectors + data_index) * SECTOR
            data_index += 1
            if sector_at + SECTOR > entry_length:
                return None
            sector = buf[sector_at : sector_at + SECTOR]
            if (
                sector[:4] != DATA_SECTOR_SIGNATURE
                or struct.unpack_from("<I", sector, 4)[0] != seq >> 32
                or struct.unpack_from("<I", sector, SECTOR - 4)[0] != seq & 0xFFFFFFFF
            ):
                return None
            payload = eight + sector[8 : SECTOR - 4] + word
            end = file_offset + SECTOR
        else:
            return None
        if file_offset < LOWEST_LOGGED_OFFSET or end > HIGHEST_LOGGED_OFFSET:
            return None
        if file_offset < log_end and end > log_start:
            return None
        operations.append((file_offset, payload))
    return LogEntry(offset, entry_length, tail, seq, flushed, last, tuple(operations))


def find_active_sequence(
    read: ReadFn, log_length: int, log_guid: uuid.UUID, log_file_range: tuple[int, int]
) -> list[LogEntry]:
    """The active sequence (tail entry first), found as [MS-VHDX] 2.3.3 describes; empty if the
    log holds no valid and complete sequence."""
    cache: dict[int, LogEntry | None] = {}

    def entry_at(off: int) -> LogEntry | None:
        if off not in cache:
            cache[off] = parse_entry(read, log_length, off, log_guid, log_file_range)
        return cache[off]

    candidate: list[LogEntry] = []
    candidate_seq = 0
    current_tail = old_tail = 0
    while True:
        # Step 2: the current sequence starts empty at the current tail.
        current: list[LogEntry] = []
        head = current_tail
        covered = 0
        # Step 3: extend it while the entry at its head is valid and numbered one higher.
        while covered < log_length:
            e = entry_at(head)
            if e is None or (current and e.sequence_number != current[-1].sequence_number + 1):
                break
            if covered + e.length > log_length:
                break
            current.append(e)
            covered += e.length
            head = (head + e.length) % log_length
        # Step 4: valid if the head entry's tail lies within the sequence.
        valid = False
        if current:
            offsets = [e.offset for e in current]
            tail = current[-1].tail
            if tail in offsets:
                valid = True
                current = current[offsets.index(tail) :]
        # Step 5: keep the newest valid sequence.
        if valid and current[-1].sequence_number > candidate_seq:
            candidate = current
            candidate_seq = current[-1].sequence_number
        # Step 6: advance the tail.
        if not valid:
            current_tail += SECTOR
            if current_tail >= log_length:
                current_tail = 0
        else:
            current_tail = head % log_length
        # Step 7: stop once the scan has wrapped.
        if current_tail < old_tail or (current_tail == old_tail and valid):
            break
        old_tail = current_tail
    return candidate


def build_entry(
    *,
    sequence_number: int,
    tail: int,
    log_guid: uuid.UUID,
    flushed_file_offset: int,
    last_file_offset: int,
    writes: Iterable[tuple[int, bytes]],
) -> bytes:
    """One log entry that writes each ``(file offset, 4 KiB)`` of ``writes``."""
    items = list(writes)
    n_desc = descriptor_sectors(len(items))
    buf = bytearray((n_desc + len(items)) * SECTOR)
    _ENTRY_HEADER.pack_into(
        buf,
        0,
        ENTRY_SIGNATURE,
        0,
        len(buf),
        tail,
        sequence_number,
        len(items),
        0,
        log_guid.bytes_le,
        flushed_file_offset,
        last_file_offset,
    )
    for i, (file_offset, data) in enumerate(items):
        if len(data) != SECTOR or file_offset % SECTOR:
            raise ValueError("log writes are whole, aligned 4 KiB sectors")
        _DESCRIPTOR.pack_into(
            buf,
            ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE,
            DATA_DESCRIPTOR_SIGNATURE,
            data[SECTOR - 4 :],
            data[:8],
            file_offset,
            sequence_number,
        )
        at = (n_desc + i) * SECTOR
        buf[at : at + 4] = DATA_SECTOR_SIGNATURE
        struct.pack_into("<I", buf, at + 4, sequence_number >> 32)
        buf[at + 8 : at + SECTOR - 4] = data[8 : SECTOR - 4]
        struct.pack_into("<I", buf, at + SECTOR - 4, sequence_number & 0xFFFFFFFF)
    struct.pack_into("<I", buf, 4, checksum_with_field_zeroed(buf))
    return bytes(buf)


class Overlay:
    """File contents replayed from the log, as disjoint intervals over file offsets.

    Each interval holds either bytes or ``None`` for zeros; later operations replace earlier
    ones where they overlap, which is the replay order of 2.3.3. Memory is proportional to the
    data sectors in the log, never to a zero range's length."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[tuple[int, int, bytes | None]] = []
        #: The file size after replay: at least the end of every replayed operation and the
        #: head entry's LastFileOffset (2.3.3).
        self.min_file_size = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def intervals(self) -> list[tuple[int, int, bytes | None]]:
        return list(self._items)

    def add(self, start: int, end: int, data: bytes | None) -> None:
        if end <= start:
            return
        self.min_file_size = max(self.min_file_size, end)
        i = bisect.bisect_right(self._starts, start) - 1
        i = max(i, 0)
        new_items: list[tuple[int, int, bytes | None]] = []
        j = i
        # Keep intervals before position i untouched; rebuild the overlapping ones.
        while j < len(self._items) and self._items[j][0] < end:
            s, e, d = self._items[j]
            if e <= start:
                new_items.append((s, e, d))
            else:
                if s < start:
                    new_items.append((s, start, None if d is None else d[: start - s]))
                if e > end:
                    new_items.append((end, e, None if d is None else d[end - s :]))
            j += 1
        new_items.append((start, end, data))
        new_items.sort(key=lambda item: item[0])
        self._items[i:j] = new_items
        self._starts[i:j] = [item[0] for item in new_items]

    def apply(self, file_offset: int, buf: bytearray | memoryview) -> None:
        """Patch ``buf`` (file bytes read at ``file_offset``) with the replayed contents."""
        end = file_offset + len(buf)
        i = max(bisect.bisect_right(self._starts, file_offset) - 1, 0)
        while i < len(self._items) and self._items[i][0] < end:
            s, e, d = self._items[i]
            lo, hi = max(s, file_offset), min(e, end)
            if lo < hi:
                if d is None:
                    buf[lo - file_offset : hi - file_offset] = bytes(hi - lo)
                else:
                    buf[lo - file_offset : hi - file_offset] = d[lo - s : hi - s]
            i += 1


def overlay_from_sequence(sequence: list[LogEntry]) -> Overlay:
    overlay = Overlay()
    for entry in sequence:
        for file_offset, payload in entry.operations:
            if isinstance(payload, int):
                overlay.add(file_offset, file_offset + payload, None)
            else:
                overlay.add(file_offset, file_offset + len(payload), payload)
    if sequence:
        overlay.min_file_size = max(overlay.min_file_size, sequence[-1].last_file_offset)
    return overlay


def max_sectors_per_entry(log_length: int) -> int:
    """Data sectors one of our entries may carry: one descriptor sector's worth, and at most
    half the ring, so a new entry never overwrites the previous one (the newest durable entry
    must stay intact until the next one is complete)."""
    return max(1, min(FIRST_SECTOR_DESCRIPTORS, log_length // 2 // SECTOR - 1))


class LogWriter:
    """Appends entries to the log ring of one open file, for one LogGuid (one session)."""

    def __init__(self, fd: int, log_offset: int, log_length: int, log_guid: uuid.UUID) -> None:
        self._fd = fd
        self._log_offset = log_offset
        self._log_length = log_length
        self.log_guid = log_guid
        self._next_sequence = 1
        self._head_offset = 0
        self._head_length = 0

    @property
    def max_sectors_per_entry(self) -> int:
        return max_sectors_per_entry(self._log_length)

    def append(
        self, writes: list[tuple[int, bytes]], *, flushed_file_offset: int, last_file_offset: int
    ) -> None:
        """Write one entry for ``writes`` after the previous one and make it durable."""
        if len(writes) > self.max_sectors_per_entry:
            raise ValueError("too many sectors for one log entry")
        offset = (self._head_offset + self._head_length) % self._log_length
        entry = build_entry(
            sequence_number=self._next_sequence,
            tail=offset,
            log_guid=self.log_guid,
            flushed_file_offset=flushed_file_offset,
            last_file_offset=last_file_offset,
            writes=writes,
        )
        first = min(len(entry), self._log_length - offset)
        os.pwrite(self._fd, entry[:first], self._log_offset + offset)
        if first < len(entry):
            os.pwrite(self._fd, entry[first:], self._log_offset)
        os.fsync(self._fd)
        self._next_sequence += 1
        self._head_offset = offset
        self._head_length = len(entry)
