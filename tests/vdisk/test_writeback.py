"""Early writeback: advice to the kernel that never changes what a disk holds or when it is
durable, available on every format, refused on a closed disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import create_disk, open_disk
from sitepair.vdisk.fileio import start_writeback
from tests.vdisk.helpers import MiB

LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="sync_file_range is Linux-only")
def test_start_writeback_is_taken_for_a_file_and_declined_for_a_pipe(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    r, w = os.pipe()
    try:
        os.pwrite(fd, os.urandom(MiB), 0)
        assert start_writeback(fd) is True
        assert start_writeback(r) is False  # the kernel says ESPIPE; advice, not an error
    finally:
        for x in (fd, r, w):
            os.close(x)


@pytest.mark.parametrize(
    ("fmt", "sub"), [("raw", "fixed"), ("vhd", "dynamic"), ("vhd", "fixed"), ("vhdx", "dynamic")]
)
def test_disks_start_writeback_between_writes_and_keep_every_byte(
    tmp_path: Path, fmt: str, sub: str
) -> None:
    path = tmp_path / f"d.{fmt}"
    data = os.urandom(3 * MiB + 4096)
    with create_disk(path, format=fmt, subformat=sub, size=8 * MiB) as d:
        d.write(0, data[: 2 * MiB])
        assert d.start_writeback() is LINUX
        d.write(2 * MiB, data[2 * MiB :])
        assert d.start_writeback() is LINUX
        d.flush()
        assert d.read(0, len(data)) == data
    with open_disk(path, read_only=True) as d:
        assert d.read(0, len(data)) == data
        assert d.start_writeback() is False  # nothing of ours to write back
    with pytest.raises(VirtualDiskError, match="closed"):
        d.start_writeback()
