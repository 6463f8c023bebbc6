"""Creating VHD images: fixed, dynamic and differencing.

The file is created exclusively (an existing file is never overwritten), written completely and
synced, with its folder entry, before it is opened as a :class:`sitepair.vdisk.vhd.VhdDisk`.
A dynamic or differencing disk is laid out as footer copy, dynamic disk header, BAT, parent
locators (differencing) and the footer; blocks are appended as they are written.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.fsutil import fsync_dir
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.base import SubFormat
from sitepair.vdisk.fileio import (
    datasync,
    open_image,
    pwrite_all,
    round_up,
)
from sitepair.vdisk.locking import lock_file
from sitepair.vdisk.vhd import VhdDisk, open_vhd
from sitepair.vdisk.vhd_load import DEFAULT_BLOCK_SIZE
from sitepair.vdisk.vhd_locator import relative_locator

__all__ = ["create_vhd"]

_DISK_TYPE_OF = {
    SubFormat.FIXED: L.DISK_FIXED,
    SubFormat.DYNAMIC: L.DISK_DYNAMIC,
    SubFormat.DIFFERENCING: L.DISK_DIFFERENCING,
}


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
                rel = relative_locator(parent_path, p)
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
        fsync_dir(p.parent)
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
