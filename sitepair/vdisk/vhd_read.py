"""Reading a VHD layer: geometry and identity, ``info``, guest reads and allocated ranges.

Guest offsets map through the BAT to blocks; a block's sector bitmap says which sectors this
file holds. A clear bit reads as zeros in a dynamic disk and from the parent in a differencing
disk. Bitmaps that are all ones are remembered as "full" and never read again; partial ones are
cached (bounded). Contiguous file extents are read with one ``preadv``, including the hop over
the next block's bitmap (read into a scratch buffer), so a sequential read of a file laid out in
order costs one system call per request.
"""

from __future__ import annotations

import collections
import heapq
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, coalesce
from sitepair.vdisk.fileio import (
    IOV_MAX,
    data_ranges,
    file_size,
    pread_exact,
    preadv_exact,
)
from sitepair.vdisk.vhd_load import VhdFile
from sitepair.vdisk.vhd_locator import locator_to_path

__all__ = ["BITMAP_CACHE_ENTRIES", "ZEROS", "VhdLayer"]

MiB = 1 << 20
#: Partial sector bitmaps kept in memory per open image (512 bytes each for 2 MiB blocks).
BITMAP_CACHE_ENTRIES = 8192
#: A hop over at most this many bytes between two file extents is read into scratch memory
#: rather than split into two reads (the hop is usually the next block's 512-byte bitmap).
_MAX_READ_GAP = 64 * 1024
ZEROS = bytes(4 * MiB)


class VhdLayer(VhdFile):
    """One opened VHD layer, read side (and, through ``parent``, the rest of its chain)."""

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        self._meta_lock = threading.Lock()
        self._bitmap_cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        #: Sector bitmaps changed since the last flush (the write side fills it).
        self._dirty_bitmaps: dict[int, bytearray] = {}
        super().__init__(path, fd, read_only=read_only)

    # -- the parent ------------------------------------------------------------------------
    def _check_parent(self, parent: VhdLayer, parent_path: Path) -> None:
        expected = self._header.parent_unique_id
        if parent.identity != expected:
            raise VirtualDiskError(
                f"{self.path}: parent id mismatch: this disk expects a parent with unique "
                f"id {expected}, but {parent_path} has {parent.identity}",
                hint="the parent was replaced or a different file was found; relink the "
                "child to its real parent",
            )
        if parent.virtual_size != self._size:
            raise VirtualDiskError(
                f"{self.path}: virtual size {self._size} differs from its parent's "
                f"({parent.virtual_size}, {parent_path})"
            )

    def _find_parent(self) -> Path:
        """Resolve the parent: W2ru (relative) first, then W2ku (absolute)."""
        tried: list[str] = []
        order = {L.PLATFORM_W2RU: 0, L.PLATFORM_W2KU: 1}
        for loc, text in sorted(self._locators, key=lambda lt: order[lt[0].platform_code]):
            candidate = locator_to_path(text, self.path.parent, loc.platform_code)
            if candidate is None:
                tried.append(f"{loc.platform} {text!r} (not a path on this system)")
                continue
            if candidate.is_file():
                return candidate
            tried.append(f"{loc.platform} {text!r} -> {candidate} (missing)")
        if not tried:
            raise VirtualDiskError(
                f"{self.path}: differencing disk without a W2ru or W2ku parent locator"
            )
        raise VirtualDiskError(
            f"{self.path}: parent not found; tried " + ", ".join(tried),
            hint="restore the parent file or relink the child to it",
        )

    # -- geometry and identity -------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def logical_sector_size(self) -> int:
        return L.SECTOR

    @property
    def physical_sector_size(self) -> int:
        return L.SECTOR

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def identity(self) -> uuid.UUID:
        return self._footer.unique_id

    def info(self) -> DiskInfo:
        self._check_open()
        own = list(self.allocated_ranges(this_layer_only=True))
        footer = self._footer
        details: dict[str, object] = dict(self._details)
        details.update(
            {
                "creator_application": footer.creator_app.decode("latin-1"),
                "creator_version": f"{footer.creator_version >> 16}."
                f"{footer.creator_version & 0xFFFF}",
                "creator_host_os": footer.creator_host_os.decode("latin-1"),
                "created": vhd_time(footer.timestamp),
                "geometry_chs": [footer.cylinders, footer.heads, footer.sectors_per_track],
                "chs_size": footer.chs_size,
                "original_size": footer.original_size,
                "saved_state": bool(footer.saved_state),
            }
        )
        if self.subformat is not SubFormat.FIXED:
            details["bat_entries"] = self._header.max_table_entries
            details["allocated_blocks"] = sum(
                1 for i in range(self._n) if self._bat[i] != L.UNALLOCATED
            )
            details["parent_locators"] = [
                {"platform": loc.platform, "path": text} for loc, text in self._locators
            ]
        if self._repairs:
            details["repaired"] = list(self._repairs)
        return DiskInfo(
            path=str(self.path),
            format=DiskFormat.VHD,
            subformat=self.subformat,
            virtual_size=self._size,
            logical_sector_size=L.SECTOR,
            physical_sector_size=L.SECTOR,
            block_size=self._bs,
            identity=footer.unique_id,
            file_size=file_size(self._fd),
            allocated_bytes=sum(length for _, length in own),
            change_token=None,
            parent=self.parent.info() if self.parent is not None else None,
            details=details,
        )

    # -- reading ---------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        self._check_range(offset, length)
        if length == 0:
            return b""
        if self.subformat is SubFormat.FIXED:
            return pread_exact(self._fd, length, offset, self.path, "guest data")
        bs = self._bs
        first = offset // bs
        if first == (offset + length - 1) // bs:
            # Within one block whose bitmap is full: straight from the file, no copy.
            entry = self._bat[first]
            if entry != L.UNALLOCATED and (self._full[first] or self._bitmap(first) is None):
                pos = entry * L.SECTOR + self._bm_bytes + offset - first * bs
                return pread_exact(self._fd, length, pos, self.path, f"block {first}")
        out = bytearray(length)
        self._read_dynamic(offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        self._check_range(offset, len(buf))
        if not len(buf):
            return
        if self.subformat is SubFormat.FIXED:
            preadv_exact(self._fd, [buf], offset, self.path, "guest data")
            return
        self._read_dynamic(offset, buf)

    def _read_dynamic(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` (guest bytes at ``offset``), batching file extents into ``preadv``
        calls and parent (or zero) extents into one parent read each."""
        bs, bm_bytes, end = self._bs, self._bm_bytes, offset + len(out)
        fd, path = self._fd, self.path
        scratch = memoryview(bytearray(0))
        iov: list[memoryview] = []
        iov_start = iov_end = -1
        par_start = par_end = -1

        def flush_file() -> None:
            nonlocal iov, iov_start, iov_end
            if iov:
                preadv_exact(fd, iov, iov_start, path, "block data")
            iov, iov_start, iov_end = [], -1, -1

        def flush_parent() -> None:
            nonlocal par_start, par_end
            if par_start >= 0:
                dst = out[par_start - offset : par_end - offset]
                if self.parent is not None:
                    self.parent.read_into(par_start, dst)
                else:
                    dst[:] = ZEROS[: len(dst)] if len(dst) <= len(ZEROS) else bytes(len(dst))
            par_start = par_end = -1

        def add_file(file_off: int, g0: int, g1: int) -> None:
            nonlocal iov_start, iov_end, scratch
            dst = out[g0 - offset : g1 - offset]
            gap = file_off - iov_end
            if iov and len(iov) < IOV_MAX - 2 and 0 <= gap <= _MAX_READ_GAP:
                if gap:
                    if len(scratch) < gap:
                        scratch = memoryview(bytearray(max(gap, bm_bytes)))
                    iov.append(scratch[:gap])
                iov.append(dst)
            else:
                flush_file()
                iov.append(dst)
                iov_start = file_off
            iov_end = file_off + len(dst)

        def add_parent(g0: int, g1: int) -> None:
            nonlocal par_start, par_end
            if par_start >= 0 and par_end == g0:
                par_end = g1
                return
            flush_parent()
            par_start, par_end = g0, g1

        for i in range(offset // bs, (end - 1) // bs + 1):
            b0 = i * bs
            g0, g1 = max(offset, b0), min(end, b0 + bs)
            entry = self._bat[i]
            if entry == L.UNALLOCATED:
                add_parent(g0, g1)
                continue
            data_base = entry * L.SECTOR + bm_bytes - b0  # file offset of guest offset 0
            bitmap = None if self._full[i] else self._bitmap(i)
            if bitmap is None:
                add_file(data_base + g0, g0, g1)
                continue
            s0 = (g0 - b0) // L.SECTOR
            s1 = -(-(g1 - b0) // L.SECTOR)
            for r0, r1, present in L.sector_runs(bitmap, s0, s1):
                a, b = max(g0, b0 + r0 * L.SECTOR), min(g1, b0 + r1 * L.SECTOR)
                if present:
                    add_file(data_base + a, a, b)
                else:
                    add_parent(a, b)
        flush_file()
        flush_parent()

    def _bitmap(self, index: int) -> bytes | None:
        """The sector bitmap of allocated block ``index``; ``None`` when every bit is set."""
        with self._meta_lock:
            return self._bitmap_locked(index)

    def _bitmap_locked(self, index: int) -> bytes | None:
        if self._full[index]:
            return None
        dirty = self._dirty_bitmaps.get(index)
        if dirty is not None:
            return bytes(dirty)
        cached = self._bitmap_cache.get(index)
        if cached is not None:
            self._bitmap_cache.move_to_end(index)
            return cached
        raw = pread_exact(
            self._fd,
            self._bm_bytes,
            self._bat[index] * L.SECTOR,
            self.path,
            f"sector bitmap of block {index}",
        )
        if L.bitmap_full(raw, self._spb):
            self._full[index] = 1
            return None
        self._bitmap_cache[index] = raw
        if len(self._bitmap_cache) > BITMAP_CACHE_ENTRIES:
            self._bitmap_cache.popitem(last=False)
        return raw

    def allocated_ranges(self, *, this_layer_only: bool = False) -> Iterator[tuple[int, int]]:
        self._check_open()
        own = self._own_ranges()
        if this_layer_only or self.parent is None:
            return iter(own)
        return coalesce(heapq.merge(own, self.parent.allocated_ranges()))

    def _own_ranges(self) -> list[tuple[int, int]]:
        if self.subformat is SubFormat.FIXED:
            return list(data_ranges(self._fd, 0, self._size))
        bs, size = self._bs, self._size
        precise = self.subformat is SubFormat.DIFFERENCING
        out: list[tuple[int, int]] = []
        bat = self._bat
        for i in range(self._n):
            if bat[i] == L.UNALLOCATED:
                continue
            b0 = i * bs
            bitmap = self._bitmap(i) if precise and not self._full[i] else None
            if bitmap is None:
                out.append((b0, min(bs, size - b0)))
                continue
            last = min(self._spb, -(-(size - b0) // L.SECTOR))
            for r0, r1, present in L.sector_runs(bitmap, 0, last):
                if present:
                    a = b0 + r0 * L.SECTOR
                    out.append((a, min(b0 + r1 * L.SECTOR, size) - a))
        return list(coalesce(out))


def vhd_time(stamp: int) -> str:
    return datetime.fromtimestamp(stamp + L.VHD_EPOCH, tz=UTC).isoformat()
