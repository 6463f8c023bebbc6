"""Opening a VHDX file ([MS-VHDX] v8.0): headers, log replay, regions, metadata and BAT, checked.

:class:`VhdxFile` is the base of :class:`sitepair.vdisk.vhdx.VhdxDisk`: it reads and checks the
file's structures and keeps them in memory; :mod:`sitepair.vdisk.vhdx_read` adds reading and
:mod:`sitepair.vdisk.vhdx` writing.

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

Headers are never written through the log (2.2.2.1): :meth:`VhdxFile._update_headers` writes
the non-current slot with the next sequence number and flushes, then does the same to the other
slot, so both hold the same current state.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import uuid
from array import array
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import DiskFormat, SubFormat, VirtualDisk
from sitepair.vdisk.fileio import round_up
from sitepair.vdisk.vhdx_format import (
    BAT_OFFSET_MASK,
    BAT_REGION_GUID,
    BAT_STATE_MASK,
    FILE_PARAMETERS_GUID,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    KNOWN_METADATA_NAMES,
    LOG_VERSION,
    LOGICAL_SECTOR_SIZE_GUID,
    MAX_VIRTUAL_SIZE,
    METADATA_REGION_GUID,
    METADATA_TABLE_SIZE,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
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
    FormatError,
    Geometry,
    Header,
    MiB,
    RegionEntry,
    build_header,
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
    probe_vhdx,
)
from sitepair.vdisk.vhdx_log import (
    MAX_LOG_LENGTH,
    SECTOR,
    Overlay,
    find_active_sequence,
    overlay_from_sequence,
)

__all__ = ["VhdxFile"]

_ZERO_MIB = bytes(MiB)
_NIL = uuid.UUID(int=0)
#: Maps the low byte of a BAT entry to its 3-bit state (for bytes.translate).
_STATE_TABLE = bytes(b & BAT_STATE_MASK for b in range(256))
_LOW_BYTE = 0 if sys.byteorder == "little" else 7


class VhdxFile(VirtualDisk):
    """The structures of one opened VHDX file, read and checked (no guest I/O yet)."""

    format = DiskFormat.VHDX

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        self.parent: VirtualDisk | None = None
        self._fd = fd
        self._overlay: Overlay | None = None
        self._replayed_entries = 0
        self._file_write_guid_changed = False
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

    # -- the BAT -------------------------------------------------------------------------
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
        self._alloc_end = round_up(max(alloc_end, self._effective_size), MiB)

    def _describe_offset(self, offset: int) -> str:
        """``BAT entry 17 (payload block 17) at 9.0 MiB`` for the block stored at ``offset``."""
        states = self._entry_states()
        for m in re.finditer(rb"[\x06\x07]", states):
            i = m.start()
            if self._bat[i] & BAT_OFFSET_MASK == offset:
                return f"BAT entry {i} ({self._geo.describe_entry(i)}) at {human_size(offset)}"
        return f"the block at {human_size(offset)}"  # pragma: no cover - defensive

    # -- headers and the file ------------------------------------------------------------
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

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
