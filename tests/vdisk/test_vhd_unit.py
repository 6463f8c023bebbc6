"""VHD details: geometry, checksums, locators, identity, concurrency, raw images and format
detection."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import (
    DiskFormat,
    SubFormat,
    create_disk,
    detect_format,
    open_disk,
)
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.raw import open_raw
from sitepair.vdisk.vhd import open_vhd, probe_vhd
from sitepair.vdisk.vhd_create import create_vhd
from tests.vdisk.helpers import MiB, patch, read_at


@pytest.mark.parametrize(
    ("size", "chs"),
    [
        (64 * MiB, (963, 8, 17)),  # 17 sectors per track range
        (127 * 1024 * MiB, (65278, 16, 255)),  # large disks: 16 heads, 255 sectors
        (3 * 1024 * MiB, (6241, 16, 63)),
        (2040 * 1024 * MiB, (65535, 16, 255)),  # capped at the largest geometry
    ],
)
def test_chs_geometry(size: int, chs: tuple[int, int, int]) -> None:
    assert L.chs_geometry(size) == chs


def test_footer_round_trip_and_checksum() -> None:
    footer = L.new_footer(disk_type=L.DISK_DYNAMIC, size=10 * MiB)
    raw = footer.pack()
    assert raw[:8] == b"conectix" and raw[28:32] == b"win "
    assert L.parse_footer(raw, "x") == footer
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(VirtualDiskError, match="bad checksum"):
        L.parse_footer(bytes(bad), "x")


def test_bitmap_helpers() -> None:
    bm = bytearray(512)
    assert L.set_bits(bm, 3, 11)
    assert bm[:2] == bytes([0b00011111, 0b11100000])
    assert not L.set_bits(bm, 4, 6)
    assert L.sector_runs(bm, 0, 16) == [(0, 3, False), (3, 11, True), (11, 16, False)]
    assert not L.bitmap_full(bm, 16)
    L.set_bits(bm, 0, 4096)
    assert L.bitmap_full(bm, 4096)
    assert L.bitmap_bytes(2 * MiB) == 512 and L.bitmap_bytes(4096) == 512
    assert L.bitmap_bytes(64 * MiB) == 16384
    assert L.bitmap_bytes(512) == 512  # one bit, still a whole sector


def test_identity_and_layout_of_a_new_dynamic_disk(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    with create_vhd(img, size=10 * MiB, subformat="dynamic") as disk:
        identity = disk.identity
        assert disk.block_size == 2 * MiB
        assert disk.logical_sector_size == disk.physical_sector_size == 512
    assert read_at(img, 0, 512) == read_at(img, img.stat().st_size - 512, 512)
    assert uuid.UUID(bytes=read_at(img, 68, 16)) == identity
    assert read_at(img, 512, 8) == b"cxsparse"
    with open_disk(img, read_only=True) as disk:
        info = disk.info()
        assert info.identity == identity
        assert info.allocated_bytes == 0
        assert info.change_token is None
        assert info.details["footer_copy"] == "ok"


def test_fixed_disk_is_sparse_and_exact(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    create_vhd(img, size=256 * MiB, subformat="fixed").close()
    assert img.stat().st_size == 256 * MiB + 512
    assert img.stat().st_blocks * 512 < MiB
    with open_vhd(img) as disk:
        assert list(disk.allocated_ranges()) == []
        disk.write(100 * MiB + 3, b"abc")
        disk.write(200 * MiB, bytes(MiB))  # zeros over a hole stay a hole
        ranges = list(disk.allocated_ranges())
        assert len(ranges) == 1 and ranges[0][0] <= 100 * MiB + 3 < sum(ranges[0])
    assert img.stat().st_blocks * 512 < 2 * MiB


def test_zero_writes_do_not_allocate(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhd", tmp_path / "c.avhd"
    with create_vhd(base, size=8 * MiB, subformat="dynamic") as disk:
        disk.write(0, bytes(4 * MiB))
        disk.write_zeroes(0, 8 * MiB)
        assert list(disk.allocated_ranges()) == []
        disk.write(5 * MiB, b"data")
    with create_vhd(child, size=None, subformat="differencing", parent=base) as disk:
        disk.write(0, bytes(MiB))  # parent has nothing here: stays unallocated
        assert list(disk.allocated_ranges(this_layer_only=True)) == []
        disk.write_zeroes(5 * MiB, 4096)  # hides the parent's data: must allocate
        assert disk.read(5 * MiB, 4) == bytes(4)
        assert list(disk.allocated_ranges(this_layer_only=True)) == [(5 * MiB, 4096)]
    with open_disk(base, read_only=True) as disk:
        assert disk.read(5 * MiB, 4) == b"data"


def test_differencing_locators(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "kids").mkdir()
    base, child = tmp_path / "base" / "b.vhd", tmp_path / "kids" / "c.avhd"
    create_vhd(base, size=4 * MiB, subformat="dynamic").close()
    with create_vhd(child, size=None, subformat="differencing", parent=base) as disk:
        entries = disk.info().details["parent_locators"]
    assert isinstance(entries, list)
    locs = {d["platform"]: d["path"] for d in entries}
    assert locs["W2ru"] == "..\\base\\b.vhd"
    assert locs["W2ku"] == str(base.absolute())
    # The relative locator wins: move both folders together and the chain still opens.
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "base").rename(moved / "base")
    (tmp_path / "kids").rename(moved / "kids")
    with open_disk(moved / "kids" / "c.avhd", read_only=True) as disk:
        assert disk.parent is not None and disk.parent.path.resolve() == moved / "base" / "b.vhd"


def test_parallel_reads_while_writing(tmp_path: Path) -> None:
    """Two reader threads hash stable blocks while a writer fills other blocks."""
    img = tmp_path / "d.vhd"
    stable = os.urandom(4 * MiB)
    with create_vhd(img, size=32 * MiB, subformat="dynamic") as disk:
        disk.write(0, stable)
        errors: list[str] = []

        def reader() -> None:
            for i in range(40):
                off = (i * 12345) % (4 * MiB - 70000)
                if disk.read(off, 70000) != stable[off : off + 70000]:
                    errors.append(f"read at {off}")

        def writer() -> None:
            for i in range(40):
                disk.write(8 * MiB + i * 500_000, bytes([i + 1]) * 300_000)

        threads = [threading.Thread(target=f) for f in (reader, reader, writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in range(40):
            assert disk.read(8 * MiB + i * 500_000, 300_000) == bytes([i + 1]) * 300_000


def test_locks(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    create_vhd(img, size=MiB, subformat="dynamic").close()
    with open_vhd(img), pytest.raises(VirtualDiskError, match="another process has it open"):
        open_vhd(img, read_only=True)
    with (
        open_vhd(img, read_only=True),
        open_vhd(img, read_only=True),
        pytest.raises(VirtualDiskError, match="cannot be opened for writing"),
    ):
        open_vhd(img)


def test_read_only_and_closed(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    create_vhd(img, size=MiB, subformat="dynamic").close()
    disk = open_vhd(img, read_only=True)
    with pytest.raises(VirtualDiskError, match="read-only"):
        disk.write(0, b"x")
    with pytest.raises(VirtualDiskError, match="outside the disk"):
        disk.read(MiB - 1, 2)
    disk.close()
    disk.close()
    with pytest.raises(VirtualDiskError, match="closed"):
        disk.read(0, 1)


# -- raw ---------------------------------------------------------------------------------------
def test_raw_images(tmp_path: Path) -> None:
    img = tmp_path / "r.img"
    with create_disk(img, format="raw", subformat="fixed", size=1 << 34) as disk:
        assert disk.format is DiskFormat.RAW and disk.identity is None
        assert list(disk.allocated_ranges()) == []
        disk.write(5 << 30, b"x" * 10000)
        disk.write(9 << 30, bytes(1 << 20))
        (off, n), *rest = list(disk.allocated_ranges())
        assert not rest and off <= 5 << 30 and off + n >= (5 << 30) + 10000
        disk.write_zeroes(5 << 30, 5000)
        assert disk.read(5 << 30, 10000) == bytes(5000) + b"x" * 5000
        assert disk.block_size == 2 * MiB
    assert img.stat().st_blocks * 512 < 4 * MiB
    with open_raw(img, read_only=True) as disk:
        assert disk.virtual_size == 1 << 34
        assert disk.info().allocated_bytes > 0


# -- detection --------------------------------------------------------------------------------
def test_detection_by_content(tmp_path: Path) -> None:
    vhd_img = tmp_path / "named-wrong.raw"
    create_vhd(vhd_img, size=MiB, subformat="dynamic").close()
    assert detect_format(vhd_img) is DiskFormat.VHD
    with open_disk(vhd_img, read_only=True) as disk:
        assert disk.format is DiskFormat.VHD
    fixed = tmp_path / "fixed.img"
    create_vhd(fixed, size=MiB, subformat="fixed").close()
    assert detect_format(fixed) is DiskFormat.VHD  # footer only at the end
    raw = tmp_path / "plain.img"
    raw.write_bytes(b"\x01" * 4096)
    assert detect_format(raw) is None
    with open_disk(raw, read_only=True) as disk:
        assert disk.format is DiskFormat.RAW
    other = tmp_path / "plain.bin"
    other.write_bytes(b"\x01" * 4096)
    with pytest.raises(VirtualDiskError, match="unrecognised image format"):
        open_disk(other)
    with open_disk(other, read_only=True, format=DiskFormat.RAW) as disk:
        assert disk.virtual_size == 4096
    broken = tmp_path / "broken.vhdx"
    broken.write_bytes(bytes(1 << 20))
    with pytest.raises(VirtualDiskError, match="not a VHDX image"):
        open_disk(broken)


def test_probe_vhd() -> None:
    footer = L.new_footer(disk_type=L.DISK_FIXED, size=MiB).pack()
    assert probe_vhd(bytes(512), footer)
    assert probe_vhd(footer, bytes(512))
    assert not probe_vhd(bytes(512), bytes(512))


def test_vhdx_detected_and_created(tmp_path: Path) -> None:
    img = tmp_path / "x.bin"
    with create_disk(img, format="vhdx", subformat="dynamic", size=8 * MiB) as disk:
        assert disk.format is DiskFormat.VHDX
    assert detect_format(img) is DiskFormat.VHDX
    with open_disk(img, read_only=True) as disk:
        assert disk.subformat is SubFormat.DYNAMIC
    with pytest.raises(VirtualDiskError):
        create_vhd(tmp_path / "child.avhd", size=None, subformat="differencing", parent=img)


def test_damaged_footer_detected_through_copy(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    create_vhd(img, size=MiB, subformat="dynamic").close()
    size = img.stat().st_size
    patch(img, size - 512, bytes(512))
    assert detect_format(img) is DiskFormat.VHD


def test_allocated_block_data_is_page_aligned(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    with create_vhd(img, size=16 * MiB, subformat="dynamic") as disk:
        for off in (5 * MiB, 0, 11 * MiB + 7):
            disk.write(off, b"z" * 100)
    offsets = [int.from_bytes(read_at(img, 1536 + 4 * i, 4), "big") * 512 for i in (0, 2, 5)]
    assert all((off + 512) % 4096 == 0 for off in offsets)
    with open_disk(img, read_only=True) as disk:
        assert disk.read(11 * MiB + 7, 100) == b"z" * 100


def test_not_an_image_file(tmp_path: Path) -> None:
    with pytest.raises(VirtualDiskError, match="is a directory"):
        open_disk(tmp_path, format="raw")
    with pytest.raises(VirtualDiskError, match="no such file"):
        open_vhd(tmp_path / "nope.vhd")


def test_foreign_footer_bytes_are_kept(tmp_path: Path) -> None:
    """Reserved footer bytes another tool wrote survive our writes (the footer moves when a
    block is appended) and the two footers stay identical."""
    from tests.vdisk.helpers import edit_footers

    img = tmp_path / "d.vhd"
    create_vhd(img, size=8 * MiB, subformat="dynamic").close()
    edit_footers(img, 200, b"foreign")
    with open_vhd(img) as disk:
        assert disk.info().details["footer_copy"] == "ok"
        disk.write(3 * MiB, b"x" * 10)
    end = read_at(img, img.stat().st_size - 512, 512)
    assert end == read_at(img, 0, 512)
    assert end[200:207] == b"foreign"
