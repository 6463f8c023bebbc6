"""On-disk structures of the VHD format (Microsoft "Virtual Hard Disk Image Format
Specification", version 1.0): the hard disk footer, the dynamic disk header with its parent
locator entries, the block allocation table (BAT), sector bitmaps and the CHS geometry rule.

Everything here is pure: bytes in, validated dataclasses out (or a :class:`VirtualDiskError`
that names the structure at fault), and dataclasses back to bytes. ``sitepair.vdisk.vhd`` does
the file I/O. All integers are big-endian, as the specification says.

File layout of a dynamic or differencing disk as we write it::

    0        footer copy (512 bytes, identical to the footer at the end)
    512      dynamic disk header (1024 bytes, "cxsparse")
    1536     BAT: one big-endian uint32 per block, the block's file offset in sectors,
             0xFFFFFFFF when the block is not allocated; padded with 0xFF to a sector
    ...      parent locator data (differencing disks: W2ru and W2ku paths, UTF-16LE)
    ...      blocks: sector bitmap (one bit per sector, most significant bit first, padded to
             a sector) followed by block_size bytes of data
    end-512  footer

A fixed disk is the guest data followed by the footer.
"""

from __future__ import annotations

import itertools
import struct
import time
import uuid
from array import array
from dataclasses import dataclass, replace
from pathlib import Path

from sitepair.errors import VirtualDiskError

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
UNALLOCATED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

#: Features field: bit 1 ("reserved") must always be set.
FEATURES_RESERVED = 0x00000002
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000

#: Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800

#: The largest virtual size Hyper-V and qemu accept for a VHD: 2040 GiB (0xFF000000 sectors).
MAX_VIRTUAL_SIZE = 0xFF000000 * SECTOR
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 256 * 1024 * 1024
#: Our own cap on BAT entries (a 128 MiB table): far above 2040 GiB in 2 MiB blocks (1 044 480
#: entries) but bounds the memory a hostile header can make us allocate.
MAX_BAT_ENTRIES = 1 << 25

#: The largest CHS geometry the specification can express (65535 cylinders, 16 heads, 255
#: sectors per track).
MAX_CHS_SECTORS = 65535 * 16 * 255

#: Creator application we write. qemu decides whether a VHD's size is the CHS geometry or the
#: footer's current_size by this field (block/vpc.c): "vpc " and "qemu" mean CHS, while "win "
#: (Hyper-V), "qem2", "d2v ", "tap\0" and "CTXS" mean current_size; any other value also means
#: CHS unless the geometry is the maximum. CHS can only express multiples of its geometry, so a
#: CHS-derived size is usually a little smaller than the size we were asked for. Hyper-V and
#: libvhdi always use current_size. Writing "win " makes all three see exactly current_size,
#: and unlike "qem2" it is also honoured by qemu releases older than 2.6; the geometry we store
#: is still the specification's CHS for that size, for Virtual PC-era tools.
CREATOR_APP = b"win "
#: Creator version: major.minor of the writer; we write 10.0 like current Windows releases.
CREATOR_VERSION = 0x000A0000
CREATOR_HOST_OS = b"Wi2k"

PLATFORM_W2RU = 0x57327275  # "W2ru": Windows relative path, UTF-16LE
PLATFORM_W2KU = 0x57326B75  # "W2ku": Windows absolute path, UTF-16LE
PLATFORM_NAMES = {
    0: "none",
    0x57693272: "Wi2r",
    0x5769326B: "Wi2k",
    PLATFORM_W2RU: "W2ru",
    PLATFORM_W2KU: "W2ku",
    0x4D616320: "Mac ",
    0x4D616358: "MacX",
}
#: Locator paths longer than this are refused (Windows' own limit is 32767 UTF-16 units).
MAX_LOCATOR_BYTES = 65536

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
assert _FOOTER.size == FOOTER_SIZE
assert _HEADER.size + 8 * _LOCATOR.size + 256 == HEADER_SIZE


def checksum(buf: bytes | bytearray, field_at: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field counted as zero."""
    total = sum(buf) - sum(buf[field_at : field_at + 4])
    return ~total & 0xFFFFFFFF


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 00:00:00 UTC, clamped to the field's 32 bits."""
    now = time.time() if unix_time is None else unix_time
    return max(0, min(0xFFFFFFFF, int(now) - VHD_EPOCH))


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``size`` bytes, per the specification's
    appendix "CHS calculation". Sizes beyond the largest CHS get the largest CHS."""
    total = min(size // SECTOR, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def bitmap_bytes(block_size: int) -> int:
    """Size of a block's sector bitmap: one bit per sector, padded to a whole sector."""
    bytes_needed = -(-(block_size // SECTOR) // 8)  # at least one byte, even for tiny blocks
    return -(-bytes_needed // SECTOR) * SECTOR


@dataclass(frozen=True)
class Footer:
    """The hard disk footer (and its copy at offset 0 of dynamic/differencing disks)."""

    disk_type: int
    current_size: int
    original_size: int
    data_offset: int
    unique_id: uuid.UUID
    timestamp: int
    cylinders: int
    heads: int
    sectors_per_track: int
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS
    features: int = FEATURES_RESERVED
    version: int = FORMAT_VERSION
    saved_state: int = 0

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track * SECTOR

    def pack(self) -> bytes:
        raw = bytearray(
            _FOOTER.pack(
                FOOTER_COOKIE,
                self.features,
                self.version,
                self.data_offset,
                self.timestamp,
                self.creator_app,
                self.creator_version,
                self.creator_host_os,
                self.original_size,
                self.current_size,
                self.cylinders,
                self.heads,
                self.sectors_per_track,
                self.disk_type,
                0,
                self.unique_id.bytes,
                self.saved_state,
                b"",
            )
        )
        struct.pack_into(">I", raw, 64, checksum(raw, 64))
        return bytes(raw)


def new_footer(*, disk_type: int, size: int, unique_id: uuid.UUID | None = None) -> Footer:
    cyl, heads, spt = chs_geometry(size)
    return Footer(
        disk_type=disk_type,
        current_size=size,
        original_size=size,
        data_offset=NO_DATA_OFFSET if disk_type == DISK_FIXED else FOOTER_SIZE,
        unique_id=unique_id or uuid.uuid4(),
        timestamp=vhd_timestamp(),
        cylinders=cyl,
        heads=heads,
        sectors_per_track=spt,
    )


def parse_footer(buf: bytes, where: str) -> Footer:
    """Validate and decode a footer; ``where`` names it in errors ("footer at offset N")."""
    if len(buf) != FOOTER_SIZE:
        raise VirtualDiskError(f"{where}: only {len(buf)} of {FOOTER_SIZE} bytes present")
    (
        cookie,
        features,
        version,
        data_offset,
        timestamp,
        creator_app,
        creator_version,
        creator_host_os,
        original_size,
        current_size,
        cylinders,
        heads,
        spt,
        disk_type,
        stored_sum,
        unique_id,
        saved_state,
        _reserved,
    ) = _FOOTER.unpack(buf)
    if cookie != FOOTER_COOKIE:
        raise VirtualDiskError(f"{where}: no VHD footer (cookie {cookie!r}, expected 'conectix')")
    computed = checksum(buf, 64)
    if computed != stored_sum:
        raise VirtualDiskError(
            f"{where}: bad checksum (stored {stored_sum:#010x}, computed {computed:#010x})"
        )
    if version >> 16 != 1:
        raise VirtualDiskError(f"{where}: unsupported format version {version:#010x}")
    if disk_type not in DISK_TYPE_NAMES:
        raise VirtualDiskError(f"{where}: unsupported disk type {disk_type}")
    if current_size % SECTOR:
        raise VirtualDiskError(
            f"{where}: virtual size {current_size} is not a multiple of {SECTOR} bytes"
        )
    if current_size > MAX_VIRTUAL_SIZE:
        raise VirtualDiskError(
            f"{where}: virtual size {current_size} exceeds the VHD maximum of 2040 GiB"
        )
    if disk_type != DISK_FIXED and (data_offset % SECTOR or data_offset < FOOTER_SIZE):
        raise VirtualDiskError(
            f"{where}: dynamic disk header offset {data_offset} is not a sector offset after "
            "the footer copy"
        )
    return Footer(
        disk_type=disk_type,
        current_size=current_size,
        original_size=original_size,
        data_offset=data_offset,
        unique_id=uuid.UUID(bytes=unique_id),
        timestamp=timestamp,
        cylinders=cylinders,
        heads=heads,
        sectors_per_track=spt,
        creator_app=creator_app,
        creator_version=creator_version,
        creator_host_os=creator_host_os,
        features=features,
        version=version,
        saved_state=saved_state,
    )


@dataclass(frozen=True)
class Locator:
    """One parent locator entry of the dynamic disk header."""

    platform_code: int = 0
    #: Reserved space. The specification says sectors; Hyper-V and Virtual PC store bytes
    #: (VirtualBox's VHD.cpp documents the same finding). We write bytes, like Hyper-V, and
    #: never rely on this field when reading: ``data_length`` says how much to read.
    data_space: int = 0
    data_length: int = 0
    reserved: int = 0
    data_offset: int = 0

    @property
    def platform(self) -> str:
        return PLATFORM_NAMES.get(self.platform_code, f"{self.platform_code:#010x}")

    def reserved_end(self) -> int:
        """End of the space this locator reserves in the file, reading ``data_space`` as bytes
        when that holds the data (Windows) and as sectors otherwise (the letter of the spec)."""
        space = self.data_space if self.data_space >= self.data_length else self.data_space * 512
        space = max(space, -(-self.data_length // SECTOR) * SECTOR)
        return self.data_offset + min(space, MAX_LOCATOR_BYTES)


@dataclass(frozen=True)
class DynamicHeader:
    data_offset: int
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: uuid.UUID
    parent_timestamp: int
    parent_name: str
    locators: tuple[Locator, ...]
    header_version: int = HEADER_VERSION

    def pack(self) -> bytes:
        name = self.parent_name.encode("utf-16-be")[:512]
        raw = bytearray(
            _HEADER.pack(
                HEADER_COOKIE,
                self.data_offset,
                self.table_offset,
                self.header_version,
                self.max_table_entries,
                self.block_size,
                0,
                self.parent_unique_id.bytes,
                self.parent_timestamp,
                0,
                name,
            )
        )
        locs = [*self.locators, *(Locator() for _ in range(8 - len(self.locators)))]
        for loc in locs[:8]:
            raw += _LOCATOR.pack(
                loc.platform_code, loc.data_space, loc.data_length, loc.reserved, loc.data_offset
            )
        raw += bytes(256)
        struct.pack_into(">I", raw, 36, checksum(raw, 36))
        return bytes(raw)

    def with_parent(
        self, *, unique_id: uuid.UUID, timestamp: int, name: str, locators: tuple[Locator, ...]
    ) -> DynamicHeader:
        return replace(
            self,
            parent_unique_id=unique_id,
            parent_timestamp=timestamp,
            parent_name=name,
            locators=locators,
        )


def parse_dynamic_header(buf: bytes, where: str) -> DynamicHeader:
    if len(buf) != HEADER_SIZE:
        raise VirtualDiskError(f"{where}: only {len(buf)} of {HEADER_SIZE} bytes present")
    (
        cookie,
        data_offset,
        table_offset,
        version,
        max_entries,
        block_size,
        stored_sum,
        parent_id,
        parent_ts,
        _reserved,
        parent_name,
    ) = _HEADER.unpack_from(buf)
    if cookie != HEADER_COOKIE:
        raise VirtualDiskError(
            f"{where}: no dynamic disk header (cookie {cookie!r}, expected 'cxsparse')"
        )
    computed = checksum(buf, 36)
    if computed != stored_sum:
        raise VirtualDiskError(
            f"{where}: bad checksum (stored {stored_sum:#010x}, computed {computed:#010x})"
        )
    if version >> 16 != 1:
        raise VirtualDiskError(f"{where}: unsupported header version {version:#010x}")
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise VirtualDiskError(
            f"{where}: block size {block_size} is not a power of two between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )
    if table_offset % SECTOR:
        raise VirtualDiskError(f"{where}: BAT offset {table_offset} is not sector aligned")
    locators = tuple(
        Locator(*_LOCATOR.unpack_from(buf, _HEADER.size + i * _LOCATOR.size)) for i in range(8)
    )
    name = parent_name.decode("utf-16-be", errors="replace").split("\x00", 1)[0]
    return DynamicHeader(
        data_offset=data_offset,
        table_offset=table_offset,
        max_table_entries=max_entries,
        block_size=block_size,
        parent_unique_id=uuid.UUID(bytes=parent_id),
        parent_timestamp=parent_ts,
        parent_name=name,
        locators=locators,
        header_version=version,
    )


def bat_entries_needed(virtual_size: int, block_size: int) -> int:
    return -(-virtual_size // block_size)


def parse_bat(buf: bytes, count: int) -> array[int]:
    """The first ``count`` BAT entries as native unsigned 32-bit integers."""
    table = array("I")
    if table.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte "I"
        table = array("L")
    table.frombytes(buf[: count * 4])
    if _LITTLE_ENDIAN:
        table.byteswap()
    return table


def pack_bat(table: array[int], start: int, stop: int) -> bytes:
    """Big-endian bytes of entries ``[start, stop)``."""
    part = table[start:stop]
    if _LITTLE_ENDIAN:
        part.byteswap()
    return part.tobytes()


_LITTLE_ENDIAN = array("I", [1]).tobytes()[0] == 1


@dataclass(frozen=True)
class Region:
    """A named extent of the image file, for overlap checks and error messages."""

    start: int
    end: int
    name: str


def check_layout(
    *,
    bat: array[int],
    block_size: int,
    metadata: list[Region],
    data_limit: int,
    where: Path,
) -> int:
    """Validate that every allocated block lies inside ``data_limit`` and overlaps neither
    metadata nor another block. Returns the end of the highest allocated block (0 if none).

    Cost: one sort of the allocated entries, so proportional to the BAT, not to the disk."""
    bm = bitmap_bytes(block_size)
    span = bm + block_size
    allocated = sorted((e, i) for i, e in enumerate(bat) if e != UNALLOCATED)
    highest = 0
    regions = sorted(metadata, key=lambda r: r.start)
    meta_idx = 0
    prev_end = -1
    prev_idx = -1
    for sector, idx in allocated:
        start = sector * SECTOR
        end = start + span
        if end > data_limit:
            raise VirtualDiskError(
                f"{where}: BAT entry {idx} points beyond the end of the file (block at file "
                f"offset {start} ends at {end}, the data area ends at {data_limit})"
            )
        if start < prev_end:
            raise VirtualDiskError(
                f"{where}: BAT entries {prev_idx} and {idx} overlap (blocks at file offsets "
                f"{(prev_end - span)} and {start}, each {span} bytes)"
            )
        while meta_idx < len(regions) and regions[meta_idx].end <= start:
            meta_idx += 1
        for region in regions[meta_idx:]:
            if region.start >= end:
                break
            if region.end > start:
                raise VirtualDiskError(
                    f"{where}: BAT entry {idx} (file offset {start}) overlaps the {region.name}"
                )
        prev_end, prev_idx = end, idx
        highest = max(highest, end)
    return highest


def check_metadata_regions(regions: list[Region], limit: int, where: Path) -> None:
    """Metadata must lie inside the file and must not overlap each other."""
    ordered = sorted((r for r in regions if r.end > r.start), key=lambda r: r.start)
    for region in ordered:
        if region.end > limit:
            raise VirtualDiskError(
                f"{where}: the {region.name} (file offsets {region.start}-{region.end}) "
                f"extends beyond the end of the file ({limit})"
            )
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise VirtualDiskError(f"{where}: the {a.name} overlaps the {b.name}")


def locator_path_bytes(path: str) -> bytes:
    return path.encode("utf-16-le")


def decode_locator(data: bytes, platform: str, where: str) -> str:
    try:
        text = data.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise VirtualDiskError(
            f"{where}: parent locator {platform} is not valid UTF-16: {exc.reason}"
        ) from exc
    return text.split("\x00", 1)[0]


def _bit(bitmap: bytes | bytearray, sector: int) -> bool:
    return bool((bitmap[sector >> 3] >> (7 - (sector & 7))) & 1)


def sector_runs(bitmap: bytes | bytearray, first: int, last: int) -> list[tuple[int, int, bool]]:
    """Runs ``(start, end, present)`` of sectors ``[first, last)`` of one block whose bitmap
    bits are equal. Bit order: sector 0 is the most significant bit of byte 0."""
    runs: list[tuple[int, int, bool]] = []
    s = first
    while s < last:
        present = _bit(bitmap, s)
        whole = 0xFF if present else 0x00
        e = s + 1
        while e < last:
            if e & 7 == 0 and e + 8 <= last and bitmap[e >> 3] == whole:
                e += 8  # a whole byte of equal bits
                continue
            if _bit(bitmap, e) != present:
                break
            e += 1
        runs.append((s, e, present))
        s = e
    return runs


def set_bits(bitmap: bytearray, first: int, last: int) -> bool:
    """Set the bits of sectors ``[first, last)``; True if any bit changed."""
    changed = False
    s = first
    while s < last:
        if s & 7 == 0 and s + 8 <= last:
            if bitmap[s >> 3] != 0xFF:
                bitmap[s >> 3] = 0xFF
                changed = True
            s += 8
            continue
        mask = 1 << (7 - (s & 7))
        if not bitmap[s >> 3] & mask:
            bitmap[s >> 3] |= mask
            changed = True
        s += 1
    return changed


def bitmap_full(bitmap: bytes | bytearray, sectors: int) -> bool:
    """True if the first ``sectors`` bits are all set."""
    whole, rest = divmod(sectors, 8)
    if bitmap[:whole] != b"\xff" * whole:
        return False
    if rest:
        mask = (0xFF << (8 - rest)) & 0xFF
        return bitmap[whole] & mask == mask
    return True
