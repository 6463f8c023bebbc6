"""qcow2 (read-only) against QEMU: images made by qemu-img and written by qemu-io, our
allocation map checked against ``qemu-img map`` (the top layer's own entries) and our guest
bytes against ``qemu-img convert -O raw`` of the whole chain, byte for byte; backing chains
onto images sitepair made; corrupt and hostile images."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitepair import vdisk
from sitepair.errors import VirtualDiskError
from sitepair.vdisk import (
    DiskFormat,
    SubFormat,
    coalesce,
    create_disk,
    detect_format,
    fileio,
    open_disk,
    vhd_layout,
)
from sitepair.vdisk import qcow2 as q
from sitepair.vdisk import qcow2_header as qh
from sitepair.vdisk.cli import main
from sitepair.vdisk.ops import compare, convert, merge
from sitepair.vdisk.qcow2 import Qcow2Disk, open_qcow2
from tests.vdisk.helpers import read_at, require_qemu, run
from tests.vdisk.qcow2_helpers import (
    MiB,
    l1_offset,
    l2_entry_at,
    l2_offset,
    patch,
    qemu_chain_raw,
    qemu_create_qcow2,
    qemu_io_qcow2,
    qemu_map,
    qemu_top_layer,
    set_u32,
    set_u64,
    u32,
    u64,
)

pytestmark = pytest.mark.usefixtures("qemu")

SIZE = 24 * MiB
#: Aligned, unaligned, cluster-straddling, multi-cluster, zero (over data and over nothing,
#: with and without unmap) and discarded writes; the last one ends at the disk's end.
QEMU_WRITES = (
    "write -P 0xa1 0 4k",
    "write -P 0xb2 65000 3000",
    "write -P 0xc3 1M 1M",
    "write -P 0xd4 3000000 70000",
    "write -z 1536k 64k",
    "write -z 9M 64k",
    "write -P 0x5e 12M 2M",
    "write -z -u 12M 1M",
    "discard 13M 512k",
    "write -P 0x99 6M 600k",
    "write -P 0xe5 23M 1M",
)
CONFIGS = {
    "v2-64k": "compat=0.10",
    "v2-4k": "compat=0.10,cluster_size=4k",
    "v3-512": "cluster_size=512",
    "v3-4k": "cluster_size=4k",
    "v3-64k": "",
    "v3-2m": "cluster_size=2M",
    "v3-64k-extended-l2": "extended_l2=on",
    "v3-2m-extended-l2": "cluster_size=2M,extended_l2=on",
    "v3-lazy-refcounts": "lazy_refcounts=on",
}


@pytest.fixture
def qemu() -> None:
    require_qemu()


def check_against_qemu(path: Path, tmp: Path, *, slices: int = 40) -> bytes:
    """Our guest bytes equal qemu-img convert's, our layer map equals qemu-img map's top layer,
    and everything outside allocated_ranges() reads as zeros. Returns the guest bytes."""
    expected = qemu_chain_raw(path, tmp)
    top = qemu_top_layer(path)
    with open_disk(path, read_only=True) as disk:
        assert isinstance(disk, Qcow2Disk)
        assert disk.format is DiskFormat.QCOW2
        assert disk.virtual_size == len(expected)
        assert disk.read(0, len(expected)) == expected
        extents = list(disk.layer_extents())
        assert list(coalesce((o, n) for o, n, z in extents if not z)) == top.data
        assert list(coalesce((o, n) for o, n, z in extents if z)) == top.zero
        assert list(disk.allocated_ranges(this_layer_only=True)) == top.allocated
        covered = bytearray(len(expected))
        for off, n in disk.allocated_ranges():
            covered[off : off + n] = expected[off : off + n]
        assert covered == expected
        rng = random.Random(str(path))
        for _ in range(slices):
            off = rng.randrange(len(expected))
            n = rng.randrange(0, min(3 * MiB, len(expected) - off) + 1)
            assert disk.read(off, n) == expected[off : off + n]
            buf = bytearray(n)
            disk.read_into(off, memoryview(buf))
            assert buf == expected[off : off + n]
    return expected


# -- images QEMU made ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_qemu_images_read_and_map_exactly(tmp_path: Path, config: str) -> None:
    img = tmp_path / "q.qcow2"
    qemu_create_qcow2(img, SIZE, options=CONFIGS[config])
    qemu_io_qcow2(img, *QEMU_WRITES)
    data = check_against_qemu(img, tmp_path)
    assert data[65000:68000] == b"\xb2" * 3000
    with open_qcow2(img) as disk:
        info = disk.info()
        assert info.format is DiskFormat.QCOW2 and info.subformat is SubFormat.DYNAMIC
        assert info.parent is None and disk.parent is None
        assert info.details["qcow2_version"] == (2 if "compat=0.10" in CONFIGS[config] else 3)
        assert info.details["extended_l2"] == ("extended_l2" in CONFIGS[config])
        assert info.allocated_bytes == sum(n for _, n in qemu_top_layer(img).allocated)
        assert not disk.dirty


def test_empty_image_and_unaligned_size(tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    qemu_create_qcow2(empty, 64 * MiB)
    with open_disk(empty, read_only=True) as disk:
        assert list(disk.allocated_ranges()) == []
        assert disk.read(5 * MiB, MiB) == bytes(MiB)
    odd = tmp_path / "odd.qcow2"
    qemu_create_qcow2(odd, 8 * MiB + 512, options="cluster_size=2M")
    qemu_io_qcow2(odd, "write -P 0x3c 8M 512", "write -P 0x4d 1M 100")
    check_against_qemu(odd, tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        "compat=0.10,cluster_size=4k",
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=2M",
        "compression_type=zlib,cluster_size=512",
        "compression_type=zstd,extended_l2=on",
    ],
)
def test_compressed_clusters(tmp_path: Path, options: str) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(options)
    content = bytearray(10 * MiB)
    for at in range(0, len(content), 192 * 1024):
        kind = rng.choice(["text", "random", "zero", "text"])
        n = min(rng.randrange(1, 192 * 1024), len(content) - at)
        if kind == "text":
            content[at : at + n] = (b"sitepair qcow2 %d " % at * (n // 16 + 1))[:n]
        elif kind == "random":
            content[at : at + n] = rng.randbytes(n)
    src.write_bytes(content)
    img = tmp_path / "c.qcow2"
    r = run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, img)
    assert r.returncode == 0, r.stderr
    # Compressed clusters are data without a host offset in qemu-img map.
    assert any(e["data"] and "offset" not in e for e in qemu_map(img))
    assert check_against_qemu(img, tmp_path) == content
    # Overwrite parts of compressed clusters (QEMU decompresses and rewrites them).
    qemu_io_qcow2(img, "write -P 0x77 100000 5000", "write -z 3M 4k", "write -P 1 5M 1M")
    check_against_qemu(img, tmp_path)


# -- backing chains ---------------------------------------------------------------------------
def make_base(path: Path, fmt: str, size: int = 16 * MiB) -> None:
    """A base image made and written by sitepair itself."""
    if fmt == "raw":
        disk = create_disk(path, format="raw", subformat="fixed", size=size)
    else:
        disk = create_disk(path, format=fmt, subformat="dynamic", size=size, block_size=MiB)
    with disk:
        disk.write(0, b"\x11" * (3 * MiB))
        disk.write(5 * MiB + 100, b"\x22" * 70000)
        disk.write(size - 4096, b"\x33" * 4096)
        disk.write(min(9 * MiB, size - 2 * MiB), bytes(range(256)) * 4096)


OVERLAY_WRITES = (
    "write -P 0xa1 0 4k",  # partly over base data
    "write -P 0xb2 65000 3000",
    "write -z 1M 64k",  # zeros over base data: the zero flag must hide it
    "discard 2M 128k",  # discard over base data
    "write -P 0xc3 9M 100k",
    "write -P 0xd4 14M 64k",  # over nothing in the base
)


@pytest.mark.parametrize("options", ["", "compat=0.10", "extended_l2=on", "cluster_size=4k"])
def test_overlay_on_a_sitepair_vhdx(tmp_path: Path, options: str) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, "vhdx")
    top = tmp_path / "top.qcow2"
    qemu_create_qcow2(top, options=options, backing="base.vhdx", backing_fmt="vhdx")
    qemu_io_qcow2(top, *OVERLAY_WRITES)
    data = check_against_qemu(top, tmp_path)
    assert data[1 * MiB : 1 * MiB + 65536] == bytes(65536)
    with open_disk(top, read_only=True) as disk:
        assert disk.subformat is SubFormat.DIFFERENCING
        assert disk.parent is not None and disk.parent.format is DiskFormat.VHDX
        assert disk.parent.path == base
        info = disk.info()
        assert info.details["backing_file"] == "base.vhdx"
        assert info.details["backing_format"] == "vhdx"
        assert info.parent is not None and info.parent.format is DiskFormat.VHDX
        # The layer's own ranges are what was written since the overlay was made.
        own = list(disk.allocated_ranges(this_layer_only=True))
        assert own == qemu_top_layer(top).allocated
        assert own[0][0] == 0 and all(off < 15 * MiB for off, _ in own)


def test_qcow2_on_qcow2_on_vhdx(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, "vhdx")
    (tmp_path / "layers").mkdir()
    mid = tmp_path / "layers" / "mid.qcow2"
    top = tmp_path / "layers" / "top.qcow2"
    qemu_create_qcow2(mid, backing="../base.vhdx", backing_fmt="vhdx")
    qemu_io_qcow2(mid, "write -P 0x44 2M 2M", "write -z 9M 4k")
    qemu_create_qcow2(top, options="cluster_size=4k", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io_qcow2(top, "write -P 0x55 3M 100k", "write -z 2M 4k", "write -P 0x66 15M 1M")
    data = check_against_qemu(top, tmp_path)
    check_against_qemu(mid, tmp_path)
    with open_disk(top, read_only=True) as disk:
        assert [d.format for d in disk.chain()] == ["qcow2", "qcow2", "vhdx"]
        assert disk.info().parent is not None
        # ops work on a chain through the common interface.
        flat = tmp_path / "flat.vhdx"
        convert(disk, flat, "vhdx", "dynamic")
        with open_disk(flat, read_only=True) as copy:
            assert compare(disk, copy) is None
            assert copy.read(0, disk.virtual_size) == data


def test_backing_vhd_raw_and_absolute_names(tmp_path: Path) -> None:
    vhd = tmp_path / "base.vhd"
    make_base(vhd, "vhd")
    over_vhd = tmp_path / "over-vhd.qcow2"
    qemu_create_qcow2(over_vhd, backing=vhd, backing_fmt="vpc")  # an absolute name
    qemu_io_qcow2(over_vhd, *OVERLAY_WRITES)
    check_against_qemu(over_vhd, tmp_path)
    raw = tmp_path / "base.raw"
    make_base(raw, "raw")
    over_raw = tmp_path / "over-raw.qcow2"
    qemu_create_qcow2(over_raw, backing="base.raw", backing_fmt="raw")
    qemu_io_qcow2(over_raw, *OVERLAY_WRITES)
    check_against_qemu(over_raw, tmp_path)
    with open_disk(over_raw, read_only=True) as disk:
        assert disk.parent is not None and disk.parent.format is DiskFormat.RAW


def test_overlay_larger_and_smaller_than_its_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, "vhdx", size=8 * MiB)
    larger = tmp_path / "larger.qcow2"
    qemu_create_qcow2(larger, 20 * MiB, backing="base.vhdx", backing_fmt="vhdx")
    qemu_io_qcow2(larger, "write -P 0x12 7M 2M", "write -P 0x13 19M 4k")
    check_against_qemu(larger, tmp_path)
    smaller = tmp_path / "smaller.qcow2"
    qemu_create_qcow2(smaller, 6 * MiB, backing="base.vhdx", backing_fmt="vhdx")
    qemu_io_qcow2(smaller, "write -P 0x14 1M 4k")
    check_against_qemu(smaller, tmp_path)
    with open_disk(smaller, read_only=True) as disk:
        assert all(off + n <= 6 * MiB for off, n in disk.allocated_ranges())


def test_backing_format_probed_when_the_overlay_names_none(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, "vhdx")
    top = tmp_path / "top.qcow2"
    qemu_create_qcow2(top, backing="base.vhdx", backing_fmt="vhdx")
    qemu_io_qcow2(top, "write -P 0x21 0 64k")
    expected = qemu_chain_raw(top, tmp_path)
    drop_backing_format(top)
    with open_disk(top, read_only=True) as disk:
        assert disk.parent is not None and disk.parent.format is DiskFormat.VHDX
        assert disk.read(0, disk.virtual_size) == expected
        assert disk.info().details["backing_format"] == "(probed)"
    # A raw backing file is never guessed: the overlay must say it is raw.
    raw = tmp_path / "base.raw"
    make_base(raw, "raw")
    over_raw = tmp_path / "over-raw.qcow2"
    qemu_create_qcow2(over_raw, backing="base.raw", backing_fmt="raw")
    drop_backing_format(over_raw)
    with pytest.raises(VirtualDiskError, match="not a VHD, VHDX or qcow2 image") as exc:
        open_disk(over_raw, read_only=True)
    assert exc.value.hint is not None and "-F raw" in exc.value.hint


def drop_backing_format(path: Path) -> None:
    """Turn the backing format header extension into an unknown (ignored) extension."""
    head = read_at(path, 0, 4096)
    at = head.index(struct.pack(">I", qh.EXT_BACKING_FORMAT), 104)
    patch(path, at, struct.pack(">I", 0x7E57_0001))


def test_reads_from_several_threads(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    qemu_create_qcow2(img, SIZE, options="cluster_size=4k")
    qemu_io_qcow2(img, *QEMU_WRITES)
    expected = qemu_chain_raw(img, tmp_path)
    errors: list[BaseException] = []
    with open_disk(img, read_only=True) as disk:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    off = rng.randrange(SIZE)
                    n = rng.randrange(1, min(MiB, SIZE - off) + 1)
                    assert disk.read(off, n) == expected[off : off + n]
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_reads_only_tables_in_use_and_coalesces_contiguous_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "big.qcow2"
    qemu_create_qcow2(img, 64 << 30)  # 64 GiB, 128 possible L2 tables
    qemu_io_qcow2(img, "write -P 0x31 0 4M", "write -P 0x32 40G 64k", "write -z 63G 64k")
    reads: list[tuple[int, int]] = []
    real_pread_exact, real_preadv_exact = fileio.pread_exact, fileio.preadv_exact

    def pread_exact(fd: int, length: int, offset: int, path: Path, what: str) -> bytes:
        reads.append((offset, length))
        return real_pread_exact(fd, length, offset, path, what)

    def preadv_exact(
        fd: int, buffers: list[memoryview], offset: int, path: Path, what: str
    ) -> None:
        reads.append((offset, sum(len(b) for b in buffers)))
        real_preadv_exact(fd, buffers, offset, path, what)

    monkeypatch.setattr(q, "pread_exact", pread_exact)
    monkeypatch.setattr(q, "preadv_exact", preadv_exact)
    with open_disk(img, read_only=True) as disk:
        reads.clear()
        assert list(disk.allocated_ranges()) == [(0, 4 * MiB), (40 << 30, 65536), (63 << 30, 65536)]
        assert len(reads) == 3 and all(n == 65536 for _, n in reads)  # three L2 tables
        reads.clear()
        assert disk.read(0, 4 * MiB) == b"\x31" * (4 * MiB)
        assert reads == [(reads[0][0], 4 * MiB)]  # one read for 64 contiguous clusters


def test_large_sparse_overlay_map(tmp_path: Path) -> None:
    """A 64 GiB image with a few hundred scattered writes: the map equals qemu-img map's and
    every range it holds reads as qemu-img convert's (the whole disk is never read)."""
    img = tmp_path / "sparse.qcow2"
    qemu_create_qcow2(img, 64 << 30)
    rng = random.Random(64)
    writes = []
    for i in range(300):
        off = rng.randrange(64 << 30) // 512 * 512
        n = min(rng.choice([512, 4096, 65536, 200_000]), (64 << 30) - off)
        writes.append((off, n, i % 255 + 1))
    commands = [f"write -P {p} {off} {n}" for off, n, p in writes]
    commands += [f"write -z {rng.randrange(64 << 30) // 65536 * 65536} 65536" for _ in range(20)]
    qemu_io_qcow2(img, *commands)
    top = qemu_top_layer(img)
    with open_disk(img, read_only=True) as disk:
        assert isinstance(disk, Qcow2Disk)
        assert list(disk.allocated_ranges(this_layer_only=True)) == top.allocated
        extents = list(disk.layer_extents())
        assert list(coalesce((o, n) for o, n, z in extents if not z)) == top.data
        assert list(coalesce((o, n) for o, n, z in extents if z)) == top.zero
        # qemu-img writes the guest bytes into a sparse raw file; compare what was written.
        raw = tmp_path / "sparse.raw"
        r = run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
        assert r.returncode == 0, r.stderr
        for off, n in top.allocated:
            assert disk.read(off, n) == read_at(raw, off, n)


# -- format detection, registration, refusals ---------------------------------------------------
def test_detection_and_write_refusals(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"  # qcow2 under a raw-looking name is still qcow2
    qemu_create_qcow2(img, 4 * MiB)
    assert detect_format(img) is DiskFormat.QCOW2
    with pytest.raises(VirtualDiskError, match="does not write qcow2"):
        open_disk(img)
    with pytest.raises(VirtualDiskError, match="does not write qcow2"):
        open_qcow2(img, read_only=False)
    with open_disk(img, read_only=True) as disk:
        with pytest.raises(VirtualDiskError, match="does not write qcow2"):
            disk.write(0, b"x")
        with pytest.raises(VirtualDiskError, match="does not write qcow2"):
            disk.write_zeroes(0, 512)
        assert disk.start_writeback() is False
        disk.flush()
    with pytest.raises(VirtualDiskError, match="does not create qcow2"):
        create_disk(tmp_path / "new.qcow2", format="qcow2", subformat="dynamic", size=MiB)
    with pytest.raises(VirtualDiskError, match="does not create qcow2"):
        convert(img, tmp_path / "out.qcow2", "qcow2", "dynamic")
    assert not (tmp_path / "new.qcow2").exists()


def test_a_fixed_vhd_whose_guest_wrote_a_qcow2_header_stays_a_vhd(tmp_path: Path) -> None:
    """A guest controls sector 0 of a fixed VHD; a qcow2 header there must not be obeyed
    (it could name any host file as its backing file)."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"not for the guest\n" * 100)
    donor = tmp_path / "donor.qcow2"
    qemu_create_qcow2(donor, MiB, backing=secret, backing_fmt="raw")
    header = read_at(donor, 0, 512)
    vhd = tmp_path / "guest.vhd"
    with create_disk(vhd, format="vhd", subformat="fixed", size=4 * MiB) as disk:
        disk.write(0, header)
    assert detect_format(vhd) is DiskFormat.VHD
    with open_disk(vhd, read_only=True) as disk:
        assert disk.format is DiskFormat.VHD and disk.read(0, 512) == header
    # A qcow2 file ending in something that looks like a VHD footer but is not one is refused
    # as ambiguous by detection, and opens when its format is named, or when it is named
    # *.qcow2 (sitepair's own overlays).
    img = tmp_path / "o.qcow2"
    qemu_create_qcow2(img, 4 * MiB)
    qemu_io_qcow2(img, "write -P 0x41 1M 64k")
    tail_at = img.stat().st_size - 512
    patch(img, tail_at, b"conectix")
    assert detect_format(img) is DiskFormat.QCOW2
    unnamed = img.rename(tmp_path / "o.img")
    with pytest.raises(VirtualDiskError, match="ambiguous") as exc:
        detect_format(unnamed)
    assert exc.value.hint is not None and "-f qcow2" in exc.value.hint
    with open_disk(unnamed, read_only=True, format="qcow2") as disk:
        assert disk.read(1 * MiB + 65536 - 512, 8) == b"conectix"


def test_cli_reads_qcow2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.vhd"
    make_base(base, "vhd")
    top = tmp_path / "top.qcow2"
    qemu_create_qcow2(top, backing="base.vhd", backing_fmt="vpc")
    qemu_io_qcow2(top, "write -P 0x61 0 8k")

    def cli(*args: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("info", top)
    assert code == 0 and "qcow2 (differencing)" in out and "parent:" in out
    code, out, _ = cli("info", top, "-f", "qcow2", "--json")
    assert code == 0 and '"dirty": false' in out
    out_file = tmp_path / "bytes"
    assert cli("read", top, "4k", "8k", "--out", out_file)[0] == 0
    assert out_file.read_bytes() == b"\x61" * 4096 + b"\x11" * 4096
    flat = tmp_path / "flat.vhd"
    assert cli("convert", top, flat)[0] == 0
    assert cli("compare", top, flat, "-f", "qcow2")[0] == 0
    code, _, err = cli("write", top, "0", "--pattern", "1", "--length", "1")
    assert code == 2 and "does not write qcow2" in err
    code, _, err = cli("create", tmp_path / "n.vhd", "--size", "1M", "-O", "qcow2")
    assert code == 2 and "invalid choice" in err


def test_merge_of_a_qcow2_overlay_into_its_vhd(tmp_path: Path) -> None:
    """merge writes only the parent: a qcow2 overlay can be committed into its VHD."""
    base = tmp_path / "base.vhd"
    make_base(base, "vhd")
    top = tmp_path / "top.qcow2"
    qemu_create_qcow2(top, backing="base.vhd", backing_fmt="vpc")
    qemu_io_qcow2(top, *OVERLAY_WRITES)
    expected = qemu_chain_raw(top, tmp_path)
    merge(top)
    assert not top.exists()
    with open_disk(base, read_only=True) as disk:
        assert disk.read(0, disk.virtual_size) == expected


# -- property: random writes by qemu-io --------------------------------------------------------
PROPERTY_SIZE = 4 * MiB


@st.composite
def qemu_commands(draw: st.DrawFn) -> list[str]:
    out: list[str] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["write", "write", "zero", "zero -u", "discard"]))
        off = draw(st.integers(0, PROPERTY_SIZE - 1))
        n = draw(st.integers(1, min(PROPERTY_SIZE - off, 300_000)))
        if kind == "write":
            out.append(f"write -P {draw(st.integers(1, 255))} {off} {n}")
        elif kind.startswith("zero"):
            out.append(f"write -z{kind[4:]} {off} {n}")
        else:
            out.append(f"discard {off} {n}")
    return out


def _property(options: str, backing: bool, base_writes: list[str], writes: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        img = folder / "p.qcow2"
        if backing:
            base = folder / "base.vhd"
            with create_disk(base, format="vhd", subformat="dynamic", size=PROPERTY_SIZE) as d:
                d.write(0, b"\x01" * 4096)
            if base_writes:
                qemu_io_qcow2_base(base, base_writes)
            qemu_create_qcow2(img, options=options, backing="base.vhd", backing_fmt="vpc")
        else:
            qemu_create_qcow2(img, PROPERTY_SIZE, options=options)
        qemu_io_qcow2(img, *writes)
        check_against_qemu(img, folder, slices=10)


def qemu_io_qcow2_base(base: Path, commands: list[str]) -> None:
    r = run("qemu-io", "-f", "vpc", *(a for c in commands for a in ("-c", c)), base)
    assert r.returncode == 0, r.stdout + r.stderr


PROPERTY_ARGS = (
    st.sampled_from(
        [
            "",
            "compat=0.10",
            "cluster_size=4k",
            "cluster_size=2M",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "cluster_size=512",
        ]
    ),
    st.booleans(),
    qemu_commands().map(lambda cs: [c for c in cs if c.startswith("write -P")]),
    qemu_commands(),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(*PROPERTY_ARGS)
def test_property_random_qemu_writes(
    options: str, backing: bool, base_writes: list[str], writes: list[str]
) -> None:
    require_qemu()
    _property(options, backing, base_writes, writes)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(*PROPERTY_ARGS)
def test_property_random_qemu_writes_long(
    options: str, backing: bool, base_writes: list[str], writes: list[str]
) -> None:
    require_qemu()
    _property(options, backing, base_writes, writes)


# -- corrupt and hostile images ----------------------------------------------------------------
def make_image(path: Path, options: str = "cluster_size=4k") -> None:
    """A small image with data in its first clusters (an L2 table behind L1 entry 0)."""
    qemu_create_qcow2(path, 8 * MiB, options=options)
    qemu_io_qcow2(path, "write -P 0x5a 0 16k", "write -P 0x6b 1M 4k")


def _truncate_in_l2(p: Path) -> None:
    os.truncate(p, l2_offset(p) + 100)


def _l1_past_eof(p: Path) -> None:
    set_u64(p, 40, (p.stat().st_size // 4096 + 8) * 4096)


def _l2_entry(value: Callable[[Path], int], index: int = 0) -> Callable[[Path], None]:
    return lambda p: set_u64(p, l2_entry_at(p, index), value(p))


def _past_eof(p: Path) -> int:
    return (1 << 63) | ((p.stat().st_size // 4096 + 16) * 4096)


def _unaligned(p: Path) -> int:
    return u64(p, l2_entry_at(p, 0)) + 512


def _incompatible_bit(bit: int) -> Callable[[Path], None]:
    return lambda p: set_u64(p, 72, u64(p, 72) | 1 << bit)


def _seq(*edits: Callable[[Path], object]) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        for e in edits:
            e(p)

    return edit


def _backing_name(name: bytes, fmt: bytes | None = None) -> Callable[[Path], None]:
    """Give the image a backing file name (at byte 2048 of its first cluster)."""

    def edit(p: Path) -> None:
        patch(p, 2048, name)
        set_u64(p, 8, 2048)
        set_u32(p, 16, len(name))
        if fmt is not None:
            ext = struct.pack(">II", qh.EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(8, b"\0")
            length = struct.unpack(">I", read_at(p, 100, 4))[0]
            patch(p, length, ext + bytes(8))

    return edit


CORRUPT: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty file": (lambda p: os.truncate(p, 0), "too short to be a qcow2"),
    "truncated header": (lambda p: os.truncate(p, 90), "too short for a version 3"),
    "truncated in the L1 table": (lambda p: os.truncate(p, l1_offset(p) + 4), "L1 table"),
    "truncated in an L2 table": (_truncate_in_l2, "past the end of the file"),
    "truncated in data": (lambda p: os.truncate(p, p.stat().st_size - 2048), "cut off"),
    "bad magic": (lambda p: patch(p, 0, b"QFI\x00"), "not a qcow2 image"),
    "version 4": (lambda p: set_u32(p, 4, 4), "unsupported qcow2 version 4"),
    "cluster_bits 30": (lambda p: set_u32(p, 20, 30), "cluster_bits 30 is outside 9..21"),
    "cluster_bits 8": (lambda p: set_u32(p, 20, 8), "cluster_bits 8"),
    "huge L1 size": (lambda p: set_u32(p, 36, 0xFFFF_FFFF), "larger than 32 MiB"),
    "L1 too small": (lambda p: set_u64(p, 24, 1 << 40), "too small for the virtual size"),
    "huge size and L1": (
        _seq(lambda p: set_u64(p, 24, 1 << 40), lambda p: set_u32(p, 36, 1 << 20)),
        "runs past the end of the file",
    ),
    "L1 offset beyond EOF": (_l1_past_eof, "runs past the end of the file"),
    "L1 offset unaligned": (lambda p: set_u64(p, 40, l1_offset(p) + 8), "not a cluster boundary"),
    "L1 entry beyond EOF": (
        lambda p: set_u64(p, l1_offset(p), (1 << 63) | (1 << 40)),
        "L1 entry 0 points to an L2 table at file offset 1099511627776, which is past the end",
    ),
    "L1 entry unaligned": (
        lambda p: set_u64(p, l1_offset(p), u64(p, l1_offset(p)) + 512),
        "which is not a cluster boundary",
    ),
    "two L1 entries share a table": (
        lambda p: set_u64(p, l1_offset(p) + 8, u64(p, l1_offset(p))),
        "L1 entries 0 and 1 both point",
    ),
    "L2 entry beyond EOF": (_l2_entry(_past_eof), "past the end of the file"),
    "L2 entry unaligned": (_l2_entry(_unaligned), "not a cluster boundary"),
    "compressed cluster beyond EOF": (
        _l2_entry(lambda p: (1 << 62) | (p.stat().st_size + 4096)),
        "outside the file's data",
    ),
    "compressed cluster with an absurd size": (
        # The largest sector count (x = 62 - (12 - 8) = 58) at a place near the end.
        _l2_entry(lambda p: (1 << 62) | (0xF << 58) | (p.stat().st_size - 1024)),
        "claims 16 sectors, which run past the end of the file",
    ),
    "compressed cluster that is not deflate": (
        _l2_entry(lambda p: (1 << 62) | (1 << 58) | 4096),
        "does not decompress|decompresses to",
    ),
    "unknown incompatible bit": (_incompatible_bit(5), "incompatible features .* bit 5"),
    "corrupt bit": (_incompatible_bit(1), "QEMU marked this image corrupt"),
    "external data file bit": (_incompatible_bit(2), "external data file"),
    "encrypted (AES)": (lambda p: set_u32(p, 32, 1), r"encrypted \(AES\)"),
    "encrypted (LUKS)": (lambda p: set_u32(p, 32, 2), r"encrypted \(LUKS\)"),
    "compression bit without a type": (_incompatible_bit(3), "compression type field is zlib"),
    "unknown compression type": (
        _seq(_incompatible_bit(3), lambda p: patch(p, 104, b"\x07")),
        "unknown compression type 7",
    ),
    "size not a sector multiple": (lambda p: set_u64(p, 24, 8 * MiB - 1), "multiple of 512"),
    "header length not a multiple of 8": (lambda p: set_u32(p, 100, 105), "header length 105"),
    "header extension overflowing": (
        lambda p: patch(p, u32(p, 100), struct.pack(">II", 7, 1 << 30)),
        "claims 1073741824 bytes",
    ),
    "backing name too long": (
        _seq(_backing_name(b"x"), lambda p: set_u32(p, 16, 2000)),
        "backing file name of 2000 bytes",
    ),
    "backing name past the cluster": (
        _seq(_backing_name(b"x"), lambda p: set_u64(p, 8, 4090), lambda p: set_u32(p, 16, 100)),
        "runs past the first cluster",
    ),
    "backing name with NUL": (_backing_name(b"a\0b"), "NUL byte"),
    "missing backing file": (_backing_name(b"gone.vhdx"), "cannot open its backing file 'gone"),
    "protocol backing file": (_backing_name(b"nbd://10.0.0.1/disk"), "names a QEMU protocol"),
    "json backing file": (_backing_name(b'json:{"file": {}}'), "QEMU JSON description"),
    "unsupported backing format": (_backing_name(b"x.vmdk", b"vmdk"), "format 'vmdk'"),
    "backing directory": (_backing_name(b".", b"raw"), "is a directory|not a regular file"),
    "self as backing file": (_backing_name(b"img.qcow2", b"qcow2"), "backing chain loops"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    path = tmp_path_factory.mktemp("pristine") / "img.qcow2"
    make_image(path)
    return path


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_image_is_a_clear_error(tmp_path: Path, pristine: Path, case: str) -> None:
    damage, message = CORRUPT[case]
    img = tmp_path / "img.qcow2"
    shutil.copyfile(pristine, img)
    damage(img)
    with (
        pytest.raises(VirtualDiskError, match=message),
        open_disk(img, read_only=True, format="qcow2") as disk,
    ):
        list(disk.allocated_ranges())
        disk.read(0, disk.virtual_size)


def test_extended_l2_invalid_subcluster_bits(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    qemu_create_qcow2(img, 8 * MiB, options="extended_l2=on")
    qemu_io_qcow2(img, "write -P 1 0 4k", "write -P 2 1M 64k")
    at = l2_entry_at(img, 0, entry_size=16)
    bitmap = u64(img, at + 8)
    set_u64(img, at + 8, bitmap | (bitmap & 0xFFFF_FFFF) << 32)  # allocated and zero
    with (
        pytest.raises(VirtualDiskError, match="both allocated and zero"),
        open_disk(img, read_only=True) as disk,
    ):
        disk.read(0, 4096)
    set_u64(img, at, 0)  # allocated subclusters without a host cluster
    set_u64(img, at + 8, 1)
    with (
        pytest.raises(VirtualDiskError, match="no host offset"),
        open_disk(img, read_only=True) as disk,
    ):
        list(disk.allocated_ranges())


def test_dirty_image_is_read_and_says_so(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    make_image(img)
    expected = qemu_chain_raw(img, tmp_path)
    set_u64(img, 72, u64(img, 72) | 1)
    with open_disk(img, read_only=True) as disk:
        assert isinstance(disk, Qcow2Disk) and disk.dirty
        assert disk.info().details["dirty"] is True
        assert disk.read(0, disk.virtual_size) == expected


def test_backing_chain_that_loops(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_create_qcow2(b, 8 * MiB)
    qemu_create_qcow2(a, backing="b.qcow2", backing_fmt="qcow2")
    r = run("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
    assert r.returncode == 0, r.stderr
    with pytest.raises(VirtualDiskError, match=r"backing chain loops: .*a\.qcow2 -> .*b\.qcow2"):
        open_disk(a, read_only=True)


def test_backing_chain_depth_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "MAX_CHAIN_DEPTH", 4)
    qemu_create_qcow2(tmp_path / "0.qcow2", MiB)
    for i in range(1, 6):
        qemu_create_qcow2(tmp_path / f"{i}.qcow2", backing=f"{i - 1}.qcow2", backing_fmt="qcow2")
    with open_disk(tmp_path / "3.qcow2", read_only=True) as disk:
        assert len(disk.chain()) == 4
    with pytest.raises(VirtualDiskError, match="deeper than 4 layers"):
        open_disk(tmp_path / "5.qcow2", read_only=True)


@pytest.mark.parametrize(("method", "name"), [("aes", "AES"), ("luks", "LUKS")])
def test_encrypted_image_made_by_qemu_is_refused(tmp_path: Path, method: str, name: str) -> None:
    img = tmp_path / "e.qcow2"
    r = run(
        "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
        "-o", f"encrypt.format={method},encrypt.key-secret=s0", img, "1M",
    )  # fmt: skip
    if r.returncode != 0:  # LUKS times its key derivation, which fails in some containers
        pytest.skip(f"this qemu-img cannot make {name} images: {r.stderr.strip()}")
    with pytest.raises(VirtualDiskError, match=rf"encrypted \({name}\)"):
        open_disk(img, read_only=True)


def test_header_parser_units() -> None:
    """parse_header on hand-made headers: the smallest valid ones and each check."""
    v2 = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 0, 0, 16, 1 << 20, 0, 1, 65536, 0, 0, 0, 0)
    h = qh.parse_header(v2, 3 * 65536, "x")
    assert (h.version, h.cluster_size, h.virtual_size, h.l1_entries_needed) == (2, 65536, MiB, 1)
    assert not h.dirty and not h.extended_l2 and h.backing_file is None
    with pytest.raises(VirtualDiskError, match="runs past the end of the file"):
        qh.parse_header(v2, 65536, "x")
    zero_size = v2[:24] + struct.pack(">Q", 0) + v2[32:36] + struct.pack(">I", 0) + v2[40:]
    assert qh.parse_header(zero_size, 72, "x").l1_entries_needed == 0


# -- fuzzing: random damage to the metadata --------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small images whose metadata (header, L1, L2, first data) lies in their first 96 KiB."""
    require_qemu()
    folder = tmp_path_factory.mktemp("fuzz")
    plain, extended, compressed = (folder / f"{k}.qcow2" for k in ("p", "e", "c"))
    make_image(plain)
    make_image(extended, "extended_l2=on,cluster_size=16k")
    raw = folder / "src.raw"
    raw.write_bytes(zlib.compress(bytes(range(256)) * 64) * 40 + bytes(MiB))
    r = run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
            raw, compressed)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"plain": plain, "extended": extended, "compressed": compressed}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["plain", "compressed", "extended"]),
    mutations=st.lists(
        st.tuples(st.integers(0, 96 * 1024), st.integers(0, 255)), min_size=1, max_size=8
    ),
)
def test_fuzz_metadata(
    fuzz_sources: dict[str, Path], kind: str, mutations: list[tuple[int, int]]
) -> None:
    """Random bytes in the header, L1 and L2 tables: a VirtualDiskError or a normal read,
    nothing else."""
    src = fuzz_sources[kind]
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "f.qcow2"
        shutil.copyfile(src, img)
        size = img.stat().st_size
        for at, value in mutations:
            if at < size:
                patch(img, at, bytes([value]))
        try:
            with open_disk(img, read_only=True, format="qcow2") as disk:
                budget = 8 * MiB
                for off, length in disk.allocated_ranges():
                    n = min(length, budget)
                    disk.read(off, n)
                    budget -= n
                    if budget <= 0:
                        break
                disk.read(0, min(disk.virtual_size, MiB))
                disk.info()
        except VirtualDiskError:
            pass


def test_a_guest_planted_vhd_footer_does_not_turn_an_overlay_into_a_vhd(tmp_path: Path) -> None:
    """The last cluster of an overlay can be guest data: a guest that writes a valid VHD footer
    into it must not make sitepair read its overlay as a VHD (whose footer could name any file
    on the host as its parent). Overlays are named *.qcow2 by sitepair."""
    base = tmp_path / "base.vhdx"
    vdisk.create_disk(base, format="vhdx", subformat="dynamic", size=8 << 20).close()
    overlay = tmp_path / "layer.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "vhdx", str(overlay)],
        check=True,
    )
    vhd = tmp_path / "fake.vhd"
    vdisk.create_disk(vhd, format="vhd", subformat="fixed", size=1 << 20).close()
    footer = vhd.read_bytes()[-512:]
    assert vhd_layout.FOOTER_SIZE == 512
    # The guest writes a whole cluster ending with a VHD footer: it lands at the file's end.
    payload = tmp_path / "payload"
    payload.write_bytes(b"\0" * (65536 - 512) + footer)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {payload} 0 64k", str(overlay)],
        check=True,
        capture_output=True,
    )
    assert overlay.read_bytes()[-512:] == footer
    assert vdisk.detect_format(overlay) is vdisk.DiskFormat.QCOW2
    renamed = tmp_path / "layer.img"
    overlay.rename(renamed)
    assert vdisk.detect_format(renamed) is vdisk.DiskFormat.VHD  # why the name matters
