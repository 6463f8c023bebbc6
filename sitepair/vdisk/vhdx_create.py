"""Creating VHDX images: fixed, dynamic and differencing, laid out as sitepair lays them out.

Layout of a new file: the header section (file identifier, two headers, two region tables) in
the first MiB, the log (1 MiB) at 1 MiB, the metadata region (1 MiB) at 2 MiB, the BAT at 3 MiB,
payload blocks after it. A differencing disk copies its parent's virtual-disk metadata items
(2.6.1.2 IsVirtualDisk) and names the parent in its parent locator
(:mod:`sitepair.vdisk.vhdx_locator`). The new file is written completely and synced before it
is opened as a :class:`sitepair.vdisk.vhdx.VhdxDisk`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import uuid
from array import array
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.fsutil import fsync_dir
from sitepair.vdisk.base import SubFormat, VirtualDisk
from sitepair.vdisk.fileio import round_up
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.vhdx import VhdxDisk, open_vhdx, with_parent_chain
from sitepair.vdisk.vhdx_format import (
    BAT_REGION_GUID,
    FILE_PARAMETERS_GUID,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    LOG_VERSION,
    LOGICAL_SECTOR_SIZE_GUID,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    MD_IS_REQUIRED,
    MD_IS_VIRTUAL_DISK,
    METADATA_REGION_GUID,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    PARENT_LOCATOR_GUID,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PHYSICAL_SECTOR_SIZE_GUID,
    REGION_TABLE_OFFSETS,
    SB_BLOCK_PRESENT,
    SECTOR_BITMAP_BLOCK_SIZE,
    SECTOR_SIZES,
    VHDX_VERSION,
    VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    FileParameters,
    Geometry,
    Header,
    MetadataEntry,
    MiB,
    RegionEntry,
    build_file_identifier,
    build_file_parameters,
    build_header,
    build_metadata_table,
    build_parent_locator,
    build_region_table,
)
from sitepair.vdisk.vhdx_locator import parent_locator_entries

__all__ = ["create_vhdx"]

DEFAULT_BLOCK_SIZE = 32 * MiB
DEFAULT_LOG_LENGTH = 1 * MiB
CREATOR = "sitepair"

_NIL = uuid.UUID(int=0)


def _layout(geo: Geometry) -> tuple[int, int, int, int, int]:
    """(log offset, metadata offset, BAT offset, BAT length, first payload offset)."""
    log_offset = HEADER_SECTION_SIZE
    meta_offset = log_offset + DEFAULT_LOG_LENGTH
    bat_offset = meta_offset + MiB
    bat_length = round_up(geo.total_bat_entries * 8, MiB)
    return log_offset, meta_offset, bat_offset, bat_length, bat_offset + bat_length


def create_vhdx(
    path: Path,
    *,
    size: int,
    subformat: SubFormat,
    block_size: int = DEFAULT_BLOCK_SIZE,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: Path | None = None,
) -> VirtualDisk:
    """Create a VHDX image and return it opened writable. For a differencing disk the size and
    sector sizes come from ``parent`` (the arguments are ignored), and the child copies the
    parent's virtual-disk metadata items, page 83 identity included (2.6.1.2 IsVirtualDisk)."""
    path = Path(path)
    if path.exists():
        raise VirtualDiskError(f"{path}: already exists; refusing to overwrite it")
    copied: list[tuple[MetadataEntry, bytes]] = []
    locator: dict[str, str] | None = None
    if subformat == SubFormat.DIFFERENCING or parent is not None:
        if parent is None:
            raise VirtualDiskError(f"{path}: a differencing disk needs a parent")
        with open_vhdx(Path(parent), read_only=True) as p:
            assert isinstance(p, VhdxDisk)
            size = p.virtual_size
            logical_sector_size = p.logical_sector_size
            physical_sector_size = p.physical_sector_size
            copied = p.virtual_disk_items()
            locator = parent_locator_entries(path, Path(parent), p.data_write_guid)
        subformat = SubFormat.DIFFERENCING
    if logical_sector_size not in SECTOR_SIZES or physical_sector_size not in SECTOR_SIZES:
        raise VirtualDiskError(f"{path}: sector sizes must be 512 or 4096 bytes")
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise VirtualDiskError(
            f"{path}: block size {block_size} must be a power of 2 between 1 MiB and 256 MiB"
        )
    if size <= 0 or size % logical_sector_size or size > MAX_VIRTUAL_SIZE:
        raise VirtualDiskError(
            f"{path}: size {size} must be a positive multiple of {logical_sector_size} and at "
            "most 64 TiB"
        )
    fixed = subformat == SubFormat.FIXED
    geo = Geometry(size, block_size, logical_sector_size, locator is not None)
    log_offset, meta_offset, bat_offset, bat_length, payload_offset = _layout(geo)

    items: list[tuple[uuid.UUID, int, bytes]] = [
        (
            FILE_PARAMETERS_GUID,
            MD_IS_REQUIRED,
            build_file_parameters(FileParameters(block_size, fixed, locator is not None)),
        )
    ]
    if copied:
        items += [(e.item_id, e.flags, data) for e, data in copied]
    else:
        items += [
            (
                VIRTUAL_DISK_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                size.to_bytes(8, "little"),
            ),
            (VIRTUAL_DISK_ID_GUID, MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED, uuid.uuid4().bytes_le),
            (
                LOGICAL_SECTOR_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                logical_sector_size.to_bytes(4, "little"),
            ),
            (
                PHYSICAL_SECTOR_SIZE_GUID,
                MD_IS_VIRTUAL_DISK | MD_IS_REQUIRED,
                physical_sector_size.to_bytes(4, "little"),
            ),
        ]
    if locator is not None:
        items.append((PARENT_LOCATOR_GUID, MD_IS_REQUIRED, build_parent_locator(locator)))
    meta = bytearray(MiB)
    entries: list[MetadataEntry] = []
    pos = METADATA_TABLE_SIZE
    for item_id, flags, data in items:
        entries.append(MetadataEntry(item_id, pos, len(data), flags))
        meta[pos : pos + len(data)] = data
        pos = round_up(pos + len(data), 8)
    meta[:METADATA_TABLE_SIZE] = build_metadata_table(entries)

    bat = array("Q", bytes(bat_length))
    file_size = payload_offset
    if fixed:
        for block in range(geo.data_blocks):
            bat[geo.payload_index(block)] = PAYLOAD_BLOCK_FULLY_PRESENT | (
                payload_offset + block * block_size
            )
        file_size = payload_offset + geo.data_blocks * block_size
    if locator is not None:
        # Every chunk of a differencing disk gets its sector bitmap block up front: all zero
        # (every sector from the parent) and sparse in the file, 1 MiB of address space per
        # chunk (4 GiB of disk with 2 MiB blocks). The spec needs no bitmap under NOT_PRESENT
        # blocks, but libvhdi reads one anyway and, finding none, takes file offset 0 as the
        # bitmap: it then hides the parent's data in a fresh child. Present bitmaps read right
        # everywhere.
        for chunk in range(geo.bitmap_blocks):
            bat[geo.bitmap_index(chunk)] = SB_BLOCK_PRESENT | file_size
            file_size += SECTOR_BITMAP_BLOCK_SIZE
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        bat.byteswap()

    header = Header(
        sequence_number=1,
        file_write_guid=uuid.uuid4(),
        data_write_guid=uuid.uuid4(),
        log_guid=_NIL,
        log_version=LOG_VERSION,
        version=VHDX_VERSION,
        log_length=DEFAULT_LOG_LENGTH,
        log_offset=log_offset,
    )
    regions = build_region_table(
        [
            RegionEntry(BAT_REGION_GUID, bat_offset, bat_length, True),
            RegionEntry(METADATA_REGION_GUID, meta_offset, MiB, True),
        ]
    )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError as exc:
        raise VirtualDiskError(f"{path}: already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise VirtualDiskError(f"{path}: cannot create: {exc.strerror or exc}") from exc
    try:
        lock_file(fd, path, exclusive=True)
        os.pwrite(fd, build_file_identifier(CREATOR), 0)
        os.pwrite(fd, build_header(header), HEADER_OFFSETS[0])
        os.pwrite(
            fd,
            build_header(dataclasses.replace(header, sequence_number=2)),
            HEADER_OFFSETS[1],
        )
        os.pwrite(fd, regions, REGION_TABLE_OFFSETS[0])
        os.pwrite(fd, regions, REGION_TABLE_OFFSETS[1])
        os.pwrite(fd, bytes(meta), meta_offset)
        os.pwrite(fd, bat.tobytes(), bat_offset)
        os.ftruncate(fd, file_size)
        os.fsync(fd)
        fsync_dir(path.parent)
        disk = VhdxDisk(path, fd, read_only=False)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, OSError):
            raise VirtualDiskError(f"{path}: cannot create: {exc}") from exc
        raise
    return with_parent_chain(disk)
