"""Corrupt VHDX images: each gives a VirtualDiskError naming the structure and the problem,
never a crash, a hang or an allocation proportional to a claimed size."""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import SubFormat
from sitepair.vdisk.vhdx import VhdxDisk, open_vhdx
from sitepair.vdisk.vhdx_create import create_vhdx
from sitepair.vdisk.vhdx_format import HEADER_OFFSETS, REGION_TABLE_OFFSETS
from tests.vdisk.vhdx_helpers import (
    edit_both_headers,
    patch,
    read_at,
    rechecksum_regions,
)

MiB = 1 << 20
# Our layout (see vhdx_create._layout): log at 1 MiB, metadata region at 2 MiB, BAT at 3 MiB.
META = 2 * MiB
ITEMS = META + 64 * 1024  # File Parameters, Virtual Disk Size, Page 83, LSS, PSS (packed)
BAT = 3 * MiB


def make_image(path: Path, *, size: int = 16 * MiB) -> None:
    with create_vhdx(path, size=size, subformat=SubFormat.DYNAMIC, block_size=MiB) as d:
        d.write(0, b"\x5a" * 3 * MiB)


def bat_entry(path: Path, index: int, value: int) -> None:
    patch(path, BAT + 8 * index, struct.pack("<Q", value))


def region_entry(path: Path, index: int, *, offset: int | None = None, length: int | None = None,
                 guid: uuid.UUID | None = None, required: int | None = None) -> None:  # fmt: skip
    for table in REGION_TABLE_OFFSETS:
        at = table + 16 + 32 * index
        if guid is not None:
            patch(path, at, guid.bytes_le)
        if offset is not None:
            patch(path, at + 16, struct.pack("<Q", offset))
        if length is not None:
            patch(path, at + 24, struct.pack("<I", length))
        if required is not None:
            patch(path, at + 28, struct.pack("<I", required))
    rechecksum_regions(path)


def add_region(path: Path, guid: uuid.UUID, offset: int, length: int, required: int) -> None:
    for table in REGION_TABLE_OFFSETS:
        count = struct.unpack_from("<I", read_at(path, table + 8, 4))[0]
        patch(path, table + 8, struct.pack("<I", count + 1))
        patch(
            path,
            table + 16 + 32 * count,
            guid.bytes_le + struct.pack("<QII", offset, length, required),
        )
    rechecksum_regions(path)


def patch_each(path: Path, offsets: tuple[int, ...], data: bytes) -> None:
    for offset in offsets:
        patch(path, offset, data)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty file": (lambda p: os.truncate(p, 0), "too short to be a VHDX"),
    "not a vhdx": (lambda p: patch(p, 0, b"conectix"), "file type identifier"),
    "truncated in the headers": (
        lambda p: os.truncate(p, 100 * 1024),
        "beyond the end of the file",
    ),
    "truncated in header 1": (lambda p: os.truncate(p, 66 * 1024), "no valid header"),
    "truncated before the metadata": (lambda p: os.truncate(p, META), "beyond the end of the file"),
    "truncated in the BAT": (lambda p: os.truncate(p, BAT + 1024), "BAT region.*truncated"),
    "both header checksums bad": (
        lambda p: patch_each(p, tuple(off + 4 for off in HEADER_OFFSETS), b"\0\0\0\0"),
        "no valid header.*bad CRC-32C",
    ),
    "both region tables bad": (
        lambda p: patch_each(p, tuple(off + 100 for off in REGION_TABLE_OFFSETS), b"\xff"),
        "no valid region table.*bad CRC-32C",
    ),
    "header version 2": (
        lambda p: edit_both_headers(p, 66, struct.pack("<H", 2)),
        "header version is 2",
    ),
    "log beyond the end": (
        lambda p: edit_both_headers(p, 72, struct.pack("<Q", 1 << 40)),
        "log at .* beyond the end",
    ),
    "log of 2 GiB": (
        lambda p: edit_both_headers(p, 68, struct.pack("<I", 2048 * MiB)),
        "at most 256.0 MiB",
    ),
    "BAT entry beyond the end of the file": (
        lambda p: bat_entry(p, 1, 6 | (9000 * MiB)),
        r"BAT entry 1 \(payload block 1\) points at offset 8.8 GiB, beyond the end of the file",
    ),
    "BAT entry inside the header section": (
        lambda p: bat_entry(p, 2, 6 | 0),
        r"BAT entry 2 \(payload block 2\).*inside the header",
    ),
    "BAT entry overlapping the metadata region": (
        lambda p: bat_entry(p, 2, 6 | META),
        "overlaps the metadata region",
    ),
    "two BAT entries on one block": (
        lambda p: bat_entry(p, 2, int.from_bytes(read_at(p, BAT, 8), "little")),
        "overlaps BAT entry",
    ),
    "BAT entry in a reserved state": (lambda p: bat_entry(p, 5, 4 | (4 * MiB)), "reserved state 4"),
    "PARTIALLY_PRESENT in a dynamic disk": (
        lambda p: bat_entry(p, 0, 7 | (int.from_bytes(read_at(p, BAT, 8), "little") & ~7)),
        "only differencing disks allow",
    ),
    "overlapping regions": (lambda p: region_entry(p, 1, offset=BAT), "overlap"),
    "region beyond the end": (
        lambda p: region_entry(p, 1, offset=1 << 40),
        "beyond the end of the file",
    ),
    "unknown required region": (
        lambda p: add_region(p, uuid.uuid4(), 100 * MiB, MiB, 1),
        "marked required but is not part",
    ),
    "virtual size over 64 TiB": (
        lambda p: patch(p, ITEMS + 8, struct.pack("<Q", 65 << 40)),
        "virtual disk size.*64 TiB",
    ),
    "block size not a power of 2": (
        lambda p: patch(p, ITEMS, struct.pack("<I", 3 * MiB)),
        "block size is 3145728 bytes",
    ),
    "block size of 512 MiB": (
        lambda p: patch(p, ITEMS, struct.pack("<I", 512 * MiB)),
        "between 1 MiB and 256 MiB",
    ),
    "logical sector of 1000 bytes": (
        lambda p: patch(p, ITEMS + 32, struct.pack("<I", 1000)),
        "logical sector size is 1000",
    ),
    "metadata signature": (lambda p: patch(p, META, b"metadat!"), "metadata table has signature"),
    "unknown required metadata item": (
        lambda p: patch(p, META + 32, uuid.uuid4().bytes_le),
        "marked required but is not part",
    ),
    "metadata item outside the region": (
        lambda p: patch(p, META + 32 + 16, struct.pack("<I", 5 * MiB)),
        "outside the metadata region",
    ),
    "metadata entry count absurd": (
        lambda p: patch(p, META + 10, struct.pack("<H", 60000)),
        "at most 2047",
    ),
    "log named but empty": (
        lambda p: edit_both_headers(p, 48, uuid.uuid4().bytes_le),
        "no valid, complete log sequence",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_image_is_a_clear_error(tmp_path: Path, case: str) -> None:
    damage, message = CASES[case]
    img = tmp_path / "bad.vhdx"
    make_image(img)
    damage(img)
    for read_only in (True, False):
        with pytest.raises(VirtualDiskError, match=message) as info:
            open_vhdx(img, read_only=read_only)
        assert str(img) in str(info.value)


def test_one_bad_header_or_region_table_falls_back_to_the_other(tmp_path: Path) -> None:
    img = tmp_path / "x.vhdx"
    make_image(img)
    patch(img, HEADER_OFFSETS[0] + 200, b"\x01")
    patch(img, HEADER_OFFSETS[1] + 200, b"\x01")  # both bad...
    with pytest.raises(VirtualDiskError):
        open_vhdx(img, read_only=True)
    patch(img, HEADER_OFFSETS[1] + 200, b"\x00")  # ...then only header 1
    patch(img, REGION_TABLE_OFFSETS[0] + 300, b"\x01")
    with open_vhdx(img, read_only=True) as d:
        assert d.read(0, 4) == b"\x5a" * 4
        details = d.info().details
        assert "header 1" in details["header_problems"][0]  # type: ignore[index]
        assert "region table 1" in details["region_table_problems"][0]  # type: ignore[index]
    with open_vhdx(img) as d:  # a writable session rewrites both headers
        d.write(0, b"new")
    with open_vhdx(img, read_only=True) as d:
        assert d.info().details["header_problems"] == []


def test_missing_parent_and_parent_loop(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_image(base)
    a = tmp_path / "a.avhdx"
    create_vhdx(a, size=0, subformat=SubFormat.DIFFERENCING, parent=base).close()
    b = tmp_path / "b.avhdx"
    create_vhdx(b, size=0, subformat=SubFormat.DIFFERENCING, parent=a).close()
    # Make a's parent be b: a -> b -> a. The linkage must match b's DataWriteGuid.
    with open_vhdx(b, read_only=True) as d:
        assert isinstance(d, VhdxDisk)
        linkage = d.data_write_guid
    from sitepair.vdisk.vhdx import _open_layer
    from sitepair.vdisk.vhdx_format import PARENT_LOCATOR_GUID, build_parent_locator

    layer = _open_layer(a, read_only=False)
    layer._rewrite_metadata_item(
        PARENT_LOCATOR_GUID,
        build_parent_locator(
            {"parent_linkage": "{" + str(linkage) + "}", "relative_path": ".\\b.avhdx"}
        ),
    )
    layer.close()
    with pytest.raises(VirtualDiskError, match="loops back on itself") as info:
        open_vhdx(b, read_only=True)
    assert "a.avhdx" in str(info.value) and "b.avhdx" in str(info.value)
    c = tmp_path / "c.avhdx"
    create_vhdx(c, size=0, subformat=SubFormat.DIFFERENCING, parent=base).close()
    base.rename(tmp_path / "gone.vhdx")
    with pytest.raises(
        VirtualDiskError, match=r"parent disk not found; tried relative_path='\.\\\\base\.vhdx'"
    ):
        open_vhdx(c, read_only=True)


# -- fuzzing the header, region, metadata and log parsers ----------------------------------------
_TEMPLATE: dict[str, Path] = {}


def template() -> Path:
    """A small image with data and a non-empty log (a crash between log and in-place write)."""
    if "img" not in _TEMPLATE:
        d = Path(tempfile.mkdtemp(prefix="vhdx-fuzz-"))
        img = d / "t.vhdx"
        make_image(img, size=8 * MiB)
        disk = open_vhdx(img)
        assert isinstance(disk, VhdxDisk)
        disk.write(5 * MiB, b"\x77" * 70000)

        class Stop(Exception):
            pass

        def hook() -> None:
            raise Stop

        disk._after_log_entry_hook = hook
        with pytest.raises(Stop):
            disk.flush()
        disk._abandon()
        _TEMPLATE["img"] = img
    return _TEMPLATE["img"]


# Where the parsers look: file identifier, headers, region tables, log, metadata, BAT.
AREAS = [
    (0, 16),
    (HEADER_OFFSETS[0], 96),
    (HEADER_OFFSETS[1], 96),
    (REGION_TABLE_OFFSETS[0], 96),
    (REGION_TABLE_OFFSETS[1], 96),
    (MiB, 12288),
    (META, 256),
    (ITEMS, 64),
    (BAT, 64),
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(AREAS) - 1), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_fuzz_parsers(mutations: list[tuple[int, int, int]], fix_checksums: bool) -> None:
    src = template()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "f.vhdx"
        shutil.copyfile(src, img)
        for area, pos, value in mutations:
            start, length = AREAS[area]
            patch(img, start + pos % length, bytes([value]))
        if fix_checksums:  # get past the CRCs so the field checks behind them run too
            from tests.vdisk.vhdx_helpers import rechecksum_header

            rechecksum_header(img, 0)
            rechecksum_header(img, 1)
            rechecksum_regions(img)
        try:
            with open_vhdx(img, read_only=True) as d:
                size = d.virtual_size
                d.read(0, min(size, 8 * MiB))
                list(d.allocated_ranges())
                d.info()
        except VirtualDiskError:
            pass


def test_fuzz_random_bytes_in_the_first_mebibytes() -> None:
    rng = random.Random(99)
    src = template()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "f.vhdx"
        for _ in range(40):
            shutil.copyfile(src, img)
            for _ in range(rng.randrange(1, 50)):
                patch(img, rng.randrange(4 * MiB), bytes([rng.randrange(256)]))
            try:
                with open_vhdx(img, read_only=True) as d:
                    d.read(0, d.virtual_size if d.virtual_size <= 64 * MiB else MiB)
            except VirtualDiskError:
                pass
