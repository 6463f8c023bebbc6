"""VHD images: fixed, dynamic and differencing, read and write.

The structures are in :mod:`sitepair.vdisk.vhd_layout`; this module does the I/O.

Reading
    Guest offsets map through the BAT to blocks; a block's sector bitmap says which sectors
    this file holds. A clear bit reads as zeros in a dynamic disk and from the parent in a
    differencing disk. Bitmaps that are all ones are remembered as "full" and never read again;
    partial ones are cached (bounded). Contiguous file extents are read with one ``preadv``,
    including the hop over the next block's bitmap (read into a scratch buffer), so a
    sequential read of a file laid out in order costs one system call per request.

Writing and crash safety
    VHD has no log. Its metadata updates are made crash-safe by ordering alone, and each
    metadata write is a single sector (a BAT sector, a bitmap sector) that devices write
    atomically:

    1. A write into an unallocated block appends the block at the end of the data (placed
       so its data starts on a 4 KiB boundary of the file): its sector bitmap and data are
       written first, then the footer right after the new block (so the file keeps ending in
       a valid footer). The in-memory BAT points at the block at once, the on-disk BAT does
       not yet.
    2. ``flush()`` makes all of that durable (``fdatasync``), and only then writes the changed
       BAT sectors and sector bitmaps of already-referenced blocks, and syncs again.

    A crash before step 2 completes leaves the on-disk BAT as it was, so the image shows its
    last flushed state; the appended blocks are unreferenced space. If the crash tore the end
    footer, the copy at offset 0 (identical: the footer never changes when blocks are added)
    still opens the image, and ``info`` says so. A writable open repairs both: it rewrites the
    end footer right after the last referenced block and truncates the unreferenced tail.
    A crash after step 2 leaves the new state. Flushed data is therefore never lost; a write
    made after the last flush may be present, absent or (as on a real disk) partly present.

Differencing disks
    The parent is found through the parent locators, W2ru (relative to the child's folder,
    backslashes as separators) first, then W2ku (absolute). Its footer's unique id must equal
    the child's "parent unique id"; a mismatch is an error (the parent was replaced). The
    parent time stamp (the parent file's modification time when it was linked) is only
    reported: copies across hosts do not preserve modification times. A write into an
    unallocated block allocates it with a bitmap marking only the written sectors (extended
    to the end of their bitmap byte, see ``_LIBVHDI_NOTE``); the other sectors keep falling
    through to the parent, sector by sector.

Limits
    Virtual size up to 2040 GiB (the VHD maximum); block sizes that are powers of two from
    512 bytes to 256 MiB (Hyper-V itself uses 2 MiB and 512 KiB); sector size 512. Blocks are
    never freed (VHD has no way to say "zero" other than writing zeros).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, VirtualDisk, coalesce
from sitepair.vdisk.fileio import (
    IOV_MAX,
    data_ranges,
    datasync,
    file_size,
    fsync_dir,
    is_zero,
    open_image,
    pread_exact,
    preadv_exact,
    pwrite_all,
    round_up,
    write_keep_holes,
)
from sitepair.vdisk.locking import lock_file

MiB = 1 << 20
DEFAULT_BLOCK_SIZE = 2 * MiB
#: Differencing chains deeper than this are refused (each layer holds a file descriptor).
MAX_CHAIN_DEPTH = 256
#: Partial sector bitmaps kept in memory per open image (512 bytes each for 2 MiB blocks).
_BITMAP_CACHE_ENTRIES = 8192
#: A hop over at most this many bytes between two file extents is read into scratch memory
#: rather than split into two reads (the hop is usually the next block's 512-byte bitmap).
_MAX_READ_GAP = 64 * 1024
_ZEROS = bytes(4 * MiB)
#: File alignment of the data of the blocks we allocate.
_DATA_ALIGNMENT = 4096
#: Guest bytes described by one byte of a sector bitmap (8 sectors).
_BITMAP_BYTE_SPAN = 8 * 512
#: Why differencing writes are extended to the end of their bitmap byte:
_LIBVHDI_NOTE = """
libvhdi (the independent VHD reader we are checked against) decodes VHD sector bitmaps with
``byte >> (7 - bit)`` and no ``& 1``, so within one bitmap byte every sector after a set bit
reads as present in the child. A bitmap byte is therefore read correctly by libvhdi only if
its set bits are a suffix (0x00, 0x01, 0x03, ..., 0xFF). A differencing write marks the
sectors it writes plus the following sectors up to the end of their bitmap byte (at most 7,
that is up to the next 4 KiB boundary of the block), filling those with their current guest
contents (from the parent). The guest view is unchanged and every bitmap we write has that
form; we ourselves read bitmaps bit by bit, exactly as the specification says.
"""

_SUBFORMAT_OF = {
    L.DISK_FIXED: SubFormat.FIXED,
    L.DISK_DYNAMIC: SubFormat.DYNAMIC,
    L.DISK_DIFFERENCING: SubFormat.DIFFERENCING,
}
_DISK_TYPE_OF = {v: k for k, v in _SUBFORMAT_OF.items()}


def probe_vhd(head: bytes, tail: bytes) -> bool:
    """True if the first or last 512 bytes of a file carry the VHD footer cookie."""
    return head[:8] == L.FOOTER_COOKIE or tail[-L.FOOTER_SIZE :][:8] == L.FOOTER_COOKIE


def open_vhd(
    path: str | os.PathLike[str], *, read_only: bool = False, _chain: tuple[Path, ...] = ()
) -> VhdDisk:
    """Open a VHD (and, for a differencing disk, its parent chain, read-only).

    ``_chain`` lists the children already opened above this one, to detect parent loops."""
    p = Path(path)
    fd = open_image(p, read_only=read_only)
    try:
        lock_file(fd, p, exclusive=not read_only)
        return VhdDisk(p, fd, read_only=read_only, chain=_chain)
    except BaseException:
        os.close(fd)
        raise


class VhdDisk(VirtualDisk):
    """An open VHD image. Create with :func:`open_vhd`."""

    format = DiskFormat.VHD

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        read_only: bool,
        chain: tuple[Path, ...],
        open_parent: bool = True,
    ) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        self.parent = None
        self._fd = fd
        self._meta_lock = threading.Lock()
        self._details: dict[str, object] = {}
        self._repairs: list[str] = []
        self._bitmap_cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._dirty_bitmaps: dict[int, bytearray] = {}
        self._dirty_bat: set[int] = set()
        self._load()
        if self.subformat is SubFormat.DIFFERENCING and open_parent:
            self._open_parent(chain)
        if not read_only:
            try:
                self._repair()
            except BaseException:
                self._close_parent()
                raise

    def _close_parent(self) -> None:
        if self.parent is not None:
            self.parent.close()

    # -- loading ------------------------------------------------------------------------
    def _load(self) -> None:
        path, fd = self.path, self._fd
        size = file_size(fd)
        if size < L.FOOTER_SIZE:
            raise VirtualDiskError(
                f"{path}: {size} bytes is too small to be a VHD image (the footer alone is "
                f"{L.FOOTER_SIZE} bytes)"
            )
        tail = pread_exact(fd, L.FOOTER_SIZE, size - L.FOOTER_SIZE, path, "footer")
        head = pread_exact(fd, L.FOOTER_SIZE, 0, path, "footer copy")
        end_footer: L.Footer | None = None
        copy_footer: L.Footer | None = None
        end_error = copy_error = None
        try:
            end_footer = L.parse_footer(tail, f"{path}: footer at the end of the file")
        except VirtualDiskError as exc:
            end_error = exc
        if head[:8] == L.FOOTER_COOKIE:
            try:
                copy_footer = L.parse_footer(head, f"{path}: footer copy at offset 0")
            except VirtualDiskError as exc:
                copy_error = exc
        self._end_footer_ok = end_footer is not None
        self._copy_needs_repair = False
        if end_footer is not None:
            footer = end_footer
            self._details["footer"] = "end of file"
            if footer.disk_type != L.DISK_FIXED:
                if copy_footer is None:
                    why = copy_error.message if copy_error else "missing"
                    self._details["footer_copy"] = f"damaged: {why}"
                    self._copy_needs_repair = True
                elif head != tail:
                    self._details["footer_copy"] = "differs from the footer at the end"
                    self._copy_needs_repair = True
                else:
                    self._details["footer_copy"] = "ok"
        elif copy_footer is not None and copy_footer.disk_type != L.DISK_FIXED:
            footer = copy_footer
            assert end_error is not None
            self._details["footer"] = (
                f"the footer at the end of the file is damaged ({end_error.message}); "
                "read using the copy at offset 0"
            )
            self._details["footer_copy"] = "ok"
        else:
            if tail[:8] != L.FOOTER_COOKIE and head[:8] != L.FOOTER_COOKIE:
                raise VirtualDiskError(
                    f"{path}: not a VHD image (no 'conectix' footer at the end or at the start "
                    "of the file)"
                )
            reasons = [e.message for e in (end_error, copy_error) if e is not None]
            if copy_footer is not None:
                reasons.append(
                    f"{path}: the copy at offset 0 describes a fixed disk, which has no copy"
                )
            raise VirtualDiskError("; ".join(reasons))
        self._footer = footer
        # The footer exactly as found (reserved bytes included), for every copy we write.
        self._footer_bytes = tail if end_footer is not None else head
        self.subformat = _SUBFORMAT_OF[footer.disk_type]
        self._size = footer.current_size
        self._file_end = size
        if footer.disk_type == L.DISK_FIXED:
            self._load_fixed(size)
        else:
            self._load_dynamic(size)

    def _load_fixed(self, size: int) -> None:
        data_area = size - L.FOOTER_SIZE
        if data_area < self._size:
            raise VirtualDiskError(
                f"{self.path}: truncated fixed VHD: the data area holds {data_area} bytes but "
                f"the footer says the virtual size is {self._size}"
            )
        self._bs = DEFAULT_BLOCK_SIZE
        self._n = 0

    def _load_dynamic(self, size: int) -> None:
        path, fd, footer = self.path, self._fd, self._footer
        # Where the data may go: up to the end footer, or to the end of the file if that
        # footer is missing (a crash while appending a block; the copy at 0 is in use).
        limit = size - L.FOOTER_SIZE if self._end_footer_ok else size
        hoff = footer.data_offset
        if hoff + L.HEADER_SIZE > limit:
            raise VirtualDiskError(
                f"{path}: the dynamic disk header at file offset {hoff} lies beyond the end of "
                f"the file ({size} bytes): the image is truncated"
            )
        header = L.parse_dynamic_header(
            pread_exact(fd, L.HEADER_SIZE, hoff, path, "dynamic disk header"),
            f"{path}: dynamic disk header",
        )
        bs = header.block_size
        n = L.bat_entries_needed(self._size, bs)
        if header.max_table_entries < n:
            raise VirtualDiskError(
                f"{path}: the BAT has {header.max_table_entries} entries, too few for a virtual "
                f"size of {self._size} bytes in {bs}-byte blocks ({n} needed)"
            )
        if n > L.MAX_BAT_ENTRIES:
            raise VirtualDiskError(
                f"{path}: a BAT of {n} entries ({self._size} bytes in {bs}-byte blocks) is "
                f"larger than this implementation supports ({L.MAX_BAT_ENTRIES})"
            )
        bat_region = round_up(header.max_table_entries * 4, L.SECTOR)
        regions = [
            L.Region(0, L.FOOTER_SIZE, "footer copy"),
            L.Region(hoff, hoff + L.HEADER_SIZE, "dynamic disk header"),
            L.Region(header.table_offset, header.table_offset + bat_region, "BAT"),
        ]
        if header.table_offset + bat_region > limit:
            raise VirtualDiskError(
                f"{path}: the BAT ({header.max_table_entries} entries at file offset "
                f"{header.table_offset}) extends beyond the end of the file ({size} bytes)"
            )
        # Read the sectors holding the first n entries, so rewriting a BAT sector keeps any
        # entries past n exactly as they were.
        keep = min(header.max_table_entries, round_up(n * 4, L.SECTOR) // 4)
        bat = L.parse_bat(
            pread_exact(fd, keep * 4, header.table_offset, path, "BAT"),
            keep,
        )
        reserved_end = 0
        locator_data: list[tuple[L.Locator, str]] = []
        if footer.disk_type == L.DISK_DIFFERENCING:
            for idx, loc in enumerate(header.locators):
                if loc.platform_code not in (L.PLATFORM_W2RU, L.PLATFORM_W2KU):
                    continue
                if loc.data_length == 0:
                    continue
                name = f"parent locator {idx} ({loc.platform})"
                if loc.data_length > L.MAX_LOCATOR_BYTES:
                    raise VirtualDiskError(
                        f"{path}: {name} claims {loc.data_length} bytes of path (at most "
                        f"{L.MAX_LOCATOR_BYTES} are accepted)"
                    )
                if loc.data_offset + loc.data_length > limit:
                    raise VirtualDiskError(
                        f"{path}: {name} at file offset {loc.data_offset} points beyond the end "
                        f"of the file ({size} bytes)"
                    )
                regions.append(L.Region(loc.data_offset, loc.data_offset + loc.data_length, name))
                reserved_end = max(reserved_end, min(loc.reserved_end(), limit))
                raw = pread_exact(fd, loc.data_length, loc.data_offset, path, name)
                locator_data.append((loc, L.decode_locator(raw, loc.platform, f"{path}: {name}")))
        L.check_metadata_regions(regions, limit, path)
        highest = L.check_layout(
            bat=bat[:n], block_size=bs, metadata=regions, data_limit=limit, where=path
        )
        self._header = header
        self._regions = regions
        self._locators = locator_data
        self._bat = bat
        self._n = n
        self._bs = bs
        self._spb = bs // L.SECTOR
        self._bm_bytes = L.bitmap_bytes(bs)
        self._full = bytearray(n)
        self._data_end = round_up(
            max(highest, reserved_end, *(r.end for r in regions)),
            L.SECTOR,
        )
        if footer.disk_type == L.DISK_DIFFERENCING:
            self._details["parent_unique_id"] = str(header.parent_unique_id)

    def _open_parent(self, chain: tuple[Path, ...]) -> None:
        me = self.path.resolve()
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise VirtualDiskError(
                f"{self.path}: the differencing chain is deeper than {MAX_CHAIN_DEPTH} layers"
            )
        parent_path = self._find_parent()
        target = parent_path.resolve()
        if target == me or target in chain:
            loop = " -> ".join(str(p) for p in (*chain, me, target))
            raise VirtualDiskError(f"{self.path}: parent loop: {loop}")
        try:
            parent = open_vhd(parent_path, read_only=True, _chain=(*chain, me))
        except VirtualDiskError as exc:
            raise VirtualDiskError(
                f"{self.path}: cannot open its parent: {exc.message}", hint=exc.hint
            ) from exc
        try:
            self._check_parent(parent, parent_path)
        except BaseException:
            parent.close()
            raise
        self.parent = parent
        stamp = L.vhd_timestamp(parent_path.stat().st_mtime)
        self._details["parent_path"] = str(parent_path)
        self._details["parent_time_stamp"] = _vhd_time(self._header.parent_timestamp)
        self._details["parent_time_stamp_matches"] = stamp == self._header.parent_timestamp

    def _check_parent(self, parent: VhdDisk, parent_path: Path) -> None:
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
            candidate = _locator_to_path(text, self.path.parent, loc.platform_code)
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

    def _repair(self) -> None:
        """Writable opens fix what a crash or a damaged sector left behind (see module doc)."""
        if self.subformat is SubFormat.FIXED:
            return
        fd = self._fd
        target_end = self._data_end + L.FOOTER_SIZE
        if not self._end_footer_ok:
            pwrite_all(fd, self._footer_bytes, self._data_end)
            datasync(fd)
            os.ftruncate(fd, target_end)
            datasync(fd)
            self._repairs.append(
                "rewrote the damaged footer at the end of the file from the copy at offset 0"
            )
            self._end_footer_ok = True
            self._details["footer"] = "end of file"
        elif self._file_end > target_end:
            # Blocks appended but never referenced by a flushed BAT (an interrupted writer).
            pwrite_all(fd, self._footer_bytes, self._data_end)
            datasync(fd)
            os.ftruncate(fd, target_end)
            datasync(fd)
            self._repairs.append(
                f"reclaimed {self._file_end - target_end} bytes of unreferenced space at the "
                "end of the file (left by an interrupted writer)"
            )
        self._file_end = target_end
        if self._copy_needs_repair:
            pwrite_all(fd, self._footer_bytes, 0)
            datasync(fd)
            self._repairs.append("rewrote the footer copy at offset 0")
            self._copy_needs_repair = False
            self._details["footer_copy"] = "ok"

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
                "created": _vhd_time(footer.timestamp),
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
                    dst[:] = _ZEROS[: len(dst)] if len(dst) <= len(_ZEROS) else bytes(len(dst))
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
        if len(self._bitmap_cache) > _BITMAP_CACHE_ENTRIES:
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

    # -- writing ---------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        with self._write_lock:
            if self.subformat is SubFormat.FIXED:
                write_keep_holes(self._fd, offset, view)
                return
            end = offset + len(view)
            a0 = offset - offset % L.SECTOR
            a1 = round_up(end, L.SECTOR)
            if self.subformat is SubFormat.DIFFERENCING:
                # Keep every bitmap byte of the form 0..01..1 (see _LIBVHDI_NOTE).
                a1 = min(round_up(end, _BITMAP_BYTE_SPAN), round_up(end, self._bs), self._size)
            if a0 != offset or a1 != end:
                # Complete partial sectors (and the extension) with their current contents.
                buf = bytearray(a1 - a0)
                if a0 != offset:
                    buf[: L.SECTOR] = self.read(a0, L.SECTOR)
                tail = end - end % L.SECTOR
                if tail < a1:
                    buf[tail - a0 :] = self.read(tail, a1 - tail)
                buf[offset - a0 : end - a0] = view
                view, offset = memoryview(buf), a0
            self._write_aligned(offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range. Unallocated blocks that already read as zeros stay unallocated;
        VHD cannot free blocks, so allocated ones get zeros written."""
        self._check_writable()
        self._check_range(offset, length)
        pos, end = offset, offset + length
        step = len(_ZEROS)
        while pos < end:
            n = min(step, end - pos)
            self.write(pos, memoryview(_ZEROS)[:n])
            pos += n

    def _write_aligned(self, offset: int, view: memoryview) -> None:
        bs = self._bs
        pos = 0
        while pos < len(view):
            g = offset + pos
            index = g // bs
            in_block = g - index * bs
            take = min(bs - in_block, len(view) - pos)
            self._write_block(index, in_block, view[pos : pos + take])
            pos += take

    def _write_block(self, index: int, in_block: int, seg: memoryview) -> None:
        entry = self._bat[index]
        if entry == L.UNALLOCATED:
            if is_zero(seg):
                g = index * self._bs + in_block
                if self.parent is None or is_zero(self.parent.read(g, len(seg))):
                    return  # zeros over zeros: stay sparse
            self._allocate(index, in_block, seg)
            return
        pwrite_all(self._fd, seg, entry * L.SECTOR + self._bm_bytes + in_block)
        if not self._full[index]:
            self._mark_present(index, in_block // L.SECTOR, (in_block + len(seg)) // L.SECTOR)

    def _mark_present(self, index: int, s0: int, s1: int) -> None:
        """Set bitmap bits after the data is written; persisted by the next flush."""
        with self._meta_lock:
            bitmap = self._dirty_bitmaps.get(index)
            if bitmap is None:
                current = self._bitmap_locked(index)
                if current is None:
                    return
                bitmap = bytearray(current)
                if not L.set_bits(bitmap, s0, s1):
                    return
                self._dirty_bitmaps[index] = bitmap
                self._bitmap_cache.pop(index, None)
            else:
                L.set_bits(bitmap, s0, s1)
            if L.bitmap_full(bitmap, self._spb):
                self._full[index] = 1

    def _allocate(self, index: int, in_block: int, seg: memoryview) -> None:
        """Append block ``index`` holding ``seg`` at ``in_block``, then the footer after it.
        The on-disk BAT entry is written by the next flush (see the module docstring)."""
        fd, bs, bm_bytes = self._fd, self._bs, self._bm_bytes
        # Place the block so its data starts on a 4 KiB boundary of the file (the bitmap sits
        # in the sector(s) just before): guest writes of whole pages then never make the host
        # read a partial page first. The gap left before it (under 4 KiB) is referenced by
        # nothing; the specification allows any sector offset in the BAT.
        start = round_up(self._data_end + bm_bytes, _DATA_ALIGNMENT) - bm_bytes
        old_end = self._file_end
        self._zero_fill(self._data_end, start, old_end)
        if self.subformat is SubFormat.DIFFERENCING:
            bitmap = bytearray(bm_bytes)
            L.set_bits(bitmap, in_block // L.SECTOR, (in_block + len(seg)) // L.SECTOR)
        else:
            bitmap = bytearray(b"\xff" * bm_bytes)
        data_start = start + bm_bytes
        block_end = data_start + bs
        pwrite_all(fd, bitmap, start)
        # Whatever the file held where the block now lies (the old footer) must read as
        # zeros; past the old end of the file the file system gives zeros (holes) for free.
        self._zero_fill(data_start, data_start + in_block, old_end)
        pwrite_all(fd, seg, data_start + in_block)
        self._zero_fill(data_start + in_block + len(seg), block_end, old_end)
        pwrite_all(fd, self._footer_bytes, block_end)
        full = L.bitmap_full(bitmap, self._spb)
        with self._meta_lock:
            if full:
                self._full[index] = 1
            else:
                self._bitmap_cache[index] = bytes(bitmap)
        self._bat[index] = start // L.SECTOR  # readers see the block only now
        self._dirty_bat.add(index * 4 // L.SECTOR)
        self._data_end = block_end
        self._file_end = max(old_end, block_end + L.FOOTER_SIZE)

    def _zero_fill(self, start: int, end: int, file_end: int) -> None:
        end = min(end, file_end)
        while start < end:
            n = min(end - start, len(_ZEROS))
            pwrite_all(self._fd, memoryview(_ZEROS)[:n], start)
            start += n

    def flush(self) -> None:
        self._check_open()
        if self.read_only:
            return
        with self._write_lock:
            fd = self._fd
            datasync(fd)  # data, appended blocks and the moved footer first
            if not self._dirty_bat and not self._dirty_bitmaps:
                return
            with self._meta_lock:
                bitmaps = list(self._dirty_bitmaps.items())
            for index, bitmap in bitmaps:
                pwrite_all(fd, bitmap, self._bat[index] * L.SECTOR)
            table = self._header.table_offset
            for sector in sorted(self._dirty_bat):
                first = sector * (L.SECTOR // 4)
                last = min(first + L.SECTOR // 4, len(self._bat))
                pwrite_all(fd, L.pack_bat(self._bat, first, last), table + sector * L.SECTOR)
            datasync(fd)  # then the metadata that makes them visible
            with self._meta_lock:
                for index, bitmap in bitmaps:
                    self._dirty_bitmaps.pop(index, None)
                    if not self._full[index]:
                        self._bitmap_cache[index] = bytes(bitmap)
                while len(self._bitmap_cache) > _BITMAP_CACHE_ENTRIES:
                    self._bitmap_cache.popitem(last=False)
            self._dirty_bat.clear()

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- relinking -------------------------------------------------------------------------
    def _relink(self, parent_path: Path, parent_id: uuid.UUID, parent_size: int) -> None:
        """Point this differencing disk at ``parent_path``.

        New locator data is appended after the data (with the footer moved after it) and made
        durable first; then the dynamic header, which references it, is rewritten in one
        1024-byte write inside the file's first 4 KiB page and synced. A crash before the
        header write leaves the old parent link intact (the appended bytes are unreferenced);
        the header write itself is the single commit point (it is atomic on devices with
        4 KiB physical sectors, like every VHD metadata update relies on sector atomicity)."""
        if self.subformat is not SubFormat.DIFFERENCING:
            raise VirtualDiskError(f"{self.path}: not a differencing disk; it has no parent")
        if parent_size != self._size:
            raise VirtualDiskError(
                f"{self.path}: virtual size {self._size} differs from the new parent's "
                f"({parent_size}, {parent_path})"
            )
        self.flush()
        with self._write_lock:
            fd = self._fd
            entries: list[tuple[int, bytes]] = []
            rel = _relative_locator(parent_path, self.path)
            if rel is not None:
                entries.append((L.PLATFORM_W2RU, L.locator_path_bytes(rel)))
            entries.append((L.PLATFORM_W2KU, L.locator_path_bytes(str(parent_path.absolute()))))
            pos = self._data_end
            locators: list[L.Locator] = []
            regions = [r for r in self._regions if not r.name.startswith("parent locator")]
            for code, data in entries:
                space = round_up(len(data), L.SECTOR)
                pwrite_all(fd, data + bytes(space - len(data)), pos)
                locators.append(L.Locator(code, space, len(data), 0, pos))
                regions.append(L.Region(pos, pos + len(data), f"parent locator ({code:#x})"))
                pos += space
            pwrite_all(fd, self._footer_bytes, pos)
            if self._file_end > pos + L.FOOTER_SIZE:
                os.ftruncate(fd, pos + L.FOOTER_SIZE)
            datasync(fd)
            header = self._header.with_parent(
                unique_id=parent_id,
                timestamp=L.vhd_timestamp(parent_path.stat().st_mtime),
                name=parent_path.name,
                locators=tuple(locators),
            )
            pwrite_all(fd, header.pack(), self._footer.data_offset)
            datasync(fd)
            self._header = header
            self._regions = regions
            self._data_end = pos
            self._file_end = pos + L.FOOTER_SIZE
            self._locators = [
                (loc, data.decode("utf-16-le"))
                for loc, (_, data) in zip(locators, entries, strict=True)
            ]


def _vhd_time(stamp: int) -> str:
    return datetime.fromtimestamp(stamp + L.VHD_EPOCH, tz=UTC).isoformat()


def _locator_to_path(text: str, base: Path, platform: int) -> Path | None:
    """A locator's path on this system, or ``None`` if it cannot name a file here."""
    if not text:
        return None
    if platform == L.PLATFORM_W2RU:
        parts = PureWindowsPath(text).parts if "\\" in text else PurePosixPath(text).parts
        if PureWindowsPath(text).is_absolute() or PurePosixPath(text).is_absolute():
            return None
        return base.joinpath(*parts) if parts else None
    # W2ku: absolute. A Windows path ("C:\\...") only means something on Windows; ours on a
    # POSIX host is a POSIX absolute path.
    if os.name == "nt":  # pragma: no cover - Windows only
        return Path(text) if PureWindowsPath(text).is_absolute() else None
    posix = text.replace("\\", "/") if not PureWindowsPath(text).drive else None
    if posix is None or not posix.startswith("/"):
        return None
    return Path(posix)


def _relative_locator(parent: Path, child: Path) -> str | None:
    """The W2ru text for ``parent`` seen from ``child``'s folder (".\\name" style), or None
    where no relative path exists (different Windows drives)."""
    try:
        rel = os.path.relpath(parent.absolute(), child.absolute().parent)
    except ValueError:  # pragma: no cover - Windows: different drives
        return None
    rel = rel.replace(os.sep, "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    return rel


def create_vhd(
    path: str | os.PathLike[str],
    *,
    size: int | None,
    subformat: SubFormat | str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent: str | os.PathLike[str] | None = None,
) -> VhdDisk:
    """Create a VHD and return it opened writable. ``size`` is the virtual size in bytes (a
    multiple of 512); a differencing disk takes its parent's size (``size`` may be None or
    must match).

    The file is created exclusively (an existing file is never overwritten), written
    completely and synced, with its folder entry. Fixed disks are sparse files until written."""
    sub = SubFormat(subformat)
    p = Path(path)
    parent_id = uuid.UUID(int=0)
    parent_path: Path | None = None
    if sub is SubFormat.DIFFERENCING:
        if parent is None:
            raise VirtualDiskError(f"{p}: a differencing disk needs a parent")
        parent_path = Path(parent)
        with open_vhd(parent_path, read_only=True) as par:
            parent_id = par.identity
            if size is not None and size != par.virtual_size:
                raise VirtualDiskError(
                    f"{p}: size {size} differs from the parent's virtual size "
                    f"{par.virtual_size} (a differencing disk always has its parent's size)"
                )
            size = par.virtual_size
    elif parent is not None:
        raise VirtualDiskError(f"{p}: only a differencing disk has a parent")
    if size is None:
        raise VirtualDiskError(f"{p}: a size is needed to create a {sub} VHD")
    _check_create_size(p, size)
    if sub is not SubFormat.FIXED:
        _check_block_size(p, block_size)
    fd = open_image(p, read_only=False, create=True)
    try:
        lock_file(fd, p, exclusive=True)
        footer = L.new_footer(disk_type=_DISK_TYPE_OF[sub], size=size)
        fbytes = footer.pack()
        if sub is SubFormat.FIXED:
            os.ftruncate(fd, size)
            pwrite_all(fd, fbytes, size)
        else:
            n = L.bat_entries_needed(size, block_size)
            table_offset = L.FOOTER_SIZE + L.HEADER_SIZE
            bat_bytes = round_up(n * 4, L.SECTOR)
            pos = table_offset + bat_bytes
            locators: list[L.Locator] = []
            blobs: list[tuple[int, bytes]] = []
            stamp = 0
            name = ""
            if parent_path is not None:
                stamp = L.vhd_timestamp(parent_path.stat().st_mtime)
                name = parent_path.name
                texts = []
                rel = _relative_locator(parent_path, p)
                if rel is not None:
                    texts.append((L.PLATFORM_W2RU, rel))
                texts.append((L.PLATFORM_W2KU, str(parent_path.absolute())))
                for code, text in texts:
                    data = L.locator_path_bytes(text)
                    space = round_up(len(data), L.SECTOR)
                    locators.append(L.Locator(code, space, len(data), 0, pos))
                    blobs.append((pos, data + bytes(space - len(data))))
                    pos += space
            header = L.DynamicHeader(
                data_offset=L.NO_DATA_OFFSET,
                table_offset=table_offset,
                max_table_entries=n,
                block_size=block_size,
                parent_unique_id=parent_id,
                parent_timestamp=stamp,
                parent_name=name,
                locators=tuple(locators),
            )
            pwrite_all(fd, fbytes, 0)
            pwrite_all(fd, header.pack(), L.FOOTER_SIZE)
            pwrite_all(fd, b"\xff" * bat_bytes, table_offset)
            for at, blob in blobs:
                pwrite_all(fd, blob, at)
            pwrite_all(fd, fbytes, pos)
        datasync(fd)
        fsync_dir(p)
        return VhdDisk(p, fd, read_only=False, chain=())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            p.unlink()
        raise


def _check_create_size(p: Path, size: int) -> None:
    if size <= 0 or size % L.SECTOR:
        raise VirtualDiskError(
            f"{p}: a VHD's size must be a positive multiple of {L.SECTOR} bytes (got {size})"
        )
    if size > L.MAX_VIRTUAL_SIZE:
        raise VirtualDiskError(
            f"{p}: {size} bytes exceeds the VHD maximum of 2040 GiB",
            hint="use VHDX for larger disks",
        )


def _check_block_size(p: Path, block_size: int) -> None:
    if block_size & (block_size - 1) or not L.MIN_BLOCK_SIZE <= block_size <= L.MAX_BLOCK_SIZE:
        raise VirtualDiskError(
            f"{p}: VHD block size {block_size} is not a power of two between "
            f"{L.MIN_BLOCK_SIZE} and {L.MAX_BLOCK_SIZE} (Hyper-V uses 2 MiB)"
        )


def set_parent_vhd(child: str | os.PathLike[str], new_parent: str | os.PathLike[str]) -> None:
    """Relink differencing VHD ``child`` to ``new_parent`` (a VHD with the same virtual size):
    its parent locators, parent unique id and parent time stamp. The old parent is neither
    needed nor opened: this is how a grandchild is re-pointed after a merge, or a chain that
    was moved is repaired. Crash-safe (see :meth:`VhdDisk._relink`)."""
    child_path, parent_path = Path(child), Path(new_parent)
    if parent_path.resolve() == child_path.resolve():
        raise VirtualDiskError(f"{child_path}: a disk cannot be its own parent")
    with open_vhd(parent_path, read_only=True, _chain=(child_path.resolve(),)) as par:
        parent_id, parent_size = par.identity, par.virtual_size
    fd = open_image(child_path, read_only=False)
    try:
        lock_file(fd, child_path, exclusive=True)
        disk = VhdDisk(child_path, fd, read_only=False, chain=(), open_parent=False)
    except BaseException:
        os.close(fd)
        raise
    with disk:
        disk._relink(parent_path, parent_id, parent_size)
