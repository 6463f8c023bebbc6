"""VHDX ([MS-VHDX] v8.0): fixed, dynamic and differencing images, read and write.

Structures are parsed and built in :mod:`sitepair.vdisk.vhdx_format`, the metadata log lives in
:mod:`sitepair.vdisk.vhdx_log`, CRC-32C in :mod:`sitepair.vdisk.vhdx_crc`. This module opens
files, keeps the block allocation table (BAT) and sector bitmaps in memory, and orders writes.

Opening (read-only or writable)
    1. The file identifier signature, then both headers; the current header is the valid one
       (signature and CRC-32C) with the higher sequence number (2.2.2).
    2. If the current header's LogGuid is not zero, the active log sequence is searched
       (2.3.3). A writable open replays it into the file; a read-only open keeps the replayed
       sectors in memory and lays them over every read of the file, so the image reads as if
       replayed and the file is not changed. A file shorter than the head entry's
       FlushedFileOffset is refused as truncated; after replay the file is (or, read-only, is
       treated as) at least LastFileOffset long.
    3. The region table (first valid copy of the two), the metadata region, and the BAT are
       read, each checked against the file size and against each other: no structure may
       overlap another or start beyond the end of the file, and nothing is allocated in
       proportion to a size field that the file size does not back.

Crash safety of our own writes (the ordering choices the spec leaves to implementations)
    * Headers are never written through the log (2.2.2.1): a header update writes the
      non-current slot with the next sequence number and flushes, then does the same to the
      other slot, so both hold the same current state.
    * The first modification after an open writes one empty log entry under a new LogGuid,
      then updates the headers: a new FileWriteGuid, that LogGuid, and - before the first
      change of guest-visible data - a new DataWriteGuid. (Entry before header, so a header
      never names a LogGuid without a valid entry; the header's LogGuid is zero until then, so
      nothing live is overwritten.) Opening writable and closing without writing changes
      nothing in the file.
    * Payload data is written in place (never through the log, 2.3). A new block is allocated at
      the end of the file (sparse, so it reads as zeros) or in space known to be free (which we
      zero-fill where the write does not cover it); its data is written there before the
      in-memory BAT entry that makes it visible is changed.
    * Metadata changes (BAT entries, sector bitmap sectors, the metadata region) are collected
      as dirty 4 KiB sectors and made durable at ``flush()`` - or earlier, between two block
      updates, when the batch would no longer fit in one log entry - in this order:
      ``fsync`` (payload data and file size are stable) -> one log entry with the new sector
      contents, ``fsync`` -> the same sectors written in place, ``fsync``. So random writes
      cost one log entry per flush, not per write, and a crash at any moment leaves either
      the old or the new metadata, with every block a durable BAT entry points at already
      holding its data.
    * Each log entry's Tail points at itself (everything older has been applied and flushed
      by then), entries are appended after the previous one in the ring, and an entry is never
      larger than half the ring, so the newest durable entry is never overwritten by the next.
    * At close the headers are updated once more with LogGuid zero: the log is empty and other
      tools (qemu-img) open the file without replay. After a crash, the log is replayed on the
      next open; replaying an entry whose sectors were already written in place is harmless.
    * Space freed by ``write_zeroes`` (a block set to PAYLOAD_BLOCK_ZERO) is reused only after
      the flush that made its new state durable; a writable open also reuses gaps between
      allocated structures (for example blocks orphaned by a crash).

Differencing disks
    Parents are found through the parent locator: ``relative_path`` (relative to the child's
    folder, backslashes as separators), then ``volume_path`` and ``absolute_win32_path`` where
    such paths exist on this machine. Parents open read-only; the parent's current
    DataWriteGuid must equal ``parent_linkage`` (or ``parent_linkage2``). Partially written
    blocks use the sector bitmap (PAYLOAD_BLOCK_PARTIALLY_PRESENT); no copy-up is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import os
import re
import sys
import uuid
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, VirtualDisk, coalesce
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.vhdx_format import (
    BAT_OFFSET_MASK,
    BAT_REGION_GUID,
    BAT_STATE_MASK,
    FILE_ID_SIGNATURE,
    FILE_PARAMETERS_GUID,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    KNOWN_METADATA_NAMES,
    LOG_VERSION,
    LOGICAL_SECTOR_SIZE_GUID,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    MD_IS_REQUIRED,
    MD_IS_VIRTUAL_DISK,
    METADATA_REGION_GUID,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNDEFINED,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    PAYLOAD_STATE_NAMES,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SB_BLOCK_PRESENT,
    SECTOR_BITMAP_BLOCK_SIZE,
    SECTOR_SIZES,
    VHDX_PARENT_LOCATOR_TYPE,
    VHDX_VERSION,
    VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    FileParameters,
    FormatError,
    Geometry,
    Header,
    MetadataEntry,
    MiB,
    RegionEntry,
    build_file_identifier,
    build_file_parameters,
    build_header,
    build_metadata_table,
    build_parent_locator,
    build_region_table,
    guid_text,
    human_size,
    parse_file_parameters,
    parse_guid,
    parse_header,
    parse_linkage_guid,
    parse_metadata_table,
    parse_parent_locator,
    parse_region_table,
    parse_u32,
    parse_u64,
)
from sitepair.vdisk.vhdx_log import (
    MAX_LOG_LENGTH,
    SECTOR,
    LogWriter,
    Overlay,
    find_active_sequence,
    max_sectors_per_entry,
    overlay_from_sequence,
)

__all__ = ["VhdxDisk", "create_vhdx", "open_vhdx", "probe_vhdx", "set_parent_vhdx"]

DEFAULT_BLOCK_SIZE = 32 * MiB
DEFAULT_LOG_LENGTH = 1 * MiB
CREATOR = "sitepair"

_ZERO_MIB = bytes(MiB)
_NIL = uuid.UUID(int=0)
_PRESENT_STATES = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)
_ZERO_READ_STATES = (PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNDEFINED)
#: Maps the low byte of a BAT entry to its 3-bit state (for bytes.translate).
_STATE_TABLE = bytes(b & BAT_STATE_MASK for b in range(256))
_LOW_BYTE = 0 if sys.byteorder == "little" else 7


def probe_vhdx(head: bytes) -> bool:
    """True if ``head`` starts with the VHDX file type identifier signature (2.2.1)."""
    return head[:8] == FILE_ID_SIGNATURE


def _is_zero(data: memoryview) -> bool:
    n = len(data)
    for i in range(0, n, MiB):
        chunk = data[i : i + MiB].tobytes()
        if chunk != (_ZERO_MIB if len(chunk) == MiB else bytes(len(chunk))):
            return False
    return True


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _bit_runs(bits: int, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
    """Runs ``(first, end, is_set)`` of equal bits of ``bits`` over bit positions [start, stop)."""
    width = stop - start
    value = (bits >> start) & ((1 << width) - 1)
    pos = 0
    while pos < width:
        rest = value >> pos
        if rest & 1:
            run = ((~rest) & (rest + 1)).bit_length() - 1  # trailing ones
        else:
            run = (rest & -rest).bit_length() - 1 if rest else width - pos  # trailing zeros
        run = min(run, width - pos)
        yield start + pos, start + pos + run, bool(rest & 1)
        pos += run


class VhdxDisk(VirtualDisk):
    """One opened VHDX layer (and, through ``parent``, the rest of its chain)."""

    format = DiskFormat.VHDX

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        self.parent: VirtualDisk | None = None
        self._fd = fd
        self._overlay: Overlay | None = None
        self._replayed_entries = 0
        self._session_log_guid: uuid.UUID | None = None
        self._file_write_guid_changed = False
        self._data_write_guid_changed = False
        self._log_writer: LogWriter | None = None
        self._dirty_bat: set[int] = set()
        self._dirty_bitmap: set[int] = set()
        self._bitmap_sectors: dict[int, bytearray] = {}
        self._data_unsynced = False
        self._broken: str | None = None
        self._free: list[tuple[int, int]] = []
        self._pending_free: list[tuple[int, int]] = []
        #: Test hook: called after a log entry is durable and before it is applied in place.
        self._after_log_entry_hook: Callable[[], None] | None = None
        self._load()

    # -- opening ---------------------------------------------------------------------------
    def _fail(self, message: str, hint: str | None = None) -> VirtualDiskError:
        return VirtualDiskError(f"{self.path}: {message}", hint=hint)

    def _load(self) -> None:
        st = os.fstat(self._fd)
        self._file_size = st.st_size
        ident = os.pread(self._fd, 8, 0)
        if not probe_vhdx(ident):
            if len(ident) < 8:
                raise self._fail(f"file is {st.st_size} bytes, too short to be a VHDX image")
            raise self._fail(f"file type identifier is {ident!r}, not b'vhdxfile'")
        self._load_headers()
        self._load_log()
        self._effective_size = max(
            self._file_size, self._overlay.min_file_size if self._overlay else 0
        )
        self._load_regions()
        self._load_metadata()
        self._load_bat()

    def _load_headers(self) -> None:
        headers: list[Header | None] = []
        problems: list[str] = []
        for slot, offset in enumerate(HEADER_OFFSETS):
            try:
                headers.append(parse_header(os.pread(self._fd, HEADER_SIZE, offset)))
            except FormatError as exc:
                headers.append(None)
                problems.append(f"header {slot + 1} (at {offset // 1024} KiB) {exc}")
        valid = [(h.sequence_number, slot) for slot, h in enumerate(headers) if h is not None]
        if not valid:
            raise self._fail("no valid header: " + "; ".join(problems))
        _seq, slot = max(valid)
        header = headers[slot]
        assert header is not None
        self._headers = headers
        self._header_problems = problems
        self._current_slot = slot
        self._header = header
        if header.version != VHDX_VERSION:
            raise self._fail(
                f"header version is {header.version}; only VHDX version {VHDX_VERSION} is supported"
            )
        if header.log_version != LOG_VERSION and not header.log_is_empty:
            raise self._fail(f"log version {header.log_version} is not supported (only 0)")
        if header.log_length % MiB or header.log_offset % MiB:
            raise self._fail(
                f"log at offset {header.log_offset} (+{header.log_length}) is not 1 MiB aligned"
            )
        if header.log_length:
            if header.log_offset < HEADER_SECTION_SIZE:
                raise self._fail("log overlaps the header section")
            if header.log_length > MAX_LOG_LENGTH:
                raise self._fail(
                    f"log is {human_size(header.log_length)}; at most "
                    f"{human_size(MAX_LOG_LENGTH)} is supported"
                )
            if header.log_offset + header.log_length > self._file_size:
                raise self._fail(
                    f"log at {human_size(header.log_offset)} (+{human_size(header.log_length)})"
                    f" lies beyond the end of the file ({human_size(self._file_size)})"
                )

    def _load_log(self) -> None:
        header = self._header
        if header.log_is_empty:
            return
        if header.log_length == 0:
            raise self._fail("header names a log (LogGuid set) but the log has zero length")
        log_offset, log_length = header.log_offset, header.log_length

        def read(off: int, n: int) -> bytes:
            return os.pread(self._fd, n, log_offset + off)

        sequence = find_active_sequence(
            read, log_length, header.log_guid, (log_offset, log_offset + log_length)
        )
        if not sequence:
            raise self._fail(
                f"the log is not empty (LogGuid {header.log_guid}) but holds no valid, complete "
                "log sequence",
                hint="the image is corrupt",
            )
        head = sequence[-1]
        if self._file_size < head.flushed_file_offset:
            raise self._fail(
                f"file is {human_size(self._file_size)}, shorter than the "
                f"{human_size(head.flushed_file_offset)} the log recorded as flushed "
                f"(FlushedFileOffset of log entry {head.sequence_number}): it was truncated"
            )
        overlay = overlay_from_sequence(sequence)
        self._replayed_entries = len(sequence)
        if self.read_only:
            self._overlay = overlay
            return
        self._replay_into_file(overlay)

    def _replay_into_file(self, overlay: Overlay) -> None:
        """Writable open of a file with a non-empty log: replay it (2.3.3), then empty it."""
        # FileWriteGuid changes before the first modification, including log playback (2.2.2);
        # the LogGuid stays until the replay is durable, so a crash now replays again.
        self._update_headers(file_write_guid=uuid.uuid4())
        self._file_write_guid_changed = True
        try:
            for start, end, data in overlay.intervals:
                if data is not None:
                    os.pwrite(self._fd, data, start)
                    continue
                size = os.fstat(self._fd).st_size
                pos = start
                while pos < min(end, size):
                    n = min(MiB, end - pos, size - pos)
                    os.pwrite(self._fd, _ZERO_MIB[:n], pos)
                    pos += n
            if os.fstat(self._fd).st_size < overlay.min_file_size:
                os.ftruncate(self._fd, overlay.min_file_size)
            os.fsync(self._fd)
        except OSError as exc:
            raise self._fail(f"cannot replay the log: {exc}") from exc
        self._file_size = os.fstat(self._fd).st_size
        self._update_headers(log_guid=_NIL)

    def _pread(self, n: int, offset: int) -> bytes:
        """``n`` file bytes at ``offset`` as the replayed image has them (zeros past the end)."""
        data = os.pread(self._fd, n, offset)
        if len(data) < n and offset + len(data) < self._effective_size:
            data += bytes(min(n, self._effective_size - offset) - len(data))
        if self._overlay:
            buf = bytearray(data)
            self._overlay.apply(offset, buf)
            return bytes(buf)
        return data

    def _load_regions(self) -> None:
        problems: list[str] = []
        entries: list[RegionEntry] | None = None
        for copy, offset in enumerate(REGION_TABLE_OFFSETS):
            try:
                entries = parse_region_table(self._pread(REGION_TABLE_SIZE, offset))
                break
            except FormatError as exc:
                problems.append(f"region table {copy + 1} (at {offset // 1024} KiB) {exc}")
        if entries is None:
            raise self._fail("no valid region table: " + "; ".join(problems))
        self._region_problems = problems
        known = {BAT_REGION_GUID: "BAT", METADATA_REGION_GUID: "metadata"}
        extents: list[tuple[int, int, str]] = []
        if self._header.log_length:
            extents.append(
                (self._header.log_offset, self._header.log_offset + self._header.log_length, "log")
            )
        for e in entries:
            name = known.get(e.guid, f"region {e.guid}")
            if e.guid not in known and e.required:
                raise self._fail(
                    f"region {e.guid} is marked required but is not part of [MS-VHDX]",
                    hint="the image needs a newer VHDX implementation",
                )
            if e.file_offset >= self._effective_size:
                raise self._fail(
                    f"{name} region at {human_size(e.file_offset)} lies beyond the end of the "
                    f"file ({human_size(self._effective_size)})"
                )
            extents.append((e.file_offset, e.file_offset + e.length, f"{name} region"))
        extents.sort()
        for (_s1, end1, n1), (s2, _e2, n2) in itertools.pairwise(extents):
            if s2 < end1:
                raise self._fail(f"{n1} and {n2} overlap")
        by_guid = {e.guid: e for e in entries}
        for guid, name in known.items():
            if guid not in by_guid:
                raise self._fail(f"region table has no {name} region")
        self._bat_region = by_guid[BAT_REGION_GUID]
        self._meta_region = by_guid[METADATA_REGION_GUID]
        self._regions = entries
        self._fixed_extents = extents

    def _load_metadata(self) -> None:
        region = self._meta_region
        if region.file_offset + METADATA_TABLE_SIZE > self._effective_size:
            raise self._fail(
                f"metadata table at {human_size(region.file_offset)} extends beyond the end of "
                f"the file ({human_size(self._effective_size)}): the file is truncated"
            )
        try:
            entries = parse_metadata_table(
                self._pread(METADATA_TABLE_SIZE, region.file_offset), region.length
            )
        except FormatError as exc:
            raise self._fail(str(exc)) from exc
        items: dict[uuid.UUID, bytes] = {}
        for e in entries:
            if e.is_user:
                continue
            if e.item_id in KNOWN_METADATA_NAMES:
                if region.file_offset + e.offset + e.length > self._effective_size:
                    raise self._fail(
                        f"metadata item {KNOWN_METADATA_NAMES[e.item_id]} extends beyond the "
                        "end of the file: the file is truncated"
                    )
                items[e.item_id] = self._pread(e.length, region.file_offset + e.offset)
            elif e.is_required:
                raise self._fail(
                    f"metadata item {e.item_id} is marked required but is not part of [MS-VHDX]",
                    hint="the image needs a newer VHDX implementation",
                )
        self._meta_entries = entries
        for guid in (
            FILE_PARAMETERS_GUID,
            VIRTUAL_DISK_SIZE_GUID,
            VIRTUAL_DISK_ID_GUID,
            LOGICAL_SECTOR_SIZE_GUID,
            PHYSICAL_SECTOR_SIZE_GUID,
        ):
            if guid not in items:
                raise self._fail(f"metadata has no {KNOWN_METADATA_NAMES[guid]} item")
        try:
            params = parse_file_parameters(items[FILE_PARAMETERS_GUID])
            vsize = parse_u64(items[VIRTUAL_DISK_SIZE_GUID], "Virtual Disk Size")
            lss = parse_u32(items[LOGICAL_SECTOR_SIZE_GUID], "Logical Sector Size")
            pss = parse_u32(items[PHYSICAL_SECTOR_SIZE_GUID], "Physical Sector Size")
            page83 = parse_guid(items[VIRTUAL_DISK_ID_GUID], "Virtual Disk ID")
            locator = (
                parse_parent_locator(items[PARENT_LOCATOR_GUID])
                if params.has_parent and PARENT_LOCATOR_GUID in items
                else None
            )
        except FormatError as exc:
            raise self._fail(str(exc)) from exc
        if lss not in SECTOR_SIZES:
            raise self._fail(f"logical sector size is {lss}; it must be 512 or 4096")
        if pss not in SECTOR_SIZES:
            raise self._fail(f"physical sector size is {pss}; it must be 512 or 4096")
        if vsize == 0 or vsize % lss or vsize > MAX_VIRTUAL_SIZE:
            raise self._fail(
                f"virtual disk size is {vsize} bytes; it must be a positive multiple of the "
                f"{lss}-byte logical sector size and at most 64 TiB"
            )
        if params.has_parent:
            if locator is None:
                raise self._fail("is a differencing disk (HasParent) without a Parent Locator")
            if locator.locator_type != VHDX_PARENT_LOCATOR_TYPE:
                raise self._fail(f"parent locator type {locator.locator_type} is not VHDX")
            if parse_linkage_guid(locator.entries.get("parent_linkage", "")) is None:
                raise self._fail("parent locator has no valid parent_linkage GUID")
        self._params = params
        self._locator = locator
        self._virtual_size = vsize
        self._lss = lss
        self._pss = pss
        self._page83 = page83
        self._geo = Geometry(vsize, params.block_size, lss, params.has_parent)
        if params.has_parent:
            self.subformat = SubFormat.DIFFERENCING
        elif params.leave_block_allocated:
            self.subformat = SubFormat.FIXED
        else:
            self.subformat = SubFormat.DYNAMIC

    def _load_bat(self) -> None:
        geo = self._geo
        total = geo.total_bat_entries
        region = self._bat_region
        if total * 8 > region.length:
            raise self._fail(
                f"BAT region is {human_size(region.length)}, too small for the {total} entries "
                f"a {human_size(self._virtual_size)} disk with {human_size(geo.block_size)} "
                "blocks needs"
            )
        # Whole 4 KiB sectors, so a dirty sector can be logged from memory as it is.
        self._bat_sectors = -(-total * 8 // SECTOR)
        if region.file_offset + self._bat_sectors * SECTOR > self._effective_size:
            raise self._fail(
                f"BAT region at {human_size(region.file_offset)} (+"
                f"{human_size(self._bat_sectors * SECTOR)} in use) extends beyond the end of the "
                f"file ({human_size(self._effective_size)}): the file is truncated"
            )
        bat = array("Q")
        bat.frombytes(self._pread(self._bat_sectors * SECTOR, region.file_offset))
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            bat.byteswap()
        self._bat = bat
        self._bat_total = total
        self._validate_bat()

    def _entry_states(self) -> bytes:
        """The 3-bit state of each of the BAT's ``total`` entries, one byte each."""
        raw = self._bat.tobytes()[: self._bat_total * 8]
        return raw[_LOW_BYTE::8].translate(_STATE_TABLE)

    def _payload_states(self) -> bytes:
        """The state of each payload block, in block order (sector bitmap entries removed)."""
        states = self._entry_states()
        cr = self._geo.chunk_ratio
        parts = [states[i : i + cr] for i in range(0, len(states), cr + 1)]
        return b"".join(parts)[: self._geo.data_blocks]

    def _validate_bat(self) -> None:
        geo = self._geo
        cr = geo.chunk_ratio
        bs = geo.block_size
        bat = self._bat
        states = self._entry_states()
        diff = geo.has_parent
        size = self._effective_size
        used: list[int] = []
        for m in re.finditer(rb"[\x04\x05\x06\x07]", states):
            i = m.start()
            state = states[i]
            is_bitmap = i % (cr + 1) == cr
            what = f"BAT entry {i} ({geo.describe_entry(i)})"
            if is_bitmap:
                if not diff:
                    continue  # must be NOT_PRESENT outside differencing disks; ignored there
                if state != SB_BLOCK_PRESENT:
                    raise self._fail(f"{what} has reserved sector bitmap state {state}")
                extent = SECTOR_BITMAP_BLOCK_SIZE
            else:
                if state in (4, 5):
                    raise self._fail(f"{what} has reserved state {state}")
                if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    if not diff:
                        raise self._fail(
                            f"{what} is PARTIALLY_PRESENT, which only differencing disks allow"
                        )
                    sb = bat[geo.bitmap_index(i // (cr + 1))] & BAT_STATE_MASK
                    if sb != SB_BLOCK_PRESENT:
                        raise self._fail(
                            f"{what} is PARTIALLY_PRESENT but its chunk's sector bitmap block "
                            "is not present"
                        )
                extent = bs
            offset = bat[i] & BAT_OFFSET_MASK
            if offset < HEADER_SECTION_SIZE:
                raise self._fail(
                    f"{what} points at offset {human_size(offset)}, inside the header section"
                )
            if offset >= size:
                raise self._fail(
                    f"{what} points at offset {human_size(offset)}, beyond the end of the file "
                    f"({human_size(size)})"
                )
            used.append(offset | (1 if extent == SECTOR_BITMAP_BLOCK_SIZE else 0))
        used.sort()
        fixed = [(s, e, name) for s, e, name in self._fixed_extents]
        prev_end = HEADER_SECTION_SIZE
        prev_name = "the header section"
        fi = 0
        alloc_end = max((e for _s, e, _n in fixed), default=HEADER_SECTION_SIZE)
        for key in used:
            start = key & BAT_OFFSET_MASK
            end = start + (SECTOR_BITMAP_BLOCK_SIZE if key & 1 else bs)
            while fi < len(fixed) and fixed[fi][0] < end:
                fs, fe, fname = fixed[fi]
                if fe > start:
                    raise self._fail(
                        f"{self._describe_offset(start)} overlaps the {fname} (at {human_size(fs)})"
                    )
                fi += 1
            if start < prev_end:
                raise self._fail(
                    f"{self._describe_offset(start)} overlaps {prev_name} "
                    f"(which ends at {human_size(prev_end)})"
                )
            prev_end = end
            prev_name = self._describe_offset(start)
            alloc_end = max(alloc_end, end)
        if not self.read_only:
            self._used_sorted = used
        self._alloc_end = _round_up(max(alloc_end, self._effective_size), MiB)

    def _describe_offset(self, offset: int) -> str:
        """``BAT entry 17 (payload block 17) at 9.0 MiB`` for the block stored at ``offset``."""
        states = self._entry_states()
        for m in re.finditer(rb"[\x06\x07]", states):
            i = m.start()
            if self._bat[i] & BAT_OFFSET_MASK == offset:
                return f"BAT entry {i} ({self._geo.describe_entry(i)}) at {human_size(offset)}"
        return f"the block at {human_size(offset)}"  # pragma: no cover - defensive

    def _compute_free_space(self) -> None:
        """Gaps between allocated structures below the allocation end (writable opens)."""
        bs = self._geo.block_size
        extents = [(s, e) for s, e, _n in self._fixed_extents]
        extents.append((0, HEADER_SECTION_SIZE))
        for key in self._used_sorted:
            start = key & BAT_OFFSET_MASK
            extents.append((start, start + (SECTOR_BITMAP_BLOCK_SIZE if key & 1 else bs)))
        # Blocks in states whose offset "MUST contain the prior contents" are not reused.
        states = self._entry_states()
        for m in re.finditer(rb"[\x01\x03]", states):
            offset = self._bat[m.start()] & BAT_OFFSET_MASK
            if offset >= HEADER_SECTION_SIZE:
                extents.append((offset, offset + bs))
        extents.sort()
        free: list[tuple[int, int]] = []
        pos = 0
        for s, e in extents:
            if s > pos:
                free.append((pos, s - pos))
            pos = max(pos, e)
        if pos < self._alloc_end:
            free.append((pos, self._alloc_end - pos))
        self._free = [(s, n) for s, n in free if n >= MiB and s % MiB == 0]
        del self._used_sorted

    def _attach_parent(self, chain: tuple[Path, ...]) -> None:
        assert self._locator is not None
        me = self.path.resolve()
        parent_path = self._find_parent()
        resolved = parent_path.resolve()
        if resolved in chain or resolved == me:
            loop = " -> ".join(str(p) for p in (*chain, me, resolved))
            raise self._fail(f"differencing chain loops back on itself: {loop}")
        parent = open_vhdx(parent_path, read_only=True, _chain=(*chain, me))
        try:
            self._check_parent(parent, parent_path)
        except BaseException:
            parent.close()
            raise
        self.parent = parent

    def _check_parent(self, parent: VirtualDisk, parent_path: Path) -> None:
        assert self._locator is not None
        if not isinstance(parent, VhdxDisk):  # pragma: no cover - open_vhdx returns VHDX
            raise self._fail(f"parent {parent_path} is not a VHDX image")
        linkages = {
            g
            for key in ("parent_linkage", "parent_linkage2")
            if (g := parse_linkage_guid(self._locator.entries.get(key, ""))) is not None
        }
        if parent.data_write_guid not in linkages:
            raise self._fail(
                f"parent {parent_path} was modified after this differencing disk was "
                f"created: its DataWriteGuid is {guid_text(parent.data_write_guid)}, the "
                f"child expects {', '.join(sorted(guid_text(g) for g in linkages))}",
                hint="the chain is broken; restore the parent or discard the child",
            )
        if parent.logical_sector_size != self._lss:
            raise self._fail(
                f"parent {parent_path} has {parent.logical_sector_size}-byte logical "
                f"sectors, this disk {self._lss}-byte ones"
            )

    def _find_parent(self) -> Path:
        assert self._locator is not None
        entries = self._locator.entries
        tried: list[str] = []
        for key in ("relative_path", "volume_path", "absolute_win32_path"):
            value = entries.get(key)
            if not value:
                continue
            candidate = _locator_path(value, self.path.parent, relative=key == "relative_path")
            tried.append(f"{key}={value!r}" + (f" -> {candidate}" if candidate else ""))
            if candidate is not None and candidate.is_file():
                return candidate
        raise self._fail(
            "parent disk not found; tried " + ("; ".join(tried) if tried else "no paths"),
            hint="put the parent where the child's parent locator says, or relink the child",
        )

    # -- geometry and identity -------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    @property
    def logical_sector_size(self) -> int:
        return self._lss

    @property
    def physical_sector_size(self) -> int:
        return self._pss

    @property
    def block_size(self) -> int:
        return self._geo.block_size

    @property
    def identity(self) -> uuid.UUID:
        return self._page83

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self._header.data_write_guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        return self._header.file_write_guid

    @property
    def has_parent(self) -> bool:
        return self._params.has_parent

    @property
    def parent_locator(self) -> dict[str, str]:
        return dict(self._locator.entries) if self._locator else {}

    def info(self) -> DiskInfo:
        self._check_open()
        states = self._payload_states()
        counts = {
            name: states.count(bytes([state]))
            for state, name in PAYLOAD_STATE_NAMES.items()
            if states.count(bytes([state]))
        }
        entry_states = self._entry_states()
        cr = self._geo.chunk_ratio
        bitmap_present = sum(
            1 for i in range(cr, len(entry_states), cr + 1) if entry_states[i] == SB_BLOCK_PRESENT
        )
        details: dict[str, object] = {
            "header_sequence_numbers": [
                h.sequence_number if h is not None else None for h in self._headers
            ],
            "current_header": self._current_slot + 1,
            "header_problems": list(self._header_problems),
            "region_table_problems": list(self._region_problems),
            "file_write_guid": str(self._header.file_write_guid),
            "data_write_guid": str(self._header.data_write_guid),
            "log_guid": str(self._header.log_guid),
            "log_empty": self._header.log_is_empty,
            "log_offset": self._header.log_offset,
            "log_length": self._header.log_length,
            "log_entries_replayed_in_memory": self._replayed_entries if self._overlay else 0,
            "chunk_ratio": cr,
            "bat_entries": self._bat_total,
            "payload_blocks": self._geo.data_blocks,
            "payload_block_states": counts,
            "sector_bitmap_blocks_present": bitmap_present,
            "leave_block_allocated": self._params.leave_block_allocated,
            "has_parent": self._params.has_parent,
        }
        if self._locator is not None:
            details["parent_locator"] = dict(self._locator.entries)
        return DiskInfo(
            path=str(self.path),
            format=DiskFormat.VHDX,
            subformat=self.subformat,
            virtual_size=self._virtual_size,
            logical_sector_size=self._lss,
            physical_sector_size=self._pss,
            block_size=self._geo.block_size,
            identity=self._page83,
            file_size=os.fstat(self._fd).st_size,
            allocated_bytes=sum(n for _o, n in self.allocated_ranges(this_layer_only=True)),
            change_token=self._header.data_write_guid,
            parent=self.parent.info() if self.parent is not None else None,
            details=details,
        )

    # -- reading ---------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        self._check_range(offset, length)
        if length == 0:
            return b""
        plan = self._read_plan(offset, length)
        if len(plan) == 1 and plan[0][0] == 0 and plan[0][2] == length and not self._overlay:
            # The common case: one contiguous run in the file, returned without a copy.
            data = os.pread(self._fd, length, plan[0][3])
            return data if len(data) == length else data + bytes(length - len(data))
        out = bytearray(length)
        self._fill(memoryview(out), plan)
        return bytes(out)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        self._check_range(offset, len(buf))
        if len(buf):
            self._fill(buf.cast("B"), self._read_plan(offset, len(buf)))

    def _fill(self, view: memoryview, plan: list[tuple[int, int, int, int]]) -> None:
        for kind, out_off, n, where in plan:
            part = view[out_off : out_off + n]
            if kind == 0:
                self._read_file_into(part, where)
            elif kind == 1:
                self._read_partial_into(part, where)
            elif kind == 2:
                self._parent_read_into(part, where)
            else:
                part[:] = bytes(n)

    def _read_plan(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """``(kind, out offset, length, where)`` pieces: kind 0 reads ``where`` in the file
        (contiguous runs merged), 1 a partially present block at guest ``where``, 2 the parent
        at guest ``where``, 3 zeros."""
        bs = self._geo.block_size
        cr = self._geo.chunk_ratio
        bat = self._bat
        # Plan: runs of contiguous file bytes, or other sources, in guest order.
        plan: list[tuple[int, int, int, int]] = []  # (kind, out_offset, length, file/guest off)
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            entry = bat[block + block // cr]
            state = entry & BAT_STATE_MASK
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                file_off = (entry & BAT_OFFSET_MASK) + in_block
                last = plan[-1] if plan else None
                if (
                    last is not None
                    and last[0] == 0
                    and last[1] + last[2] == pos - offset
                    and last[3] + last[2] == file_off
                ):
                    plan[-1] = (0, last[1], last[2] + n, last[3])
                else:
                    plan.append((0, pos - offset, n, file_off))
            elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                plan.append((1, pos - offset, n, pos))
            elif state == PAYLOAD_BLOCK_NOT_PRESENT and self.parent is not None:
                plan.append((2, pos - offset, n, pos))
            else:
                plan.append((3, pos - offset, n, pos))  # the other states read as zeros
            pos += n
        return plan

    def _read_file_into(self, view: memoryview, file_offset: int) -> None:
        if hasattr(os, "preadv"):
            got = os.preadv(self._fd, [view], file_offset)
        else:  # pragma: no cover - Windows
            data = os.pread(self._fd, len(view), file_offset)
            view[: len(data)] = data
            got = len(data)
        if got < len(view):
            view[got:] = bytes(len(view) - got)
        if self._overlay:
            self._overlay.apply(file_offset, view)

    def _parent_read(self, guest_offset: int, n: int) -> bytes:
        out = bytearray(n)
        self._parent_read_into(memoryview(out), guest_offset)
        return bytes(out)

    def _parent_read_into(self, view: memoryview, guest_offset: int) -> None:
        """Parent bytes at ``guest_offset``; zeros past the parent's end (a grown child)."""
        parent = self.parent
        n = len(view)
        avail = 0 if parent is None else max(0, min(n, parent.virtual_size - guest_offset))
        if parent is not None and avail:
            parent.read_into(guest_offset, view[:avail])
        if avail < n:
            view[avail:] = bytes(n - avail)

    def _read_partial_into(self, view: memoryview, guest_offset: int) -> None:
        """Read a range inside one PARTIALLY_PRESENT block, sector by sector (2.5.1.1)."""
        bs, lss = self._geo.block_size, self._lss
        block = guest_offset // bs
        in_block = guest_offset - block * bs
        n = len(view)
        base_file = self._bat[self._geo.payload_index(block)] & BAT_OFFSET_MASK
        bits = self._block_bitmap(block)
        first = in_block // lss
        stop = -(-(in_block + n) // lss)
        for s0, s1, present in _bit_runs(bits, first, stop):
            lo = max(s0 * lss, in_block)
            hi = min(s1 * lss, in_block + n)
            part = view[lo - in_block : hi - in_block]
            if present:
                self._read_file_into(part, base_file + lo)
            else:
                self._parent_read_into(part, block * bs + lo)

    # -- sector bitmaps --------------------------------------------------------------------
    def _bitmap_location(self, block: int) -> int:
        """File offset of the first sector bitmap byte describing ``block``."""
        geo = self._geo
        chunk, pos = divmod(block, geo.chunk_ratio)
        sb_entry = self._bat[geo.bitmap_index(chunk)]
        return (sb_entry & BAT_OFFSET_MASK) + pos * geo.bitmap_bytes_per_block

    def _bitmap_sector(self, file_offset: int) -> bytearray:
        sector = self._bitmap_sectors.get(file_offset)
        if sector is None:
            sector = bytearray(self._pread(SECTOR, file_offset))
            self._bitmap_sectors[file_offset] = sector
        return sector

    def _block_bitmap(self, block: int) -> int:
        """The sector bitmap of ``block`` as an int (bit i = logical sector i of the block)."""
        start = self._bitmap_location(block)
        n = self._geo.bitmap_bytes_per_block
        raw = bytearray()
        pos = start
        while pos < start + n:
            sector_off = pos - pos % SECTOR
            take = min(start + n - pos, sector_off + SECTOR - pos)
            raw += self._bitmap_sector(sector_off)[pos - sector_off : pos - sector_off + take]
            pos += take
        return int.from_bytes(raw, "little")

    def _set_block_bits(self, block: int, first: int, stop: int) -> None:
        """Set bits [first, stop) of ``block``'s sector bitmap (marks the sectors dirty)."""
        start = self._bitmap_location(block)
        byte_lo = start + first // 8
        byte_hi = start + (stop + 7) // 8
        mask = ((1 << (stop - first)) - 1) << (first % 8)
        pos = byte_lo
        while pos < byte_hi:
            sector_off = pos - pos % SECTOR
            sector = self._bitmap_sector(sector_off)
            take = min(byte_hi - pos, sector_off + SECTOR - pos)
            shift = (pos - byte_lo) * 8
            part = (mask >> shift) & ((1 << (take * 8)) - 1)
            lo = pos - sector_off
            value = int.from_bytes(sector[lo : lo + take], "little") | part
            sector[lo : lo + take] = value.to_bytes(take, "little")
            self._dirty_bitmap.add(sector_off)
            pos += take

    # -- allocated ranges ------------------------------------------------------------------
    def _layer_ranges(self, *, include_overrides: bool) -> Iterator[tuple[int, int]]:
        """Guest ranges this layer holds data for. With ``include_overrides`` (differencing
        layers only) blocks in ZERO/UNMAPPED/UNDEFINED state count too: they hide the parent."""
        bs, lss = self._geo.block_size, self._lss
        vsize = self._virtual_size
        states = self._payload_states()
        pattern = rb"[\x01\x02\x03\x06\x07]+" if include_overrides else rb"[\x06\x07]+"
        for m in re.finditer(pattern, states):
            first, stop = m.start(), m.end()
            if PAYLOAD_BLOCK_PARTIALLY_PRESENT not in m.group():
                yield first * bs, min(stop * bs, vsize) - first * bs
                continue
            for block in range(first, stop):
                block_start = block * bs
                block_len = min(bs, vsize - block_start)
                if states[block] != PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    yield block_start, block_len
                    continue
                bits = self._block_bitmap(block)
                for s0, s1, present in _bit_runs(bits, 0, -(-block_len // lss)):
                    if present:
                        yield block_start + s0 * lss, min(s1 * lss, block_len) - s0 * lss

    def allocated_ranges(self, *, this_layer_only: bool = False) -> Iterator[tuple[int, int]]:
        self._check_open()
        if this_layer_only or self.parent is None:
            return coalesce(self._layer_ranges(include_overrides=self._params.has_parent))
        own = list(self._layer_ranges(include_overrides=False))
        below = [
            (o, min(n, self._virtual_size - o))
            for o, n in self.parent.allocated_ranges()
            if o < self._virtual_size
        ]
        return coalesce(heapq.merge(own, below))

    def _range_may_have_data(self, offset: int, length: int) -> bool:
        """False only if [offset, offset+length) of this chain certainly reads as zeros."""
        bs, lss = self._geo.block_size, self._lss
        end = min(offset + length, self._virtual_size)
        pos = offset
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            state = self._bat[self._geo.payload_index(block)] & BAT_STATE_MASK
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                return True
            if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                bits = self._block_bitmap(block)
                for _s0, _s1, present in _bit_runs(
                    bits, in_block // lss, -(-(in_block + n) // lss)
                ):
                    if present:
                        return True
                if self._parent_may_have_data(pos, n):
                    return True
            elif state == PAYLOAD_BLOCK_NOT_PRESENT and self._parent_may_have_data(pos, n):
                return True
            pos += n
        return False

    def _parent_may_have_data(self, offset: int, length: int) -> bool:
        parent = self.parent
        if parent is None or offset >= parent.virtual_size:
            return False
        n = min(length, parent.virtual_size - offset)
        if isinstance(parent, VhdxDisk) and not parent._range_may_have_data(offset, n):
            return False
        # The metadata says the parent may hold data here: look at the bytes themselves.
        return not _is_zero(memoryview(parent.read(offset, n)))

    # -- writing ---------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._write_lock:
            self._check_writable()
            self._check_range(offset, len(view))
            if not len(view):
                return
            self._begin_change(data_change=True)
            self._guarded(lambda: self._write_locked(offset, view))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._write_lock:
            self._check_writable()
            self._check_range(offset, length)
            if not length:
                return
            self._begin_change(data_change=True)
            self._guarded(lambda: self._write_zeroes_locked(offset, length))

    def flush(self) -> None:
        with self._write_lock:
            self._check_open()
            if self.read_only:
                return
            self._guarded(self._flush_locked)

    def _guarded(self, action: Callable[[], None]) -> None:
        if self._broken:
            raise self._fail(
                f"an earlier write failed ({self._broken}); no more writes are accepted",
                hint="close the disk and open it again (the log makes the file consistent)",
            )
        try:
            action()
        except OSError as exc:
            self._broken = str(exc)
            raise self._fail(f"I/O error: {exc}") from exc

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        bs = self._geo.block_size
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            in_block = pos - block * bs
            n = min(bs - in_block, end - pos)
            yield block, in_block, n
            pos += n

    def _block_length(self, block: int) -> int:
        bs = self._geo.block_size
        return min(bs, self._virtual_size - block * bs)

    def _write_locked(self, offset: int, view: memoryview) -> None:
        done = 0
        for block, in_block, n in self._pieces(offset, len(view)):
            self._make_room_for_metadata()
            self._write_piece(block, in_block, view[done : done + n])
            done += n

    def _write_zeroes_locked(self, offset: int, length: int) -> None:
        fixed = self._params.leave_block_allocated and not self._params.has_parent
        for block, in_block, n in self._pieces(offset, length):
            self._make_room_for_metadata()
            idx = self._geo.payload_index(block)
            entry = self._bat[idx]
            whole = in_block == 0 and n == self._block_length(block)
            if fixed or not whole:
                # Fixed disks keep every block allocated (2.5.1.1 note 6): zeros are written.
                self._write_zero_range(block, in_block, n)
            else:
                self._zero_whole_block(idx, entry, block)

    def _zero_whole_block(self, idx: int, entry: int, block: int) -> None:
        """Make a whole payload block read as zeros without writing its bytes.

        Dynamic disks use PAYLOAD_BLOCK_ZERO. Differencing disks that must hide parent data get
        a fresh all-zero FULLY_PRESENT block instead (sparse at the end of the file): the spec
        says ZERO reads as zeros there too, but libvhdi reads a differencing disk's ZERO blocks
        from the parent, and an image that two readers disagree on is worse than a few
        unwritten megabytes of address space."""
        state = entry & BAT_STATE_MASK
        bs = self._geo.block_size
        if self._params.has_parent:
            if state in _ZERO_READ_STATES:
                return
            if state == PAYLOAD_BLOCK_NOT_PRESENT and not self._range_or_parent_has_data(
                block, 0, self._block_length(block)
            ):
                return
            offset, fresh = self._allocate(bs)
            if not fresh:
                self._zero_fill(offset, bs)
                self._data_unsynced = True
            self._set_entry(idx, PAYLOAD_BLOCK_FULLY_PRESENT, offset)
        else:
            if state in (PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_NOT_PRESENT):
                return
            self._set_entry(idx, PAYLOAD_BLOCK_ZERO)
        if state in _PRESENT_STATES:
            self._pending_free.append((entry & BAT_OFFSET_MASK, bs))

    def _range_or_parent_has_data(self, block: int, in_block: int, n: int) -> bool:
        if not self._params.has_parent:
            return False
        return self._parent_may_have_data(block * self._geo.block_size + in_block, n)

    def _write_zero_range(self, block: int, in_block: int, n: int) -> None:
        for i in range(0, n, MiB):
            k = min(MiB, n - i)
            self._write_piece(block, in_block + i, memoryview(_ZERO_MIB)[:k])

    def _write_piece(self, block: int, in_block: int, view: memoryview) -> None:
        """Write ``view`` at ``in_block`` inside payload block ``block``."""
        geo = self._geo
        idx = geo.payload_index(block)
        entry = self._bat[idx]
        state = entry & BAT_STATE_MASK
        n = len(view)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            os.pwrite(self._fd, view, (entry & BAT_OFFSET_MASK) + in_block)
            self._data_unsynced = True
            return
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            self._write_sectors(block, entry & BAT_OFFSET_MASK, in_block, view)
            if self._block_bitmap(block) == (1 << (-(-self._block_length(block) // self._lss))) - 1:
                self._set_entry(idx, PAYLOAD_BLOCK_FULLY_PRESENT, entry & BAT_OFFSET_MASK)
            return
        falls_through = state == PAYLOAD_BLOCK_NOT_PRESENT and self._params.has_parent
        whole = in_block == 0 and n == self._block_length(block)
        if _is_zero(view):
            if not (falls_through and self._range_or_parent_has_data(block, in_block, n)):
                return  # already reads as zeros: stay sparse
            if whole:
                self._zero_whole_block(idx, entry, block)  # hides the parent's data
                return
        if falls_through and not whole:
            self._allocate_partial(block, in_block, view)
            return
        # The block reads as zeros (or is fully overwritten): a fresh block with the data in it.
        offset, fresh = self._allocate(geo.block_size)
        if not fresh:
            if in_block:
                self._zero_fill(offset, in_block)
            if in_block + n < geo.block_size:
                self._zero_fill(offset + in_block + n, geo.block_size - in_block - n)
        os.pwrite(self._fd, view, offset + in_block)
        self._data_unsynced = True
        self._set_entry(idx, PAYLOAD_BLOCK_FULLY_PRESENT, offset)

    def _allocate_partial(self, block: int, in_block: int, view: memoryview) -> None:
        """First write into a NOT_PRESENT block of a differencing disk that does not cover it:
        allocate the block as PARTIALLY_PRESENT and mark only the written sectors (2.4)."""
        geo = self._geo
        chunk = block // geo.chunk_ratio
        sb_idx = geo.bitmap_index(chunk)
        if self._bat[sb_idx] & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            sb_offset, fresh = self._allocate(SECTOR_BITMAP_BLOCK_SIZE)
            if not fresh:
                self._zero_fill(sb_offset, SECTOR_BITMAP_BLOCK_SIZE)
            for off in range(sb_offset, sb_offset + SECTOR_BITMAP_BLOCK_SIZE, SECTOR):
                self._bitmap_sectors.pop(off, None)
            self._set_entry(sb_idx, SB_BLOCK_PRESENT, sb_offset)
        offset, _fresh = self._allocate(geo.block_size)
        self._write_sectors(block, offset, in_block, view)
        self._set_entry(geo.payload_index(block), PAYLOAD_BLOCK_PARTIALLY_PRESENT, offset)

    def _write_sectors(
        self, block: int, block_offset: int, in_block: int, view: memoryview
    ) -> None:
        """Write whole logical sectors covering ``view`` into a block with a sector bitmap,
        completing partial edge sectors with what the chain shows there, then set the bits."""
        lss = self._lss
        n = len(view)
        first = in_block // lss
        stop = -(-(in_block + n) // lss)
        lo, hi = first * lss, stop * lss
        guest_block = block * self._geo.block_size
        if lo == in_block and hi == in_block + n:
            os.pwrite(self._fd, view, block_offset + lo)
        else:
            buf = bytearray(hi - lo)
            if lo < in_block:
                buf[:lss] = self.read(guest_block + lo, lss)
            if hi > in_block + n:
                buf[-lss:] = self.read(guest_block + hi - lss, lss)
            buf[in_block - lo : in_block - lo + n] = view
            os.pwrite(self._fd, buf, block_offset + lo)
        self._data_unsynced = True
        self._set_block_bits(block, first, stop)

    def _zero_fill(self, offset: int, length: int) -> None:
        pos = offset
        while pos < offset + length:
            n = min(MiB, offset + length - pos)
            os.pwrite(self._fd, _ZERO_MIB[:n] if n < MiB else _ZERO_MIB, pos)
            pos += n

    def _allocate(self, size: int) -> tuple[int, bool]:
        """File space for a new block: ``(offset, known_to_read_as_zeros)``."""
        for i, (start, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, length - size)
                return start, False
        offset = self._alloc_end
        self._alloc_end = offset + size
        if os.fstat(self._fd).st_size < self._alloc_end:
            os.ftruncate(self._fd, self._alloc_end)
        return offset, True

    def _set_entry(self, index: int, state: int, offset: int = 0) -> None:
        self._bat[index] = state | offset
        self._dirty_bat.add(index * 8 // SECTOR)

    # -- sessions, headers and metadata flushes --------------------------------------------
    def _begin_change(self, *, data_change: bool) -> None:
        """Header updates that must precede a modification (2.2.2, 2.2.2.1)."""
        changes: dict[str, uuid.UUID] = {}
        if not self._file_write_guid_changed:
            changes["file_write_guid"] = uuid.uuid4()
        writer: LogWriter | None = None
        if self._session_log_guid is None:
            if self._header.log_length < MiB:
                raise self._fail("has no log, so its metadata cannot be updated safely")
            log_guid = uuid.uuid4()
            changes["log_guid"] = log_guid
            writer = LogWriter(self._fd, self._header.log_offset, self._header.log_length, log_guid)
        if data_change and not self._data_write_guid_changed:
            changes["data_write_guid"] = uuid.uuid4()
        if not changes:
            return
        if writer is not None:
            # The session's first entry (no descriptors) is durable before the header names
            # its LogGuid, so a header with a non-zero LogGuid always has a valid sequence to
            # find (2.3.3 calls a log without one corrupt). The header's LogGuid is zero until
            # then - the log is empty - so no reader can mistake what we overwrite here.
            size = os.fstat(self._fd).st_size
            self._guarded(
                lambda: writer.append(
                    [],
                    flushed_file_offset=size - size % MiB,
                    last_file_offset=_round_up(max(size, self._alloc_end), MiB),
                )
            )
        self._guarded(lambda: self._update_headers(**changes))
        self._file_write_guid_changed = True
        if "data_write_guid" in changes:
            self._data_write_guid_changed = True
        if writer is not None:
            self._session_log_guid = writer.log_guid
            self._log_writer = writer
            self._compute_free_space_once()

    def _compute_free_space_once(self) -> None:
        if hasattr(self, "_used_sorted"):
            self._compute_free_space()

    def _update_headers(self, **changes: uuid.UUID) -> None:
        """Write the updated header to the non-current slot, flush; then to the other slot."""
        for _ in range(2):
            h = self._header
            new = Header(
                sequence_number=h.sequence_number + 1,
                file_write_guid=changes.get("file_write_guid", h.file_write_guid),
                data_write_guid=changes.get("data_write_guid", h.data_write_guid),
                log_guid=changes.get("log_guid", h.log_guid),
                log_version=LOG_VERSION,
                version=VHDX_VERSION,
                log_length=h.log_length,
                log_offset=h.log_offset,
            )
            slot = 1 - self._current_slot
            os.pwrite(self._fd, build_header(new), HEADER_OFFSETS[slot])
            os.fsync(self._fd)
            self._headers[slot] = new
            self._current_slot = slot
            self._header = new
        self._header_problems = []

    @property
    def _metadata_budget(self) -> int:
        """Dirty metadata sectors after which a batch is flushed before the next block update:
        one entry's capacity less what one block update can dirty (2 BAT sectors and the
        block's bitmap bytes, which may straddle sectors)."""
        per_entry = max_sectors_per_entry(self._header.log_length)
        per_block = 2 + self._geo.bitmap_bytes_per_block // SECTOR + 2
        return max(1, per_entry - per_block)

    def _make_room_for_metadata(self) -> None:
        if len(self._dirty_bat) + len(self._dirty_bitmap) >= self._metadata_budget:
            self._flush_metadata()

    def _flush_locked(self) -> None:
        if self._dirty_bat or self._dirty_bitmap:
            self._flush_metadata()
        elif self._data_unsynced:
            os.fsync(self._fd)
            self._data_unsynced = False

    def _metadata_sectors(self) -> list[tuple[int, bytes]]:
        """The dirty BAT and sector bitmap sectors, as their new 4 KiB contents."""
        bat = self._bat
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            bat = array("Q", bat)
            bat.byteswap()
        raw = memoryview(bat).cast("B")
        base = self._bat_region.file_offset
        sectors = [
            (base + s * SECTOR, bytes(raw[s * SECTOR : (s + 1) * SECTOR]))
            for s in sorted(self._dirty_bat)
        ]
        sectors += [(off, bytes(self._bitmap_sectors[off])) for off in sorted(self._dirty_bitmap)]
        return sectors

    def _flush_metadata(self, extra: list[tuple[int, bytes]] | None = None) -> None:
        """Make dirty metadata durable through the log (see the module docstring)."""
        sectors = self._metadata_sectors()
        sectors += extra or []
        if not sectors:
            return
        writer = self._log_writer
        assert writer is not None
        os.fsync(self._fd)  # payload data and the file size first
        self._data_unsynced = False
        size = os.fstat(self._fd).st_size
        flushed = size - size % MiB
        last = _round_up(max(size, self._alloc_end), MiB)
        per_entry = writer.max_sectors_per_entry
        for i in range(0, len(sectors), per_entry):
            batch = sectors[i : i + per_entry]
            writer.append(batch, flushed_file_offset=flushed, last_file_offset=last)
            if self._after_log_entry_hook is not None:
                self._after_log_entry_hook()
            for file_offset, data in batch:
                os.pwrite(self._fd, data, file_offset)
            os.fsync(self._fd)
        self._dirty_bat.clear()
        self._dirty_bitmap.clear()
        if self._pending_free:
            self._free = sorted(self._free + self._pending_free)
            self._pending_free = []

    def _rewrite_metadata_item(self, item_id: uuid.UUID, data: bytes) -> None:
        """Replace one system metadata item, through the log (one entry, so atomic)."""
        region = self._meta_region
        entries = list(self._meta_entries)
        index = next(
            (i for i, e in enumerate(entries) if e.item_id == item_id and not e.is_user), None
        )
        if index is not None and len(data) <= entries[index].length:
            offset = entries[index].offset
        else:
            others_end = max(
                (e.offset + e.length for i, e in enumerate(entries) if i != index and e.length),
                default=METADATA_TABLE_SIZE,
            )
            offset = _round_up(max(others_end, METADATA_TABLE_SIZE), 8)
            if offset + len(data) > region.length:
                raise self._fail("metadata region has no room for the new item")
        # Only the part of the region that holds the table and the items is read and compared.
        span = _round_up(max([offset + len(data)] + [e.offset + e.length for e in entries]), SECTOR)
        original = self._pread(span, region.file_offset)
        image = bytearray(original)
        flags = entries[index].flags if index is not None else MD_IS_REQUIRED
        new_entry = MetadataEntry(item_id, offset, len(data), flags)
        if index is None:
            entries.append(new_entry)
        else:
            entries[index] = new_entry
        image[:METADATA_TABLE_SIZE] = build_metadata_table(entries)
        image[offset : offset + len(data)] = data
        changed = [
            (region.file_offset + s, bytes(image[s : s + SECTOR]))
            for s in range(0, len(image), SECTOR)
            if image[s : s + SECTOR] != original[s : s + SECTOR]
        ]
        if len(changed) > max_sectors_per_entry(self._header.log_length):
            raise self._fail("metadata change is too large for one log entry")
        self._begin_change(data_change=False)

        def commit() -> None:
            if self._dirty_bat or self._dirty_bitmap:
                self._flush_metadata()
            self._flush_metadata(extra=changed)

        self._guarded(commit)
        self._meta_entries = entries

    def _virtual_disk_items(self) -> list[tuple[MetadataEntry, bytes]]:
        """Metadata items a new differencing child copies from this disk (2.6.1.2)."""
        region = self._meta_region
        return [
            (e, self._pread(e.length, region.file_offset + e.offset))
            for e in self._meta_entries
            if e.is_virtual_disk and not e.is_user
        ]

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self._broken:
                with self._write_lock:
                    self._guarded(self._flush_locked)
                    if self._session_log_guid is not None:
                        # Everything is applied and durable: empty the log (LogGuid zero).
                        self._guarded(lambda: self._update_headers(log_guid=_NIL))
                        self._session_log_guid = None
        finally:
            self._closed = True
            self._close_files()
            if self.parent is not None:
                self.parent.close()

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _abandon(self) -> None:
        """Close the file without flushing or emptying the log, as a crash would (tests)."""
        self._closed = True
        self._close_files()
        if self.parent is not None:
            self.parent.close()


def _locator_path(value: str, child_dir: Path, *, relative: bool) -> Path | None:
    """A parent locator path as a path on this machine, or None if it cannot be one here."""
    if relative:
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
        return child_dir.joinpath(*parts) if parts else None
    text = value
    for prefix in ("\\\\?\\", "\\??\\"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return Path(text)
    posix = text.replace("\\", "/")
    if PureWindowsPath(text).drive or not posix.startswith("/"):
        return None  # a drive letter, UNC share or volume GUID path: not on this machine
    return Path(posix)


def _absolute_win32_path(path: Path) -> str:
    """``\\\\?\\d:\\dir\\file.vhdx`` on Windows; on POSIX the absolute path with backslashes
    after the same prefix (``\\\\?\\\\dir\\file.vhdx``), which we map back when resolving."""
    absolute = path.resolve()
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return "\\\\?\\" + str(absolute)
    return "\\\\?\\" + str(absolute).replace("/", "\\")


def _relative_path(target: Path, start_dir: Path) -> str:
    rel = os.path.relpath(target.resolve(), start_dir.resolve())
    parts = PurePosixPath(rel.replace(os.sep, "/")).parts
    if parts and parts[0] not in ("..", "."):
        parts = (".", *parts)
    return "\\".join(parts)


def _open_layer(path: Path, *, read_only: bool) -> VhdxDisk:
    path = Path(path)
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise VirtualDiskError(f"{path}: no such file") from exc
    except OSError as exc:
        raise VirtualDiskError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    try:
        lock_file(fd, path, exclusive=not read_only)
        return VhdxDisk(path, fd, read_only=read_only)
    except BaseException:
        os.close(fd)
        raise


def open_vhdx(path: Path, *, read_only: bool = False, _chain: tuple[Path, ...] = ()) -> VirtualDisk:
    """Open a VHDX image (and its parent chain, read-only). ``_chain`` holds the resolved paths
    of the layers already opened above this one, to detect loops."""
    layer = _open_layer(Path(path), read_only=read_only)
    try:
        if layer.has_parent:
            layer._attach_parent(_chain)
    except BaseException:
        layer._abandon()
        raise
    return layer


def _layout(geo: Geometry) -> tuple[int, int, int, int, int]:
    """(log offset, metadata offset, BAT offset, BAT length, first payload offset)."""
    log_offset = HEADER_SECTION_SIZE
    meta_offset = log_offset + DEFAULT_LOG_LENGTH
    bat_offset = meta_offset + MiB
    bat_length = _round_up(geo.total_bat_entries * 8, MiB)
    return log_offset, meta_offset, bat_offset, bat_length, bat_offset + bat_length


def create_vhdx(
    path: Path,
    *,
    size: int,
    subformat: SubFormat,
    block_size: int = DEFAULT_BLOCK_SIZE,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: Path | None = None,
) -> VirtualDisk:
    """Create a VHDX image and return it opened writable. For a differencing disk the size and
    sector sizes come from ``parent`` (the arguments are ignored), and the child copies the
    parent's virtual-disk metadata items, page 83 identity included (2.6.1.2 IsVirtualDisk)."""
    path = Path(path)
    if path.exists():
        raise VirtualDiskError(f"{path}: already exists; refusing to overwrite it")
    copied: list[tuple[MetadataEntry, bytes]] = []
    locator: dict[str, str] | None = None
    if subformat == SubFormat.DIFFERENCING or parent is not None:
        if parent is None:
            raise VirtualDiskError(f"{path}: a differencing disk needs a parent")
        with open_vhdx(Path(parent), read_only=True) as p:
            assert isinstance(p, VhdxDisk)
            size = p.virtual_size
            logical_sector_size = p.logical_sector_size
            physical_sector_size = p.physical_sector_size
            copied = p._virtual_disk_items()
            locator = _parent_locator_entries(path, Path(parent), p.data_write_guid)
        subformat = SubFormat.DIFFERENCING
    if logical_sector_size not in SECTOR_SIZES or physical_sector_size not in SECTOR_SIZES:
        raise VirtualDiskError(f"{path}: sector sizes must be 512 or 4096 bytes")
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise VirtualDiskError(
            f"{path}: block size {block_size} must be a power of 2 between 1 MiB and 256 MiB"
        )
    if size <= 0 or size % logical_sector_size or size > MAX_VIRTUAL_SIZE:
        raise VirtualDiskError(
            f"{path}: size {size} must be a positive multiple of {logical_sector_size} and at "
            "most 64 TiB"
        )
    fixed = subformat == SubFormat.FIXED
    geo = Geometry(size, block_size, logical_sector_size, locator is not None)
    log_offset, meta_offset, bat_offset, bat_length, payload_offset = _layout(geo)

    items: list[tuple[uuid.UUID, int, bytes]] = [
        (
            FILE_PARAMETERS_GUID,
            MD_IS_REQUIRED,
            build_file_parameters(FileParameters(block_size, fixed, locator is not None)),
        )
    ]
    if copied:
        items += [(e.item_id, e.flags, data) for e, data in copied]
    else:
        items += [
            (
                VIRTUAL_DISK_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                size.to_bytes(8, "little"),
            ),
            (VIRTUAL_DISK_ID_GUID, MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED, uuid.uuid4().bytes_le),
            (
                LOGICAL_SECTOR_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                logical_sector_size.to_bytes(4, "little"),
            ),
            (
                PHYSICAL_SECTOR_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                physical_sector_size.to_bytes(4, "little"),
            ),
        ]
    if locator is not None:
        items.append((PARENT_LOCATOR_GUID, MD_IS_REQUIRED, build_parent_locator(locator)))
    meta = bytearray(MiB)
    entries: list[MetadataEntry] = []
    pos = METADATA_TABLE_SIZE
    for item_id, flags, data in items:
        entries.append(MetadataEntry(item_id, pos, len(data), flags))
        meta[pos : pos + len(data)] = data
        pos = _round_up(pos + len(data), 8)
    meta[:METADATA_TABLE_SIZE] = build_metadata_table(entries)

    bat = array("Q", bytes(bat_length))
    file_size = payload_offset
    if fixed:
        for block in range(geo.data_blocks):
            bat[geo.payload_index(block)] = PAYLOAD_BLOCK_FULLY_PRESENT | (
                payload_offset + block * block_size
            )
        file_size = payload_offset + geo.data_blocks * block_size
    if locator is not None:
        # Every chunk of a differencing disk gets its sector bitmap block up front: all zero
        # (every sector from the parent) and sparse in the file, 1 MiB of address space per
        # chunk (4 GiB of disk with 2 MiB blocks). The spec needs no bitmap under NOT_PRESENT
        # blocks, but libvhdi reads one anyway and, finding none, takes file offset 0 as the
        # bitmap: it then hides the parent's data in a fresh child. Present bitmaps read right
        # everywhere.
        for chunk in range(geo.bitmap_blocks):
            bat[geo.bitmap_index(chunk)] = SB_BLOCK_PRESENT | file_size
            file_size += SECTOR_BITMAP_BLOCK_SIZE
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        bat.byteswap()

    header = Header(
        sequence_number=1,
        file_write_guid=uuid.uuid4(),
        data_write_guid=uuid.uuid4(),
        log_guid=_NIL,
        log_version=LOG_VERSION,
        version=VHDX_VERSION,
        log_length=DEFAULT_LOG_LENGTH,
        log_offset=log_offset,
    )
    regions = build_region_table(
        [
            RegionEntry(BAT_REGION_GUID, bat_offset, bat_length, True),
            RegionEntry(METADATA_REGION_GUID, meta_offset, MiB, True),
        ]
    )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError as exc:
        raise VirtualDiskError(f"{path}: already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise VirtualDiskError(f"{path}: cannot create: {exc.strerror or exc}") from exc
    try:
        lock_file(fd, path, exclusive=True)
        os.pwrite(fd, build_file_identifier(CREATOR), 0)
        os.pwrite(fd, build_header(header), HEADER_OFFSETS[0])
        os.pwrite(
            fd,
            build_header(dataclasses.replace(header, sequence_number=2)),
            HEADER_OFFSETS[1],
        )
        os.pwrite(fd, regions, REGION_TABLE_OFFSETS[0])
        os.pwrite(fd, regions, REGION_TABLE_OFFSETS[1])
        os.pwrite(fd, bytes(meta), meta_offset)
        os.pwrite(fd, bat.tobytes(), bat_offset)
        os.ftruncate(fd, file_size)
        os.fsync(fd)
        disk = VhdxDisk(path, fd, read_only=False)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, OSError):
            raise VirtualDiskError(f"{path}: cannot create: {exc}") from exc
        raise
    _fsync_dir(path.parent)
    if locator is not None:
        try:
            disk._attach_parent(())
        except BaseException:
            disk._abandon()
            raise
    return disk


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _parent_locator_entries(child: Path, parent: Path, linkage: uuid.UUID) -> dict[str, str]:
    return {
        "parent_linkage": guid_text(linkage),
        "relative_path": _relative_path(parent, child.parent),
        "absolute_win32_path": _absolute_win32_path(parent),
    }


def set_parent_vhdx(child: Path, new_parent: Path) -> None:
    """Point ``child``'s parent locator at ``new_parent`` (relative and absolute paths) and its
    parent_linkage at the new parent's current DataWriteGuid - after a merge into the parent
    changed that GUID, or after the parent moved. The change goes through the log."""
    child = Path(child)
    with open_vhdx(Path(new_parent), read_only=True) as p:
        assert isinstance(p, VhdxDisk)
        linkage = p.data_write_guid
        parent_lss = p.logical_sector_size
    layer = _open_layer(child, read_only=False)
    try:
        _check_relink(layer, Path(new_parent), parent_lss)
        entries = _parent_locator_entries(child, Path(new_parent), linkage)
        layer._rewrite_metadata_item(PARENT_LOCATOR_GUID, build_parent_locator(entries))
    except BaseException:
        layer._abandon()
        raise
    layer.close()


def _check_relink(layer: VhdxDisk, new_parent: Path, parent_lss: int) -> None:
    if not layer.has_parent:
        raise layer._fail("is not a differencing disk; it has no parent to relink")
    if parent_lss != layer.logical_sector_size:
        raise layer._fail(
            f"new parent {new_parent} has {parent_lss}-byte logical sectors, this disk "
            f"{layer.logical_sector_size}-byte ones"
        )
