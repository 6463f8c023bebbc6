"""An append-only file of length- and checksum-framed records, safe against torn writes.

Each record is ``u32 length | u32 crc32c | bytes``. Reading stops at the first record that is
incomplete or fails its checksum (the tail a crash may leave); ``truncate_to`` cuts the file back
to a known-good length before appending again.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from sitepair.vdisk.fileio import O_BINARY, pread, pwrite_all, start_writeback
from sitepair.vdisk.vhdx_crc import crc32c

_HEAD = struct.Struct("<II")
MAX_RECORD = 64 * 1024 * 1024


class RecordFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o600)
        self.size = os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        head = _HEAD.pack(len(data), crc32c(data))
        pwrite_all(self._fd, head + data, self.size)
        self.size += len(head) + len(data)

    def sync(self) -> None:
        os.fsync(self._fd)

    def start_writeback(self) -> None:
        """Start writing appended records to disk without waiting (see fileio.start_writeback)."""
        start_writeback(self._fd)

    def truncate_to(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self.size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(end offset, record) for every intact record from the start."""
        pos = 0
        while pos + _HEAD.size <= self.size:
            length, crc = _HEAD.unpack(pread(self._fd, _HEAD.size, pos))
            if length > MAX_RECORD or pos + _HEAD.size + length > self.size:
                return
            data = pread(self._fd, length, pos + _HEAD.size)
            if len(data) != length or crc32c(data) != crc:
                return
            pos += _HEAD.size + length
            yield pos, data
