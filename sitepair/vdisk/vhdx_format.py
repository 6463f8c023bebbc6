"""On-disk structures of [MS-VHDX]: parsing and building, with no file I/O.

Section numbers refer to [MS-VHDX] v8.0 (2024). Every parser takes bytes already read and either
returns a value or raises :class:`FormatError` with a sentence naming the structure and the
problem; the caller adds the file name and turns it into a VirtualDiskError. Parsers never
allocate memory in proportion to a size field they read: callers bound every read by the file
size (and by the fixed limits below) before reading.

GUIDs are stored in their binary form (Microsoft's mixed-endian layout), which is
``uuid.UUID.bytes_le``.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass, field

from sitepair.vdisk.vhdx_crc import checksum_with_field_zeroed

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# -- 2.2 header section --------------------------------------------------------------------
FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_SIZE = 1 * MiB
REGION_TABLE_MAX_ENTRIES = 2047
#: The VHDX format version this module implements (header Version field, section 1.6).
VHDX_VERSION = 1
LOG_VERSION = 0

BAT_REGION_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

# -- 2.6 metadata --------------------------------------------------------------------------
METADATA_SIGNATURE = b"metadata"
METADATA_TABLE_SIZE = 64 * KiB
METADATA_MAX_ENTRIES = 2047
METADATA_ITEM_MAX_LENGTH = 1 * MiB

FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_GUID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

KNOWN_METADATA_NAMES = {
    FILE_PARAMETERS_GUID: "File Parameters",
    VIRTUAL_DISK_SIZE_GUID: "Virtual Disk Size",
    VIRTUAL_DISK_ID_GUID: "Virtual Disk ID (page 83 data)",
    LOGICAL_SECTOR_SIZE_GUID: "Logical Sector Size",
    PHYSICAL_SECTOR_SIZE_GUID: "Physical Sector Size",
    PARENT_LOCATOR_GUID: "Parent Locator",
}

#: Metadata entry flag bits (2.6.1.2).
MD_IS_USER = 1
MD_IS_VIRTUAL_DISK = 2
MD_IS_REQUIRED = 4

MAX_VIRTUAL_SIZE = 64 * TiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
SECTOR_SIZES = (512, 4096)
#: Number of logical sectors one 1 MiB sector bitmap block describes (2.4).
SECTORS_PER_BITMAP_BLOCK = 1 << 23
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB

# -- 2.5 BAT -------------------------------------------------------------------------------
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

PAYLOAD_STATE_NAMES = {
    PAYLOAD_BLOCK_NOT_PRESENT: "not_present",
    PAYLOAD_BLOCK_UNDEFINED: "undefined",
    PAYLOAD_BLOCK_ZERO: "zero",
    PAYLOAD_BLOCK_UNMAPPED: "unmapped",
    PAYLOAD_BLOCK_FULLY_PRESENT: "fully_present",
    PAYLOAD_BLOCK_PARTIALLY_PRESENT: "partially_present",
}

BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = ~(MiB - 1) & 0xFFFFFFFFFFFFFFFF
BAT_ENTRY_SIZE = 8

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH20s")
_METADATA_ENTRY = struct.Struct("<16sIII")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


class FormatError(Exception):
    """A structure does not follow [MS-VHDX]; the message names structure and problem."""


def human_size(n: int) -> str:
    """``9.1 GiB``-style sizes for error messages."""
    if n < KiB:
        return f"{n} bytes"
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n} bytes"  # pragma: no cover - unreachable


def guid_text(value: uuid.UUID) -> str:
    return "{" + str(value) + "}"


# -- file identifier (2.2.1) ---------------------------------------------------------------
def probe_vhdx(head: bytes) -> bool:
    """True if ``head`` starts with the VHDX file type identifier signature (2.2.1)."""
    return head[:8] == FILE_ID_SIGNATURE


def build_file_identifier(creator: str) -> bytes:
    encoded = creator.encode("utf-16-le")[:512]
    return (FILE_ID_SIGNATURE + encoded).ljust(64 * KiB, b"\0")


# -- headers (2.2.2) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @property
    def log_is_empty(self) -> bool:
        return self.log_guid.int == 0


def parse_header(buf: bytes) -> Header:
    """Parse one 4 KiB header; raise FormatError if it is not valid (signature, checksum)."""
    if len(buf) < HEADER_SIZE:
        raise FormatError("is cut short by the end of the file")
    buf = buf[:HEADER_SIZE]
    fields = _HEADER.unpack_from(buf)
    if fields[0] != HEADER_SIGNATURE:
        raise FormatError(f"has signature {fields[0]!r}, not {HEADER_SIGNATURE!r}")
    if checksum_with_field_zeroed(buf) != fields[1]:
        raise FormatError("has a bad CRC-32C checksum")
    return Header(
        sequence_number=fields[2],
        file_write_guid=uuid.UUID(bytes_le=fields[3]),
        data_write_guid=uuid.UUID(bytes_le=fields[4]),
        log_guid=uuid.UUID(bytes_le=fields[5]),
        log_version=fields[6],
        version=fields[7],
        log_length=fields[8],
        log_offset=fields[9],
    )


def build_header(h: Header) -> bytes:
    buf = bytearray(HEADER_SIZE)
    _HEADER.pack_into(
        buf,
        0,
        HEADER_SIGNATURE,
        0,
        h.sequence_number,
        h.file_write_guid.bytes_le,
        h.data_write_guid.bytes_le,
        h.log_guid.bytes_le,
        h.log_version,
        h.version,
        h.log_length,
        h.log_offset,
    )
    struct.pack_into("<I", buf, 4, checksum_with_field_zeroed(buf))
    return bytes(buf)


# -- region table (2.2.3) ------------------------------------------------------------------
@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool


def parse_region_table(buf: bytes) -> list[RegionEntry]:
    """Parse one 64 KiB region table copy; raise FormatError if it is not valid."""
    if len(buf) < REGION_TABLE_SIZE:
        raise FormatError("is cut short by the end of the file")
    buf = buf[:REGION_TABLE_SIZE]
    signature, checksum, count, _reserved = _REGION_HEADER.unpack_from(buf)
    if signature != REGION_SIGNATURE:
        raise FormatError(f"has signature {signature!r}, not {REGION_SIGNATURE!r}")
    if checksum_with_field_zeroed(buf) != checksum:
        raise FormatError("has a bad CRC-32C checksum")
    if count > REGION_TABLE_MAX_ENTRIES:
        raise FormatError(f"claims {count} entries (at most {REGION_TABLE_MAX_ENTRIES})")
    entries: list[RegionEntry] = []
    seen: set[uuid.UUID] = set()
    for i in range(count):
        raw_guid, offset, length, required = _REGION_ENTRY.unpack_from(
            buf, _REGION_HEADER.size + i * _REGION_ENTRY.size
        )
        guid = uuid.UUID(bytes_le=raw_guid)
        if guid in seen:
            raise FormatError(f"lists region {guid} twice")
        seen.add(guid)
        if offset % MiB or offset < MiB:
            raise FormatError(
                f"entry {i} ({guid}) has offset {offset}, not a multiple of 1 MiB past the "
                "header section"
            )
        if length % MiB or length == 0:
            raise FormatError(f"entry {i} ({guid}) has length {length}, not a multiple of 1 MiB")
        entries.append(RegionEntry(guid, offset, length, bool(required & 1)))
    return entries


def build_region_table(entries: list[RegionEntry]) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    _REGION_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, e in enumerate(entries):
        _REGION_ENTRY.pack_into(
            buf,
            _REGION_HEADER.size + i * _REGION_ENTRY.size,
            e.guid.bytes_le,
            e.file_offset,
            e.length,
            1 if e.required else 0,
        )
    struct.pack_into("<I", buf, 4, checksum_with_field_zeroed(buf))
    return bytes(buf)


# -- metadata table (2.6.1) ----------------------------------------------------------------
@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int
    length: int
    flags: int

    @property
    def is_user(self) -> bool:
        return bool(self.flags & MD_IS_USER)

    @property
    def is_virtual_disk(self) -> bool:
        return bool(self.flags & MD_IS_VIRTUAL_DISK)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & MD_IS_REQUIRED)


def parse_metadata_table(buf: bytes, region_length: int) -> list[MetadataEntry]:
    """Parse the 64 KiB metadata table at the start of the metadata region."""
    if len(buf) < METADATA_TABLE_SIZE:
        raise FormatError("metadata table is cut short by the end of the file")
    signature, _reserved, count, _reserved2 = _METADATA_HEADER.unpack_from(buf)
    if signature != METADATA_SIGNATURE:
        raise FormatError(f"metadata table has signature {signature!r}, not b'metadata'")
    if count > METADATA_MAX_ENTRIES:
        raise FormatError(f"metadata table claims {count} entries (at most 2047)")
    entries: list[MetadataEntry] = []
    seen: set[tuple[uuid.UUID, bool]] = set()
    user_items = 0
    for i in range(count):
        raw_guid, offset, length, flags = _METADATA_ENTRY.unpack_from(
            buf, _METADATA_HEADER.size + i * 32
        )
        e = MetadataEntry(uuid.UUID(bytes_le=raw_guid), offset, length, flags & 0x7)
        name = KNOWN_METADATA_NAMES.get(e.item_id, str(e.item_id))
        key = (e.item_id, e.is_user)
        if key in seen:
            raise FormatError(f"metadata item {name} is listed twice")
        seen.add(key)
        user_items += e.is_user
        if length > METADATA_ITEM_MAX_LENGTH:
            raise FormatError(f"metadata item {name} is {human_size(length)} (at most 1 MiB)")
        if length == 0:
            if offset != 0:
                raise FormatError(f"metadata item {name} is empty but has offset {offset}")
        elif offset < METADATA_TABLE_SIZE or offset + length > region_length:
            raise FormatError(
                f"metadata item {name} at offset {offset} (+{length}) lies outside the "
                f"metadata region's item area (64 KiB to {human_size(region_length)})"
            )
        entries.append(e)
    if user_items > 1024:
        raise FormatError(f"metadata table has {user_items} user items (at most 1024)")
    spans = sorted((e.offset, e.offset + e.length, e.item_id) for e in entries if e.length)
    for (_s1, end1, id1), (start2, _e2, id2) in itertools.pairwise(spans):
        if start2 < end1:
            raise FormatError(
                f"metadata items {KNOWN_METADATA_NAMES.get(id1, str(id1))} and "
                f"{KNOWN_METADATA_NAMES.get(id2, str(id2))} overlap"
            )
    return entries


def build_metadata_table(entries: list[MetadataEntry]) -> bytes:
    buf = bytearray(METADATA_TABLE_SIZE)
    _METADATA_HEADER.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(entries), b"")
    for i, e in enumerate(entries):
        _METADATA_ENTRY.pack_into(
            buf, _METADATA_HEADER.size + i * 32, e.item_id.bytes_le, e.offset, e.length, e.flags
        )
    return bytes(buf)


# -- known metadata items (2.6.2) ----------------------------------------------------------
@dataclass(frozen=True)
class FileParameters:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool


def parse_file_parameters(data: bytes) -> FileParameters:
    if len(data) < 8:
        raise FormatError("File Parameters item is shorter than 8 bytes")
    block_size, bits = struct.unpack_from("<II", data)
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise FormatError(
            f"File Parameters block size is {block_size} bytes; it must be a power of 2 "
            "between 1 MiB and 256 MiB"
        )
    return FileParameters(block_size, bool(bits & 1), bool(bits & 2))


def build_file_parameters(p: FileParameters) -> bytes:
    bits = (1 if p.leave_block_allocated else 0) | (2 if p.has_parent else 0)
    return struct.pack("<II", p.block_size, bits)


def parse_u32(data: bytes, name: str) -> int:
    if len(data) < 4:
        raise FormatError(f"{name} item is shorter than 4 bytes")
    return int(struct.unpack_from("<I", data)[0])


def parse_u64(data: bytes, name: str) -> int:
    if len(data) < 8:
        raise FormatError(f"{name} item is shorter than 8 bytes")
    return int(struct.unpack_from("<Q", data)[0])


def parse_guid(data: bytes, name: str) -> uuid.UUID:
    if len(data) < 16:
        raise FormatError(f"{name} item is shorter than 16 bytes")
    return uuid.UUID(bytes_le=bytes(data[:16]))


# -- parent locator (2.6.2.6) --------------------------------------------------------------
@dataclass(frozen=True)
class ParentLocator:
    locator_type: uuid.UUID
    entries: dict[str, str] = field(default_factory=dict)


def parse_parent_locator(data: bytes) -> ParentLocator:
    if len(data) < _LOCATOR_HEADER.size:
        raise FormatError("Parent Locator item is shorter than its 20-byte header")
    raw_type, _reserved, count = _LOCATOR_HEADER.unpack_from(data)
    locator_type = uuid.UUID(bytes_le=raw_type)
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
        raise FormatError(f"Parent Locator claims {count} entries, more than its item holds")
    entries: dict[str, str] = {}
    for i in range(count):
        key_off, value_off, key_len, value_len = _LOCATOR_ENTRY.unpack_from(
            data, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size
        )
        for what, off, length in (("key", key_off, key_len), ("value", value_off, value_len)):
            if off == 0 or length == 0 or off + length > len(data) or length % 2:
                raise FormatError(
                    f"Parent Locator entry {i} has a {what} at offset {off} (+{length}) that "
                    "is empty, odd-sized or outside the item"
                )
        try:
            key = bytes(data[key_off : key_off + key_len]).decode("utf-16-le")
            value = bytes(data[value_off : value_off + value_len]).decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise FormatError(f"Parent Locator entry {i} is not valid UTF-16") from exc
        if key in entries:
            raise FormatError(f"Parent Locator lists key {key!r} twice")
        entries[key] = value
    return ParentLocator(locator_type, entries)


def build_parent_locator(entries: dict[str, str]) -> bytes:
    header = _LOCATOR_HEADER.pack(VHDX_PARENT_LOCATOR_TYPE.bytes_le, 0, len(entries))
    table = bytearray()
    strings = bytearray()
    base = _LOCATOR_HEADER.size + len(entries) * _LOCATOR_ENTRY.size
    for key, value in entries.items():
        k = key.encode("utf-16-le")
        v = value.encode("utf-16-le")
        if not k or not v or len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise FormatError(f"Parent Locator entry {key!r} is empty or longer than 64 KiB")
        key_off = base + len(strings)
        strings += k
        value_off = base + len(strings)
        strings += v
        table += _LOCATOR_ENTRY.pack(key_off, value_off, len(k), len(v))
    return header + bytes(table) + bytes(strings)


def parse_linkage_guid(text: str) -> uuid.UUID | None:
    """The GUID in a parent_linkage value (``{xxxxxxxx-...}``), or None if malformed."""
    try:
        return uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return None


# -- geometry (2.4, 2.5) -------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        return (SECTORS_PER_BITMAP_BLOCK * self.logical_sector_size) // self.block_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.data_blocks // self.chunk_ratio)

    @property
    def total_bat_entries(self) -> int:
        if self.has_parent:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    @property
    def bitmap_bytes_per_block(self) -> int:
        """Bytes of sector bitmap that describe one payload block."""
        return self.block_size // self.logical_sector_size // 8

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def describe_entry(self, index: int) -> str:
        """``payload block 17`` or ``sector bitmap block 2`` for BAT entry ``index``."""
        chunk, pos = divmod(index, self.chunk_ratio + 1)
        if pos == self.chunk_ratio:
            return f"sector bitmap block {chunk}"
        return f"payload block {chunk * self.chunk_ratio + pos}"
