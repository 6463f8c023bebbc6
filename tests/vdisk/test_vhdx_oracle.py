"""VHDX against the outside world: qemu-img/qemu-io make and read images, libvhdi reads ours."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from sitepair.vdisk.base import SubFormat
from sitepair.vdisk.vhdx import VhdxDisk, open_vhdx, set_parent_vhdx
from sitepair.vdisk.vhdx_create import create_vhdx
from sitepair.vdisk.vhdx_format import probe_vhdx
from tests.vdisk.vhdx_helpers import (
    MiB,
    pyvhdi_sha256,
    qemu_check,
    qemu_compare_raw,
    qemu_create,
    qemu_io,
    qemu_raw,
    require_qemu,
    sha256,
)

SIZE = 300 * MiB
# Aligned, unaligned, block-straddling (for every block size up to 256M) and zero writes.
QEMU_WRITES = (
    "write -P 0xa1 0 4k",
    "write -P 0xb2 1048064 1k",
    "write -P 0xc3 33M 128k",
    "write -P 0xe5 8388000 1000",
    "write -P 0xd4 268434944 2048",
    "write -P 0xf6 299M 1M",
    "write -z 40M 1M",
    "write -z 33M 4k",
)


@pytest.mark.parametrize("block_size", ["1M", "8M", "32M", "256M"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_images_read_byte_exact(tmp_path: Path, block_size: str, subformat: str) -> None:
    img = tmp_path / "q.vhdx"
    qemu_create(img, SIZE, subformat=subformat, block_size=block_size)
    qemu_io(img, *QEMU_WRITES)
    expected = qemu_raw(img, tmp_path)
    with open_vhdx(img, read_only=True) as disk:
        assert disk.virtual_size == SIZE
        assert disk.block_size == int(block_size[:-1]) * MiB
        assert disk.read(0, SIZE) == expected
        # Ranges outside allocated_ranges() read as zeros, and the ranges cover every non-zero.
        covered = bytearray(SIZE)
        for off, n in disk.allocated_ranges():
            covered[off : off + n] = expected[off : off + n]
        assert bytes(covered) == expected
        # Odd-sized reads across block boundaries.
        rng = random.Random(block_size + subformat)
        for _ in range(50):
            off = rng.randrange(SIZE - 1)
            n = rng.randrange(1, min(3 * MiB, SIZE - off))
            assert disk.read(off, n) == expected[off : off + n]


def test_qemu_image_written_by_us_stays_valid(tmp_path: Path) -> None:
    img = tmp_path / "q.vhdx"
    qemu_create(img, 64 * MiB, block_size="1M")
    qemu_io(img, "write -P 0x11 0 2M", "write -z 4M 1M")
    expected = bytearray(qemu_raw(img, tmp_path))
    with open_vhdx(img) as disk:
        for off, data in ((512, b"x" * 1000), (5 * MiB - 7, os.urandom(3 * MiB)), (1 * MiB, b"")):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        disk.write_zeroes(0, MiB)
        expected[0:MiB] = bytes(MiB)
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == bytes(expected)


@pytest.mark.parametrize("subformat", [SubFormat.DYNAMIC, SubFormat.FIXED])
@pytest.mark.parametrize(("block_size", "lss"), [(MiB, 512), (8 * MiB, 4096), (32 * MiB, 512)])
def test_our_images_pass_qemu_and_libvhdi(
    tmp_path: Path, subformat: SubFormat, block_size: int, lss: int
) -> None:
    require_qemu()
    img = tmp_path / "ours.vhdx"
    size = 72 * MiB
    expected = bytearray(size)
    rng = random.Random(f"{subformat}{block_size}{lss}")
    with create_vhdx(
        img, size=size, subformat=subformat, block_size=block_size, logical_sector_size=lss
    ) as disk:
        assert disk.subformat == subformat
        for _ in range(40):
            off = rng.randrange(size - 1)
            n = rng.randrange(1, min(2 * MiB, size - off))
            if rng.random() < 0.2:
                disk.write_zeroes(off, n)
                expected[off : off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                disk.write(off, data)
                expected[off : off + n] = data
            if rng.random() < 0.2:
                disk.flush()
        disk.write_zeroes(block_size, block_size)  # a whole block
        expected[block_size : 2 * block_size] = bytes(block_size)
    if lss == 512:  # qemu 7.2 refuses 4 KiB logical sectors ("Operation not supported")
        qemu_check(img)
        qemu_compare_raw(img, bytes(expected), tmp_path)
    assert pyvhdi_sha256(img) == sha256(bytes(expected))
    with open_vhdx(img, read_only=True) as disk:
        assert disk.read(0, size) == bytes(expected)
        assert disk.logical_sector_size == lss


def _write_random(disk: VhdxDisk, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        off = rng.randrange(size - 1)
        n = rng.randrange(1, min(3 * MiB, size - off))
        if rng.random() < 0.25:
            disk.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            disk.write(off, data)
            model[off : off + n] = data


def test_differencing_chain_matches_libvhdi(tmp_path: Path) -> None:
    """base <- mid <- top, each written at random: libvhdi (set_parent) reads what we read."""
    size = 48 * MiB
    rng = random.Random(7)
    model = bytearray(size)
    paths = [tmp_path / "base.vhdx", tmp_path / "mid.avhdx", tmp_path / "top.avhdx"]
    with create_vhdx(paths[0], size=size, subformat=SubFormat.DYNAMIC, block_size=MiB) as d:
        assert isinstance(d, VhdxDisk)
        _write_random(d, model, rng, 25)
    for parent, child in itertools.pairwise(paths):
        with create_vhdx(
            child, size=0, subformat=SubFormat.DIFFERENCING, block_size=MiB, parent=parent
        ) as d:
            assert isinstance(d, VhdxDisk)
            assert d.read(0, size) == bytes(model)
            _write_random(d, model, rng, 25)
            d.write_zeroes(3 * MiB, MiB)  # a whole block over parent data
            model[3 * MiB : 4 * MiB] = bytes(MiB)
    with open_vhdx(paths[2], read_only=True) as top:
        assert top.read(0, size) == bytes(model)
        assert [layer.path for layer in top.chain()] == [paths[2], paths[1], paths[0]]
        assert top.identity == top.chain()[-1].identity  # children copy page 83 data
        covered = bytearray(size)
        for off, n in top.allocated_ranges():
            covered[off : off + n] = model[off : off + n]
        assert bytes(covered) == bytes(model)
    assert pyvhdi_sha256(paths[2], [paths[1], paths[0]]) == sha256(bytes(model))


def test_fixed_parent_zero_writes_do_not_allocate_over_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, size=8 * MiB, subformat=SubFormat.FIXED, block_size=MiB) as d:
        d.write(0, b"\x01" * 4096)
    child = tmp_path / "child.avhdx"
    with create_vhdx(child, size=0, subformat=SubFormat.DIFFERENCING, parent=base) as d:
        d.write(2 * MiB, bytes(8192))  # the parent holds zeros there: nothing to hide
        assert list(d.allocated_ranges(this_layer_only=True)) == []
        d.write(0, bytes(512))  # hides parent data: must allocate (one sector)
        assert list(d.allocated_ranges(this_layer_only=True)) == [(0, 512)]
        assert d.read(0, 4096) == bytes(512) + b"\x01" * 3584


def test_relink_after_parent_changes(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, size=4 * MiB, subformat=SubFormat.DYNAMIC, block_size=MiB) as d:
        d.write(0, b"a" * 4096)
    child = tmp_path / "child.avhdx"
    with create_vhdx(child, size=0, subformat=SubFormat.DIFFERENCING, parent=base) as d:
        d.write(MiB, b"c" * 4096)
    with open_vhdx(base) as d:  # a "merge" changes the parent's DataWriteGuid
        d.write(2 * MiB, b"m" * 4096)
    with pytest.raises(Exception, match="modified after this differencing disk was created"):
        open_vhdx(child, read_only=True)
    moved = tmp_path / "sub" / "moved-base.vhdx"
    moved.parent.mkdir()
    base.rename(moved)
    set_parent_vhdx(child, moved)
    with open_vhdx(child, read_only=True) as d:
        assert d.read(0, 4) == b"aaaa"
        assert d.read(MiB, 4) == b"cccc"
        assert d.read(2 * MiB, 4) == b"mmmm"
        assert isinstance(d, VhdxDisk)
        assert d.parent_locator["relative_path"] == ".\\sub\\moved-base.vhdx"
    with open_vhdx(child, read_only=True) as d:
        ours = sha256(d.read(0, 4 * MiB))
    assert pyvhdi_sha256(child, [moved]) == ours


def test_probe() -> None:
    assert probe_vhdx(b"vhdxfile" + bytes(100))
    assert not probe_vhdx(b"conectix")
    assert not probe_vhdx(b"")
