"""VHDX ([MS-VHDX] v8.0): fixed, dynamic and differencing images, read and write.

Structures are parsed and built in :mod:`sitepair.vdisk.vhdx_format`, the metadata log lives in
:mod:`sitepair.vdisk.vhdx_log`, CRC-32C in :mod:`sitepair.vdisk.vhdx_crc`. Opening and checking a
file is :mod:`sitepair.vdisk.vhdx_load`, reading :mod:`sitepair.vdisk.vhdx_read`, creating
:mod:`sitepair.vdisk.vhdx_create`, parent locator paths :mod:`sitepair.vdisk.vhdx_locator`.
This module is the write side: :class:`VhdxDisk` orders its writes so that a crash leaves a
consistent image, :func:`open_vhdx` opens a layer with its parent chain, and
:func:`set_parent_vhdx` relinks a differencing disk.

Crash safety of our own writes (the ordering choices the spec leaves to implementations)
    * Headers are never written through the log (2.2.2.1); see
      :meth:`sitepair.vdisk.vhdx_load.VhdxFile._update_headers`.
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

import os
import re
import sys
import uuid
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import VirtualDisk
from sitepair.vdisk.fileio import is_zero, round_up
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.vhdx_format import (
    BAT_OFFSET_MASK,
    BAT_STATE_MASK,
    HEADER_SECTION_SIZE,
    MD_IS_REQUIRED,
    METADATA_TABLE_SIZE,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNDEFINED,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    SB_BLOCK_PRESENT,
    SECTOR_BITMAP_BLOCK_SIZE,
    MetadataEntry,
    MiB,
    build_metadata_table,
    build_parent_locator,
)
from sitepair.vdisk.vhdx_locator import parent_locator_entries
from sitepair.vdisk.vhdx_log import (
    SECTOR,
    LogWriter,
    max_sectors_per_entry,
)
from sitepair.vdisk.vhdx_read import VhdxLayer

__all__ = ["VhdxDisk", "open_vhdx", "set_parent_vhdx", "with_parent_chain"]

_ZERO_MIB = bytes(MiB)
_NIL = uuid.UUID(int=0)
_PRESENT_STATES = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)
_ZERO_READ_STATES = (PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNDEFINED)


class VhdxDisk(VhdxLayer):
    """One opened VHDX layer, read and write (and, through ``parent``, the rest of its chain)."""

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        self._session_log_guid: uuid.UUID | None = None
        self._data_write_guid_changed = False
        self._log_writer: LogWriter | None = None
        self._dirty_bat: set[int] = set()
        self._dirty_bitmap: set[int] = set()
        self._data_unsynced = False
        self._broken: str | None = None
        self._free: list[tuple[int, int]] = []
        self._pending_free: list[tuple[int, int]] = []
        #: Test hook: called after a log entry is durable and before it is applied in place.
        self._after_log_entry_hook: Callable[[], None] | None = None
        super().__init__(path, fd, read_only=read_only)

    # -- the parent ------------------------------------------------------------------------
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

    # -- sector bitmaps --------------------------------------------------------------------
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
        if is_zero(view):
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
                    last_file_offset=round_up(max(size, self._alloc_end), MiB),
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
        last = round_up(max(size, self._alloc_end), MiB)
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
            offset = round_up(max(others_end, METADATA_TABLE_SIZE), 8)
            if offset + len(data) > region.length:
                raise self._fail("metadata region has no room for the new item")
        # Only the part of the region that holds the table and the items is read and compared.
        span = round_up(max([offset + len(data)] + [e.offset + e.length for e in entries]), SECTOR)
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

    def _abandon(self) -> None:
        """Close the file without flushing or emptying the log, as a crash would (tests)."""
        self._closed = True
        self._close_files()
        if self.parent is not None:
            self.parent.close()


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
    return with_parent_chain(_open_layer(Path(path), read_only=read_only), _chain)


def with_parent_chain(layer: VhdxDisk, chain: tuple[Path, ...] = ()) -> VhdxDisk:
    """``layer`` with its parent chain opened (read-only) if it is a differencing disk. If that
    fails, ``layer`` is closed without flushing (as a crash would) and the error raised.
    ``chain`` holds the resolved paths of the layers already opened above this one."""
    try:
        if layer.has_parent:
            layer._attach_parent(chain)
    except BaseException:
        layer._abandon()
        raise
    return layer


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
        entries = parent_locator_entries(child, Path(new_parent), linkage)
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
