"""Raw images: the guest bytes as a plain (usually sparse) file.

Virtual size is the file size. ``allocated_ranges`` asks the file system where data is
(``SEEK_DATA``/``SEEK_HOLE``) and reports the whole file where it cannot tell; writing zeros
over a hole leaves it a hole. The block size is a nominal 2 MiB so callers can iterate in
blocks, as with the other formats. Raw images have no identity and no parent.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.fsutil import fsync_dir
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, VirtualDisk
from sitepair.vdisk.fileio import (
    data_ranges,
    datasync,
    file_size,
    open_image,
    pread_exact,
    preadv_exact,
    pwrite_all,
    write_keep_holes,
)
from sitepair.vdisk.locking import lock_file

NOMINAL_BLOCK_SIZE = 2 << 20
SECTOR = 512


def open_raw(path: str | os.PathLike[str], *, read_only: bool = False) -> RawDisk:
    """Open a raw image (no format detection: any file is a raw image)."""
    p = Path(path)
    fd = open_image(p, read_only=read_only)
    try:
        lock_file(fd, p, exclusive=not read_only)
        return RawDisk(p, fd, read_only=read_only)
    except BaseException:
        os.close(fd)
        raise


def create_raw(path: str | os.PathLike[str], *, size: int) -> RawDisk:
    """Create a sparse raw image of ``size`` bytes (never overwriting an existing file) and
    return it opened writable."""
    p = Path(path)
    if size < 0:
        raise VirtualDiskError(f"{p}: size must not be negative (got {size})")
    fd = open_image(p, read_only=False, create=True)
    try:
        lock_file(fd, p, exclusive=True)
        os.ftruncate(fd, size)
        datasync(fd)
        fsync_dir(p.parent)
        return RawDisk(p, fd, read_only=False)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            p.unlink()
        raise


class RawDisk(VirtualDisk):
    """An open raw image. Create with :func:`open_raw`."""

    format = DiskFormat.RAW
    subformat = SubFormat.FIXED

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        self.parent = None
        self._fd = fd
        self._size = file_size(fd)

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
        return NOMINAL_BLOCK_SIZE

    @property
    def identity(self) -> None:
        return None

    def info(self) -> DiskInfo:
        self._check_open()
        return DiskInfo(
            path=str(self.path),
            format=DiskFormat.RAW,
            subformat=SubFormat.FIXED,
            virtual_size=self._size,
            logical_sector_size=SECTOR,
            physical_sector_size=SECTOR,
            block_size=NOMINAL_BLOCK_SIZE,
            identity=None,
            file_size=file_size(self._fd),
            allocated_bytes=sum(n for _, n in self.allocated_ranges()),
            change_token=None,
        )

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        self._check_range(offset, length)
        return pread_exact(self._fd, length, offset, self.path, "guest data")

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check_open()
        self._check_range(offset, len(buf))
        if len(buf):
            preadv_exact(self._fd, [buf], offset, self.path, "guest data")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if len(view):
            with self._write_lock:
                write_keep_holes(self._fd, offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        with self._write_lock:
            zeros = memoryview(bytes(min(length, 4 << 20)))
            for start, n in list(data_ranges(self._fd, offset, offset + length)):
                pos, end = start, start + n
                while pos < end:
                    step = min(end - pos, len(zeros))
                    pwrite_all(self._fd, zeros[:step], pos)
                    pos += step

    def flush(self) -> None:
        self._check_open()
        if not self.read_only:
            with self._write_lock:
                datasync(self._fd)

    def allocated_ranges(self, *, this_layer_only: bool = False) -> Iterator[tuple[int, int]]:
        self._check_open()
        return iter(list(data_ranges(self._fd, 0, self._size)))

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
