"""The qcow2 header (QEMU's ``docs/interop/qcow2.txt``): decoded and checked, with no file I/O.

:func:`parse_header` takes the first cluster of a file (or the whole file if shorter) and the
file's size, and returns a :class:`Qcow2Header` or raises :class:`VirtualDiskError` naming the
field and the problem: every offset and size is checked against the file before it is used,
and images using what sitepair refuses (encryption, external data files, unknown incompatible
features, compression other than zlib and zstd; see :mod:`sitepair.vdisk.qcow2`) are refused
here. Reading the L1 and L2 tables and the data is :mod:`sitepair.vdisk.qcow2`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from sitepair.errors import VirtualDiskError

__all__ = ["Qcow2Header", "parse_header", "probe_qcow2"]

MAGIC: Final = b"QFI\xfb"
MIN_CLUSTER_BITS: Final = 9
#: QEMU's own limit (2 MiB clusters); the specification allows more, nobody writes them.
MAX_CLUSTER_BITS: Final = 21
#: Extended L2 entries need clusters of at least 16 KiB (the specification says so).
MIN_EXTENDED_L2_CLUSTER_BITS: Final = 14
#: QEMU's limit on the active L1 table; a larger claim is refused before anything is read.
MAX_L1_BYTES: Final = 32 << 20
MAX_BACKING_NAME: Final = 1023
SECTOR: Final = 512
SUBCLUSTERS: Final = 32

V2_HEADER_LENGTH: Final = 72
V3_HEADER_LENGTH: Final = 104
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")

EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_NAMES: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_CRYPTO: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTENDED_L2: Final = 1 << 4
INCOMPAT_KNOWN: Final = 0x1F
COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
AUTOCLEAR_BITMAPS: Final = 1 << 0
AUTOCLEAR_RAW_DATA: Final = 1 << 1

COMPRESSION_ZLIB: Final = 0
COMPRESSION_ZSTD: Final = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}
_CRYPT_NAMES = {1: "AES", 2: "LUKS"}


def probe_qcow2(head: bytes) -> bool:
    """True if a file starts with the qcow2 magic."""
    return head[:4] == MAGIC


@dataclass(frozen=True)
class Qcow2Header:
    """The decoded header of one qcow2 file, checked against the file's size."""

    version: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    #: The backing file name as written (decoded with the file system encoding), or None.
    backing_file: str | None
    #: The backing format extension's value ("vhdx", "vpc", "raw", "qcow2", ...), or None.
    backing_format: str | None
    #: Names of feature bits from the feature name table: (type, bit) -> name.
    feature_names: dict[tuple[int, int], str]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_entries_needed(self) -> int:
        """L1 entries that describe the virtual size (the table may be longer)."""
        clusters = -(-self.virtual_size // self.cluster_size)
        return -(-clusters // self.l2_entries)


def parse_header(head: bytes, size: int, where: str) -> Qcow2Header:
    """Decode and check the header in ``head`` (the start of the file: its first cluster, or the
    whole file if shorter); ``size`` is the file's size, ``where`` names the file in errors."""

    def bad(message: str, hint: str | None = None) -> VirtualDiskError:
        return VirtualDiskError(f"{where}: {message}", hint=hint)

    if len(head) < V2_HEADER_LENGTH:
        raise bad(f"too short to be a qcow2 image ({size} bytes; the header alone is 72)")
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(head)
    if magic != MAGIC:
        raise bad(f"not a qcow2 image (magic {magic!r}, expected {MAGIC!r})")
    if version not in (2, 3):
        raise bad(f"unsupported qcow2 version {version} (sitepair reads versions 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(
            f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} "
            "(clusters of 512 bytes to 2 MiB)"
        )
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order = 4
    header_length = V2_HEADER_LENGTH
    compression = COMPRESSION_ZLIB
    if version == 3:
        if len(head) < V3_HEADER_LENGTH:
            raise bad(f"too short for a version 3 qcow2 header ({len(head)} bytes, need 104)")
        incompatible, compatible, autoclear, refcount_order, header_length = _V3.unpack_from(
            head, V2_HEADER_LENGTH
        )
        if header_length < V3_HEADER_LENGTH or header_length % 8:
            raise bad(f"header length {header_length} is not a multiple of 8 of at least 104 bytes")
        if header_length > min(cluster_size, len(head)):
            raise bad(f"header length {header_length} runs past the first cluster or the file")
        if header_length > V3_HEADER_LENGTH:
            compression = head[V3_HEADER_LENGTH]
        if refcount_order > 6:
            raise bad(f"refcount order {refcount_order} is above the maximum of 6")

    # Header extensions sit between the header and the backing file name (or the cluster end).
    ext_end = min(len(head), cluster_size)
    if backing_offset and backing_offset < ext_end:
        ext_end = backing_offset
    backing_format: str | None = None
    names: dict[tuple[int, int], str] = {}
    pos = header_length
    while pos + _EXT.size <= ext_end:
        kind, length = _EXT.unpack_from(head, pos)
        pos += _EXT.size
        if kind == EXT_END:
            break
        if length > ext_end - pos:
            raise bad(
                f"header extension {kind:#010x} at byte {pos - 8} claims {length} bytes, more "
                "than the header area holds"
            )
        data = head[pos : pos + length]
        if kind == EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", "replace")
        elif kind == EXT_FEATURE_NAMES:
            for at in range(0, length - 47, 48):
                name = data[at + 2 : at + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                names[(data[at], data[at + 1])] = name
        pos += -(-length // 8) * 8

    def feature(bit: int) -> str:
        name = names.get((0, bit))
        return f"bit {bit} ({name!r})" if name else f"bit {bit}"

    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bits = ", ".join(feature(b) for b in range(64) if unknown >> b & 1)
        # A reader that ignored them would misread the image: the specification forbids it.
        raise bad(f"uses incompatible features sitepair does not know: {bits}")
    if incompatible & INCOMPAT_CORRUPT:
        raise bad(
            "QEMU marked this image corrupt (incompatible feature bit 1); it is not read",
            hint="repair it with 'qemu-img check -r all' and check the guest data",
        )
    if incompatible & INCOMPAT_DATA_FILE:
        raise bad(
            "the guest data is in an external data file (incompatible feature bit 2), which "
            "sitepair does not read",
            hint="use qcow2 overlays that keep their data inside the file, as QEMU does by default",
        )
    if crypt_method:
        kind_name = _CRYPT_NAMES.get(crypt_method, f"method {crypt_method}")
        raise bad(f"the image is encrypted ({kind_name}); sitepair does not read encrypted qcow2")
    if incompatible & INCOMPAT_COMPRESSION:
        if compression == COMPRESSION_ZLIB:
            raise bad("the compression type bit is set but the compression type field is zlib")
    elif compression != COMPRESSION_ZLIB:
        raise bad(f"compression type {compression} without the compression type feature bit")
    if compression not in COMPRESSION_NAMES:
        raise bad(f"unknown compression type {compression} (sitepair reads zlib and zstd)")
    if incompatible & INCOMPAT_EXTENDED_L2 and cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise bad(f"extended L2 entries with {cluster_size}-byte clusters (at least 16 KiB needed)")

    if virtual_size % SECTOR:
        raise bad(f"virtual size {virtual_size} is not a multiple of {SECTOR} bytes")

    backing_file: str | None = None
    if backing_offset:
        if backing_size > MAX_BACKING_NAME:
            raise bad(f"backing file name of {backing_size} bytes (at most 1023 allowed)")
        if backing_offset + backing_size > min(cluster_size, len(head)):
            raise bad(
                f"backing file name at byte {backing_offset} ({backing_size} bytes) runs past "
                "the first cluster or the end of the file"
            )
        raw_name = head[backing_offset : backing_offset + backing_size]
        if b"\0" in raw_name:
            raise bad(f"backing file name {raw_name!r} contains a NUL byte")
        if raw_name:
            backing_file = os.fsdecode(raw_name)

    header = Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=virtual_size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=refcount_offset,
        refcount_table_clusters=refcount_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression,
        backing_file=backing_file,
        backing_format=backing_format,
        feature_names=names,
    )
    needed = header.l1_entries_needed
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {l1_size} entries is larger than {MAX_L1_BYTES >> 20} MiB")
    if l1_size < needed:
        raise bad(
            f"L1 table of {l1_size} entries is too small for the virtual size {virtual_size} "
            f"({needed} needed)"
        )
    if needed:
        if l1_offset % cluster_size or l1_offset == 0:
            raise bad(f"L1 table offset {l1_offset} is not a cluster boundary after the header")
        if l1_offset + needed * 8 > size:
            raise bad(
                f"L1 table at file offset {l1_offset} ({needed} entries) runs past the end of "
                f"the file ({size} bytes)"
            )
    return header
