"""Reading a VHDX layer: geometry and identity, ``info``, guest reads and allocated ranges.

:class:`VhdxLayer` adds to the checked structures of :class:`sitepair.vdisk.vhdx_load.VhdxFile`
everything that reads guest data: it maps guest offsets through the BAT, reads partially present
blocks of differencing disks sector by sector through their sector bitmaps (2.5.1.1), and falls
through to the parent where this layer holds nothing. A read-only open lays the replayed log
over every file read (see :mod:`sitepair.vdisk.vhdx_load`).
"""

from __future__ import annotations

import heapq
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from sitepair.vdisk.base import DiskFormat, DiskInfo, VirtualDisk, coalesce
from sitepair.vdisk.fileio import is_zero
from sitepair.vdisk.vhdx_format import (
    BAT_OFFSET_MASK,
    BAT_STATE_MASK,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_STATE_NAMES,
    SB_BLOCK_PRESENT,
    MetadataEntry,
    guid_text,
    parse_linkage_guid,
)
from sitepair.vdisk.vhdx_load import VhdxFile
from sitepair.vdisk.vhdx_locator import locator_path
from sitepair.vdisk.vhdx_log import SECTOR

__all__ = ["VhdxLayer"]


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


class VhdxLayer(VhdxFile):
    """One opened VHDX layer, read side (and, through ``parent``, the rest of its chain)."""

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        #: Sector bitmap sectors read so far (and, writable, changed), by file offset.
        self._bitmap_sectors: dict[int, bytearray] = {}
        super().__init__(path, fd, read_only=read_only)

    # -- the parent -----------------------------------------------------------------------
    def _check_parent(self, parent: VirtualDisk, parent_path: Path) -> None:
        assert self._locator is not None
        if not isinstance(parent, VhdxLayer):  # pragma: no cover - open_vhdx returns VHDX
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
            candidate = locator_path(value, self.path.parent, relative=key == "relative_path")
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
        if isinstance(parent, VhdxLayer) and not parent._range_may_have_data(offset, n):
            return False
        # The metadata says the parent may hold data here: look at the bytes themselves.
        return not is_zero(parent.read(offset, n))

    def virtual_disk_items(self) -> list[tuple[MetadataEntry, bytes]]:
        """Metadata items a new differencing child copies from this disk (2.6.1.2)."""
        region = self._meta_region
        return [
            (e, self._pread(e.length, region.file_offset + e.offset))
            for e in self._meta_entries
            if e.is_virtual_disk and not e.is_user
        ]
