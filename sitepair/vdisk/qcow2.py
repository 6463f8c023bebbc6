"""qcow2 images, read-only: the overlays QEMU puts on a running VM's disk, read through their
backing chain.

Why we read qcow2 at all
    The ``qemu`` host backend takes a consistent cut of a running VM by placing an external
    qcow2 overlay on top of each disk (QEMU's ``blockdev-snapshot``). From then on the guest
    writes into the overlay, so the clusters the overlay has allocated are exactly what the
    guest wrote since the cut: :meth:`Qcow2Disk.allocated_ranges` with
    ``this_layer_only=True`` is the change set, and :meth:`Qcow2Disk.read` gives the guest
    bytes of the whole chain (overlay, then its backing VHDX, VHD, raw or qcow2 image).
    sitepair never writes qcow2: QEMU owns those files. Opening one for writing is refused.

Layout (facts from QEMU's ``docs/interop/qcow2.txt``; the header is decoded and checked in
:mod:`sitepair.vdisk.qcow2_header`)
    A big-endian header in the first cluster (version 2: 72 bytes; version 3: at least 104,
    then header extensions). Guest offsets map through a two-level table: the L1 table (one
    8-byte entry per L2 table) and L2 tables of one cluster each. An L2 entry describes one
    guest cluster: unallocated (read the backing file, or zeros), a data cluster at a
    cluster-aligned host offset, a zero cluster (version 3, bit 0: reads as zeros whatever the
    backing file holds), or a compressed cluster (bit 62: a byte offset and a sector count,
    deflate or zstd). With extended L2 entries (16 bytes) each cluster is split into 32
    subclusters with one "allocated" and one "reads as zero" bit each.

Trust
    Every offset and size read from the file is checked before it is used: header fields, the
    L1 table's size and place, each L2 table's place, each data cluster's alignment and place,
    each compressed cluster's extent and decompressed size (which is bounded to one cluster
    before anything is allocated for it). A damaged or hostile image gives a
    :class:`VirtualDiskError` naming the structure, never a traceback, a read outside the file
    or an allocation proportional to a claimed size. The image must not change while it is open
    (the backend reads an overlay only once QEMU holds it as a read-only backing file).

    The backing file named in the header is opened as that header says, so a qcow2 header is
    trusted to name its backing file. That is why format detection never takes guest-controlled
    bytes for a qcow2 header (see :func:`sitepair.vdisk.detect_format`) and why callers that
    know an image is qcow2 pass the format explicitly.

Refused
    Encryption (AES, LUKS), external data files, images marked corrupt, unknown incompatible
    feature bits, compression types other than zlib and zstd, cluster sizes outside 512 bytes to
    2 MiB, backing files given as QEMU protocol or ``json:`` names, backing formats other than
    raw, vpc (VHD), vhdx and qcow2. A *dirty* image (version 3, bit 0: not closed cleanly, so
    its reference counts may be stale) is read (reading uses only the L1 and L2 tables, which
    are always consistent) and says so in :attr:`Qcow2Disk.dirty` and ``info``. Internal
    snapshots are ignored: the active L1 table is what the guest sees.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import zstandard

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, VirtualDisk, coalesce
from sitepair.vdisk.fileio import file_size, open_image, pread, pread_exact, preadv_exact
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    SECTOR,
    SUBCLUSTERS,
    parse_header,
)

__all__ = ["Qcow2Disk", "open_qcow2"]

#: Backing chains deeper than this (qcow2 layers) are refused: each layer holds a descriptor.
MAX_CHAIN_DEPTH: Final = 64
#: Memory for cached L2 tables per open image (at least a few tables whatever the cluster size).
L2_CACHE_BYTES: Final = 32 << 20
_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")

#: Bits 9-55 of L1 entries and of standard cluster descriptors: a host offset.
OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L2_COMPRESSED: Final = 1 << 62
L2_ZERO: Final = 1 << 0
_LOW32: Final = 0xFFFF_FFFF

#: Backing formats we open, by the names QEMU writes into the backing format extension.
BACKING_FORMATS: Final = {
    "raw": DiskFormat.RAW,
    "vpc": DiskFormat.VHD,
    "vhd": DiskFormat.VHD,
    "vhdx": DiskFormat.VHDX,
    "qcow2": DiskFormat.QCOW2,
}
#: ``nbd:``, ``http:``, ``json:`` ...: QEMU protocol names, not files (one letter is a drive).
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
#: Maps every non-zero byte to 1, so ``find(1)`` (memchr) locates non-zero table entries.
_MARK_NONZERO = bytes([0]) + bytes([1]) * 255
_ZEROS = bytes(1 << 20)

# What a unit (cluster or subcluster) of this layer holds.
UNALLOCATED: Final = 0
DATA: Final = 1
ZERO: Final = 2
COMPRESSED: Final = 3


def _nonzero_entries(table: bytes, entry_size: int) -> Iterator[int]:
    """Indexes of the entries of ``table`` that have a non-zero byte, in order. A byte
    translation and ``find`` run in C: a mostly empty 64 KiB L2 table takes ~50 µs, where a
    regular expression or a loop over the entries takes several times that."""
    marks = table.translate(_MARK_NONZERO)
    pos = marks.find(1)
    while pos >= 0:
        index = pos // entry_size
        yield index
        pos = marks.find(1, (index + 1) * entry_size)


def _byteswapped(data: bytes) -> array[int]:
    """Big-endian 64-bit entries as native integers, without a Python int per entry."""
    out = array("Q")
    out.frombytes(data)
    if sys.byteorder == "little":
        out.byteswap()
    return out


class Qcow2Disk(VirtualDisk):
    """One open qcow2 layer (read-only) and, through ``parent``, its backing chain.
    Open with :func:`open_qcow2` or ``open_disk(path, read_only=True)``."""

    format = DiskFormat.QCOW2

    def __init__(self, path: Path, fd: int) -> None:
        super().__init__()
        self.path = path
        self.read_only = True
        self.parent = None
        self._fd = fd
        self._file_size = file_size(fd)
        # The header, its extensions and the backing file name fill (part of) the first cluster.
        head = pread(fd, 64 * 1024, 0)
        cluster_bits = struct.unpack_from(">I", head, 20)[0] if len(head) >= 24 else 0
        if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            cluster = 1 << cluster_bits
            head = head[:cluster] if cluster <= len(head) else pread(fd, cluster, 0)
        h = parse_header(head, self._file_size, str(path))
        self.header = h
        self.subformat = SubFormat.DIFFERENCING if h.backing_file else SubFormat.DYNAMIC
        self._cb = h.cluster_bits
        self._cs = h.cluster_size
        self._ext = h.extended_l2
        self._es = h.l2_entry_size
        self._l2_bits = (h.l2_entries).bit_length() - 1
        self._l1_span_bits = self._cb + self._l2_bits
        self._unit_bits = self._cb - (5 if self._ext else 0)
        self._size = h.virtual_size
        needed = h.l1_entries_needed
        raw_l1 = pread_exact(fd, needed * 8, h.l1_table_offset, path, "L1 table") if needed else b""
        self._l1 = _byteswapped(raw_l1)
        self._l1_used = self._used_l1_entries(raw_l1)
        # Compressed descriptor (x = 62 - (cluster_bits - 8)): offset below bit x, then the
        # count of additional 512-byte sectors.
        self._c_shift = 62 - (self._cb - 8)
        self._c_offset_mask = (1 << self._c_shift) - 1
        self._c_sectors_mask = (1 << (self._cb - 8)) - 1
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = max(4, L2_CACHE_BYTES // self._cs)
        self._cache_lock = threading.Lock()
        self._local = threading.local()

    def _used_l1_entries(self, raw_l1: bytes) -> list[int]:
        """Indexes of the L1 entries that point to an L2 table, in order. Two entries pointing
        to one table would make the guest see the same clusters twice (and a hostile image
        could make a scan revisit one table millions of times): that is refused."""
        used: list[int] = []
        owner: dict[int, int] = {}
        for index in _nonzero_entries(raw_l1, 8):
            offset = self._l1[index] & OFFSET_MASK
            if not offset:
                continue
            first = owner.setdefault(offset, index)
            if first != index:
                raise self._fail(
                    f"L1 entries {first} and {index} both point to the L2 table at file offset "
                    f"{offset}"
                )
            used.append(index)
        return used

    # -- geometry and identity -------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def logical_sector_size(self) -> int:
        return SECTOR

    @property
    def physical_sector_size(self) -> int:
        return SECTOR

    @property
    def block_size(self) -> int:
        """The cluster size (the unit of allocation and of change tracking)."""
        return self._cs

    @property
    def identity(self) -> None:
        return None

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def dirty(self) -> bool:
        """The image was not closed cleanly (version 3 dirty bit): its reference counts may be
        stale. Reading is unaffected (it uses only the L1 and L2 tables), but the writer that
        left it so has not finished with it."""
        return self.header.dirty

    @property
    def backing_file(self) -> str | None:
        """The backing file name as the header records it (relative names are relative to
        this image's folder)."""
        return self.header.backing_file

    def info(self) -> DiskInfo:
        self._check_open()
        h = self.header
        details: dict[str, object] = {
            "qcow2_version": h.version,
            "cluster_size": self._cs,
            "dirty": h.dirty,
            "lazy_refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "extended_l2": h.extended_l2,
            "compression_type": COMPRESSION_NAMES[h.compression_type],
            "refcount_bits": 1 << h.refcount_order,
            "internal_snapshots": h.nb_snapshots,
        }
        if h.backing_file is not None:
            details["backing_file"] = h.backing_file
            details["backing_format"] = h.backing_format or "(probed)"
        return DiskInfo(
            path=str(self.path),
            format=DiskFormat.QCOW2,
            subformat=self.subformat,
            virtual_size=self._size,
            logical_sector_size=SECTOR,
            physical_sector_size=SECTOR,
            block_size=self._cs,
            identity=None,
            file_size=self._file_size,
            allocated_bytes=sum(n for _, n in self.allocated_ranges(this_layer_only=True)),
            change_token=None,
            parent=self.parent.info() if self.parent is not None else None,
            details=details,
        )

    # -- the mapping -------------------------------------------------------------------------
    def _fail(self, message: str, *, hint: str | None = None) -> VirtualDiskError:
        return VirtualDiskError(f"{self.path}: {message}", hint=hint)

    def _l2_offset(self, l1_index: int) -> int:
        """File offset of the L2 table behind an L1 entry (0: none), checked."""
        offset: int = self._l1[l1_index] & OFFSET_MASK
        if offset and (offset % self._cs or offset + self._cs > self._file_size):
            raise self._fail(
                f"L1 entry {l1_index} points to an L2 table at file offset {offset}, which is "
                + (
                    "not a cluster boundary"
                    if offset % self._cs
                    else f"past the end of the file ({self._file_size} bytes)"
                )
            )
        return offset

    def _l2_table(self, offset: int) -> bytes:
        with self._cache_lock:
            table = self._cache.get(offset)
            if table is not None:
                self._cache.move_to_end(offset)
                return table
        table = pread_exact(self._fd, self._cs, offset, self.path, "L2 table")
        with self._cache_lock:
            self._cache[offset] = table
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return table

    def _where(self, cluster: int) -> str:
        return f"the L2 entry of guest offset {cluster << self._cb}"

    def _data_offset(self, entry: int, cluster: int, *, check_end: bool = True) -> int:
        host: int = entry & OFFSET_MASK
        if host % self._cs:
            raise self._fail(
                f"{self._where(cluster)} points to file offset {host}, which is not a cluster "
                f"boundary ({self._cs}-byte clusters)"
            )
        if check_end and host >= self._file_size:
            raise self._fail(
                f"{self._where(cluster)} points to file offset {host}, past the end of the file "
                f"({self._file_size} bytes)"
            )
        return host

    def _compressed_extent(self, entry: int, cluster: int) -> tuple[int, int]:
        """(file offset, bytes to read) of a compressed cluster, checked against the file."""
        descriptor = entry & ((1 << 62) - 1)
        offset = descriptor & self._c_offset_mask
        sectors = ((descriptor >> self._c_shift) & self._c_sectors_mask) + 1
        length = sectors * SECTOR - (offset % SECTOR)
        if offset >> 56:
            raise self._fail(
                f"{self._where(cluster)}: compressed cluster offset {offset} has bits above 55"
            )
        if offset < self._cs or offset >= self._file_size:
            raise self._fail(
                f"{self._where(cluster)}: compressed cluster at file offset {offset} is outside "
                f"the file's data (the file has {self._file_size} bytes)"
            )
        # The last sector may be cut short by the end of the file, never by more.
        if offset + length - self._file_size >= SECTOR:
            raise self._fail(
                f"{self._where(cluster)}: compressed cluster at file offset {offset} claims "
                f"{sectors} sectors, which run past the end of the file ({self._file_size} bytes)"
            )
        return offset, min(length, self._file_size - offset)

    def _units(self, cluster: int, entry: int, bitmap: int) -> Iterator[tuple[int, int, int, int]]:
        """What one L2 entry says: (first unit, unit count, kind, host offset of the first unit
        or, for compressed clusters, the entry). Units are clusters, or subclusters with
        extended L2 entries."""
        if entry & L2_COMPRESSED:
            self._compressed_extent(entry, cluster)
            yield 0, 1 if not self._ext else SUBCLUSTERS, COMPRESSED, entry
            return
        if not self._ext:
            if entry & L2_ZERO:
                self._data_offset(entry, cluster, check_end=False)
                yield 0, 1, ZERO, 0
            elif entry & OFFSET_MASK:
                yield 0, 1, DATA, self._data_offset(entry, cluster)
            else:
                yield 0, 1, UNALLOCATED, 0
            return
        alloc = bitmap & _LOW32
        zero = bitmap >> 32
        if alloc & zero:
            raise self._fail(
                f"{self._where(cluster)}: subclusters {alloc & zero:#010x} are marked both "
                "allocated and zero"
            )
        host = 0
        if entry & OFFSET_MASK:
            host = self._data_offset(entry, cluster, check_end=bool(alloc))
        elif alloc:
            raise self._fail(
                f"{self._where(cluster)}: subclusters {alloc:#010x} are allocated but the "
                "cluster has no host offset"
            )
        unit = self._cs // SUBCLUSTERS
        i = 0
        while i < SUBCLUSTERS:
            kind = DATA if alloc >> i & 1 else ZERO if zero >> i & 1 else UNALLOCATED
            j = i + 1
            while j < SUBCLUSTERS:
                nxt = DATA if alloc >> j & 1 else ZERO if zero >> j & 1 else UNALLOCATED
                if nxt != kind:
                    break
                j += 1
            yield i, j - i, kind, host + i * unit if kind == DATA else 0
            i = j

    def _entry(self, table: bytes, index: int) -> tuple[int, int]:
        if self._ext:
            entry, bitmap = _U64X2.unpack_from(table, index * 16)
            return int(entry), int(bitmap)
        return int(_U64.unpack_from(table, index * 8)[0]), 0

    def layer_extents(self) -> Iterator[tuple[int, int, bool]]:
        """What this layer holds, in guest order: ``(offset, length, zero)`` runs, ``zero``
        False for data (compressed or not) and True for ranges the layer says read as zeros
        (zero clusters and subclusters). Unallocated ranges (the backing file shows through)
        are left out. Reads only the L1 table and the L2 tables in use."""
        self._check_open()
        return iter(list(self._layer_extents()))

    def _layer_extents(self) -> Iterator[tuple[int, int, bool]]:
        es, cb, ub = self._es, self._cb, self._unit_bits
        size = self._size
        cur_off = cur_end = -1
        cur_zero = False
        for l1_index in self._l1_used:
            l2 = self._l2_offset(l1_index)
            table = self._l2_table(l2)
            first = l1_index << self._l2_bits
            for index in _nonzero_entries(table, es):
                cluster = first + index
                base = cluster << cb
                if base >= size:
                    break
                entry, bitmap = self._entry(table, index)
                for unit, count, kind, _host in self._units(cluster, entry, bitmap):
                    if kind == UNALLOCATED:
                        continue
                    start = base + (unit << ub)
                    end = min(size, start + (count << ub))
                    zero = kind == ZERO
                    if start == cur_end and zero == cur_zero:
                        cur_end = end
                        continue
                    if cur_off >= 0:
                        yield cur_off, cur_end - cur_off, cur_zero
                    cur_off, cur_end, cur_zero = start, end, zero
        if cur_off >= 0:
            yield cur_off, cur_end - cur_off, cur_zero

    def allocated_ranges(self, *, this_layer_only: bool = False) -> Iterator[tuple[int, int]]:
        """Guest ranges this layer (and, unless ``this_layer_only``, its backing chain) holds.

        A cluster (subcluster with extended L2 entries) counts as allocated in a layer when its
        L2 entry points to data (plain or compressed) *or marks it zero*: zero clusters are
        what the guest wrote zeros into or discarded, so they count as written and a replica
        must receive zeros for them, whatever the layers below hold. With
        ``this_layer_only=True`` this is exactly what the guest wrote into this overlay.
        Reads only the L1 table and the L2 tables in use."""
        self._check_open()
        own = list(coalesce((off, n) for off, n, _zero in self._layer_extents()))
        if this_layer_only or self.parent is None:
            return iter(own)
        limit = self._size
        below = [
            (off, min(off + n, limit) - off)
            for off, n in self.parent.allocated_ranges()
            if off < limit
        ]
        return iter(list(coalesce(sorted(own + below))))

    # -- reading -----------------------------------------------------------------------------
    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(guest offset, length, kind, host) runs covering ``[start, end)``: DATA runs are
        contiguous in the file (host is the file offset of their first byte), ZERO and
        UNALLOCATED runs are merged, COMPRESSED runs stay within one cluster (host is the L2
        entry)."""
        cb, ub = self._cb, self._unit_bits
        span_bits = self._l1_span_bits
        index_mask = (1 << self._l2_bits) - 1
        cur: list[int] | None = None
        pos = start
        while pos < end:
            l1_index = pos >> span_bits
            l2 = self._l2_offset(l1_index)
            pieces: list[tuple[int, int, int, int]]
            if not l2:
                stop = min(end, (l1_index + 1) << span_bits)
                pieces = [(pos, stop - pos, UNALLOCATED, 0)]
            else:
                cluster = pos >> cb
                base = cluster << cb
                entry, bitmap = self._entry(self._l2_table(l2), cluster & index_mask)
                pieces = []
                for unit, count, kind, host in self._units(cluster, entry, bitmap):
                    u_start = base + (unit << ub)
                    u_end = min(end, u_start + (count << ub))
                    if u_end <= pos:
                        continue
                    s = max(pos, u_start)
                    h = host + (s - u_start) if kind == DATA else host
                    pieces.append((s, u_end - s, kind, h))
                    if u_end >= end:
                        break
                stop = pieces[-1][0] + pieces[-1][1]
            for off, n, kind, host in pieces:
                if (
                    cur is not None
                    and kind == cur[2]
                    and kind != COMPRESSED
                    and (kind != DATA or host == cur[3] + cur[1])
                ):
                    cur[1] += n
                    continue
                if cur is not None:
                    yield cur[0], cur[1], cur[2], cur[3]
                cur = [off, n, kind, host]
            pos = stop
        if cur is not None:
            yield cur[0], cur[1], cur[2], cur[3]

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        self._check_range(offset, len(buf))
        for off, n, kind, host in self._runs(offset, offset + len(buf)):
            view = buf[off - offset : off - offset + n]
            if kind == DATA:
                preadv_exact(self._fd, [view], host, self.path, "data cluster")
            elif kind == ZERO:
                _fill_zeros(view)
            elif kind == UNALLOCATED:
                self._read_below(off, view)
            else:
                cluster = off >> self._cb
                data = self._decompressed(host, cluster)
                at = off - (cluster << self._cb)
                view[:] = data[at : at + n]

    def _read_below(self, offset: int, view: memoryview) -> None:
        parent = self.parent
        if parent is None:
            _fill_zeros(view)
            return
        inside = max(0, min(len(view), parent.virtual_size - offset))
        if inside:
            parent.read_into(offset, view[:inside])
        if inside < len(view):
            _fill_zeros(view[inside:])

    def _decompressed(self, entry: int, cluster: int) -> bytes:
        """The cluster a compressed L2 entry describes (exactly one cluster, or an error)."""
        last = getattr(self._local, "last", None)
        if last is not None and last[0] == entry:
            cached: bytes = last[1]
            return cached
        offset, length = self._compressed_extent(entry, cluster)
        packed = pread_exact(self._fd, length, offset, self.path, "compressed cluster")
        cs = self._cs
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                out = self._zstd_cluster(packed)
            else:
                # Raw deflate, as QEMU writes it; the output is bounded to one cluster.
                out = zlib.decompressobj(-15).decompress(packed, cs)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise self._fail(
                f"compressed cluster of guest offset {cluster << self._cb} (file offset "
                f"{offset}) does not decompress: {exc}"
            ) from exc
        if len(out) != cs:
            raise self._fail(
                f"compressed cluster of guest offset {cluster << self._cb} (file offset "
                f"{offset}) decompresses to {len(out)} bytes, not one cluster ({cs})"
            )
        self._local.last = (entry, out)
        return out

    def _zstd_cluster(self, packed: bytes) -> bytes:
        decompressor = getattr(self._local, "zstd", None)
        if decompressor is None:
            # A window above 8 MiB is refused (a cluster is at most 2 MiB).
            decompressor = self._local.zstd = zstandard.ZstdDecompressor(max_window_size=8 << 20)
        reader = decompressor.stream_reader(io.BytesIO(packed), read_across_frames=True)
        parts: list[bytes] = []
        got = 0
        while got < self._cs:
            piece = reader.read(self._cs - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    # -- writing: refused ----------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise _read_only_error(self.path)

    def write_zeroes(self, offset: int, length: int) -> None:
        raise _read_only_error(self.path)

    def flush(self) -> None:
        self._check_open()

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- the backing chain ---------------------------------------------------------------------
    def _backing_path(self, name: str) -> Path:
        if name.startswith("json:"):
            raise self._fail(
                f"backing file {name[:60]!r} is a QEMU JSON description, not a file name"
            )
        match = _PROTOCOL.match(name)
        if match:
            if match.group(1) != "file":
                raise self._fail(
                    f"backing file {name!r} names a QEMU protocol ({match.group(1)}:), not a "
                    "file; sitepair follows backing files on local paths only"
                )
            name = name[len("file:") :]
        path = Path(name)
        return path if path.is_absolute() else self.path.parent / path

    def _backing_format(self, path: Path) -> DiskFormat:
        named = self.header.backing_format
        if named is not None:
            fmt = BACKING_FORMATS.get(named)
            if fmt is None:
                raise self._fail(
                    f"backing file {path} has format {named!r}; sitepair reads raw, vpc (VHD), "
                    "vhdx and qcow2 backing files"
                )
            return fmt
        from sitepair.vdisk import detect_format

        found = detect_format(path)
        if found is None:
            raise self._fail(
                f"backing file {path} is not a VHD, VHDX or qcow2 image and the overlay does "
                "not name its format",
                hint="a raw backing file must be named as raw in the overlay "
                "(qemu-img create -F raw, or qemu-img rebase -u -F raw)",
            )
        return found

    def _open_backing(self, chain: tuple[Path, ...]) -> None:
        name = self.header.backing_file
        if name is None:
            return
        me = self.path.resolve()
        if len(chain) + 1 >= MAX_CHAIN_DEPTH:
            raise self._fail(f"the qcow2 backing chain is deeper than {MAX_CHAIN_DEPTH} layers")
        path = self._backing_path(name)
        target = path.resolve()
        if target == me or target in chain:
            loop = " -> ".join(str(p) for p in (*chain, me, target))
            raise self._fail(f"backing chain loops: {loop}")
        try:
            fmt = self._backing_format(path)
            if fmt is DiskFormat.QCOW2:
                parent: VirtualDisk = open_qcow2(path, _chain=(*chain, me))
            else:
                from sitepair.vdisk import open_disk

                parent = open_disk(path, read_only=True, format=fmt)
        except VirtualDiskError as exc:
            raise VirtualDiskError(
                f"{self.path}: cannot open its backing file {name!r}: {exc.message}",
                hint=exc.hint,
            ) from exc
        self.parent = parent


def _fill_zeros(view: memoryview) -> None:
    step = len(_ZEROS)
    for at in range(0, len(view), step):
        piece = view[at : at + step]
        piece[:] = _ZEROS[: len(piece)]


def _read_only_error(path: Path) -> VirtualDiskError:
    return VirtualDiskError(
        f"{path}: sitepair does not write qcow2 images; they are opened read-only",
        hint="QEMU owns qcow2 overlays; convert the image to VHDX to change it",
    )


def open_qcow2(
    path: str | os.PathLike[str], *, read_only: bool = True, _chain: tuple[Path, ...] = ()
) -> Qcow2Disk:
    """Open a qcow2 image and its backing chain, read-only (``read_only=False`` is refused:
    sitepair does not write qcow2). ``_chain`` holds the resolved paths of the qcow2 layers
    already opened above this one, to detect loops."""
    p = Path(path)
    if not read_only:
        raise _read_only_error(p)
    fd = open_image(p, read_only=True)
    try:
        lock_file(fd, p, exclusive=False)
        disk = Qcow2Disk(p, fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        disk._open_backing(_chain)
    except BaseException:
        disk.close()
        raise
    return disk
