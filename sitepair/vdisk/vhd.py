"""VHD images: fixed, dynamic and differencing, read and write.

The structures are in :mod:`sitepair.vdisk.vhd_layout`; opening and checking a file is
:mod:`sitepair.vdisk.vhd_load`, reading :mod:`sitepair.vdisk.vhd_read`, creating
:mod:`sitepair.vdisk.vhd_create`, parent locator paths :mod:`sitepair.vdisk.vhd_locator`. This
module is the write side: :class:`VhdDisk` writes in a crash-safe order and repairs what a crash
left on a writable open; :func:`open_vhd` opens an image with its parent chain and
:func:`set_parent_vhd` relinks a differencing disk.

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

import os
import uuid
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.base import SubFormat
from sitepair.vdisk.fileio import (
    datasync,
    is_zero,
    open_image,
    pwrite_all,
    round_up,
    write_keep_holes,
)
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.vhd_locator import relative_locator
from sitepair.vdisk.vhd_read import BITMAP_CACHE_ENTRIES, ZEROS, VhdLayer, vhd_time

__all__ = ["VhdDisk", "open_vhd", "probe_vhd", "set_parent_vhd"]

#: Differencing chains deeper than this are refused (each layer holds a file descriptor).
MAX_CHAIN_DEPTH = 256
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


class VhdDisk(VhdLayer):
    """An open VHD image, read and write. Open with :func:`open_vhd`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        read_only: bool,
        chain: tuple[Path, ...],
        open_parent: bool = True,
    ) -> None:
        self._dirty_bat: set[int] = set()
        super().__init__(path, fd, read_only=read_only)
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

    # -- opening: the parent chain and repairs -------------------------------------------------
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
        self._details["parent_time_stamp"] = vhd_time(self._header.parent_timestamp)
        self._details["parent_time_stamp_matches"] = stamp == self._header.parent_timestamp

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
        step = len(ZEROS)
        while pos < end:
            n = min(step, end - pos)
            self.write(pos, memoryview(ZEROS)[:n])
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
            n = min(end - start, len(ZEROS))
            pwrite_all(self._fd, memoryview(ZEROS)[:n], start)
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
                while len(self._bitmap_cache) > BITMAP_CACHE_ENTRIES:
                    self._bitmap_cache.popitem(last=False)
            self._dirty_bat.clear()

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
            rel = relative_locator(parent_path, self.path)
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
