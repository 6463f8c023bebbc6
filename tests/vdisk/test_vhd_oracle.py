"""VHD against the outside world.

qemu-img/qemu-io make and write images that we must read byte for byte as ``qemu-img convert
-O raw`` does; images we make and write must satisfy ``qemu-img compare`` against the raw
expectation and hash the same through libvhdi (``pyvhdi``), differencing chains included
(qemu 7.2 cannot create differencing VHDs and ignores their parents, so libvhdi is the oracle
there).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sitepair.vdisk import SubFormat, open_disk
from sitepair.vdisk.vhd import open_vhd
from sitepair.vdisk.vhd_create import create_vhd
from tests.vdisk.helpers import (
    MiB,
    pyvhdi_sha256,
    qemu_compare_raw,
    qemu_create_vpc,
    qemu_io,
    qemu_raw,
    qemu_virtual_size,
    require_pyvhdi,
    require_qemu,
    sha256,
)

SIZE = 40 * MiB
# Aligned, unaligned, straddling a 2 MiB block boundary, the last sector, and zero writes
# (over data and over nothing).
QEMU_WRITES = (
    "write -P 0xa1 0 4k",
    "write -P 0xb2 1048064 1k",
    "write -P 0xc3 2096640 1024",
    "write -P 0xd4 33M 128k",
    "write -P 0xe5 5000000 3000",
    "write -P 0xf6 41942528 512",
    "write -z 33M 4k",
    "write -z 20M 1M",
    "write -P 0x17 6291456 2M",
)


def _read_all(path: Path) -> bytes:
    with open_disk(path, read_only=True) as disk:
        return disk.read(0, disk.virtual_size)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_written_images_read_byte_exact(tmp_path: Path, subformat: str) -> None:
    img = tmp_path / f"q-{subformat}.vhd"
    qemu_create_vpc(img, SIZE, subformat=subformat)
    qemu_io(img, *QEMU_WRITES)
    expected = qemu_raw(img, tmp_path)
    assert len(expected) == SIZE
    with open_vhd(img, read_only=True) as disk:
        assert disk.virtual_size == SIZE
        assert disk.subformat == SubFormat(subformat)
        assert disk.read(0, SIZE) == expected
        # Unaligned reads across block boundaries, and ranges outside allocated_ranges are zero.
        for off, n in ((2096640 - 7, 1031), (33 * MiB - 1, 130 * 1024), (SIZE - 513, 513)):
            assert disk.read(off, n) == expected[off : off + n]
        pos = 0
        for off, n in disk.allocated_ranges():
            assert not any(expected[pos:off])
            pos = off + n
        assert not any(expected[pos:])
        info = disk.info()
        assert info.details["creator_application"] == "qem2"


def test_qemu_chs_sized_image_agrees_on_size(tmp_path: Path) -> None:
    """Without force_size qemu rounds the size up to a CHS geometry and writes creator "qemu";
    current_size and the geometry then agree, and so must we with qemu."""
    img = tmp_path / "chs.vhd"
    qemu_create_vpc(img, 50 * MiB + 12345, subformat="dynamic", force_size=False)
    qemu_io(img, "write -P 0x3c 1000 5000")
    with open_vhd(img, read_only=True) as disk:
        assert disk.virtual_size == qemu_virtual_size(img)
        assert disk.read(0, disk.virtual_size) == qemu_raw(img, tmp_path)


def test_qemu_writes_into_our_dynamic_image(tmp_path: Path) -> None:
    require_qemu()
    img = tmp_path / "ours.vhd"
    with create_vhd(img, size=SIZE, subformat="dynamic") as disk:
        disk.write(7 * MiB + 3, b"ours" * 1000)
    qemu_io(img, *QEMU_WRITES)
    assert _read_all(img) == qemu_raw(img, tmp_path)
    assert qemu_virtual_size(img) == SIZE


def _random_writes(seed: int, size: int, count: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    out: list[tuple[int, bytes]] = []
    for i in range(count):
        length = rng.choice([1, 511, 512, 4096, 70000, 2 * MiB + 1000])
        off = rng.randrange(0, size - length)
        if i % 7 == 3:
            data = bytes(length)  # zero writes, over data or over nothing
        else:
            data = rng.randbytes(min(length, 64)) * (length // 64 + 1)
            data = data[:length]
        out.append((off, data))
    return out


@pytest.mark.parametrize(
    ("subformat", "block_size"), [("dynamic", 2 * MiB), ("dynamic", 512 * 1024), ("fixed", 0)]
)
def test_our_images_pass_qemu_compare_and_libvhdi(
    tmp_path: Path, subformat: str, block_size: int
) -> None:
    require_qemu()
    require_pyvhdi()
    img = tmp_path / "ours.vhd"
    expected = bytearray(SIZE)
    kwargs: dict[str, Any] = {"block_size": block_size} if block_size else {}
    with create_vhd(img, size=SIZE, subformat=subformat, **kwargs) as disk:
        for off, data in _random_writes(7, SIZE, 40):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        disk.flush()
    assert qemu_virtual_size(img) == SIZE
    qemu_compare_raw(img, bytes(expected), tmp_path)
    assert pyvhdi_sha256(img) == sha256(expected)


def test_differencing_chain_hashes_match_libvhdi(tmp_path: Path) -> None:
    """base <- mid <- top, each written (unaligned, partial sectors, zeros over parent data);
    libvhdi, linking the chain itself, must read what we read and what the model says."""
    require_pyvhdi()
    base, mid, top = tmp_path / "base.vhd", tmp_path / "d1" / "mid.avhd", tmp_path / "top.avhd"
    mid.parent.mkdir()
    expected = bytearray(SIZE)
    layers = [(base, None), (mid, base), (top, mid)]
    for seed, (path, parent) in enumerate(layers):
        sub = "differencing" if parent else "dynamic"
        with create_vhd(path, size=None if parent else SIZE, subformat=sub, parent=parent) as d:
            for off, data in _random_writes(100 + seed, SIZE, 25):
                d.write(off, data)
                expected[off : off + len(data)] = data
    assert _read_all(top) == expected
    assert pyvhdi_sha256(top, [mid, base]) == sha256(expected)
    pyvhdi = require_pyvhdi()
    f = pyvhdi.file()
    f.open(str(top))
    with open_vhd(mid, read_only=True) as m:
        assert f.parent_identifier == str(m.identity)
    assert f.disk_type == 4
    f.close()


def test_differencing_partial_sector_writes_match_libvhdi(tmp_path: Path) -> None:
    """Single sectors and sub-sector writes in a child, on a parent full of data: the sectors
    around them must still come from the parent for libvhdi as for us."""
    require_pyvhdi()
    base, child = tmp_path / "base.vhd", tmp_path / "child.avhd"
    size = 4 * MiB
    expected = bytearray(random.Random(3).randbytes(size))
    with create_vhd(base, size=size, subformat="dynamic") as d:
        d.write(0, expected)
    with create_vhd(child, size=None, subformat="differencing", parent=base) as d:
        for off, n in ((3 * 512, 512), (20 * 512 + 7, 900), (2 * MiB - 100, 300), (3 * MiB, 1)):
            d.write(off, b"\xcc" * n)
            expected[off : off + n] = b"\xcc" * n
    assert _read_all(child) == expected
    assert pyvhdi_sha256(child, [base]) == sha256(expected)
