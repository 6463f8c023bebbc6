"""Generic operations across formats: convert between every pair, compare, merge (with
relinking, chains of depth 3 and more), flatten and digest."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import blake3
import pytest

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import VirtualDisk, create_disk, detect_format, open_disk
from sitepair.vdisk.ops import compare, convert, digest, flatten, merge
from tests.vdisk.helpers import MiB, qemu_compare_raw, require_qemu

SIZE = 12 * MiB
EXT = {"raw": ".raw", "vhd": ".vhd", "vhdx": ".vhdx"}
KINDS = [
    ("raw", "fixed"),
    ("vhd", "fixed"),
    ("vhd", "dynamic"),
    ("vhdx", "fixed"),
    ("vhdx", "dynamic"),
]


def _params() -> list[object]:
    return [pytest.param(f, s, id=f"{f}-{s}") for f, s in KINDS]


@pytest.mark.parametrize(
    ("fmt", "module"),
    [
        ("raw", "sitepair.vdisk.raw"),
        ("vhd", "sitepair.vdisk.vhd_create"),
        ("vhdx", "sitepair.vdisk.vhdx_create"),
    ],
)
def test_create_fails_cleanly_when_its_folder_cannot_be_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, module: str
) -> None:
    """An image whose folder entry cannot be made durable is not reported as created: the
    error reaches the caller and the half-made file is gone (VHDX used to ignore the error)."""

    def fail(folder: Path) -> None:
        raise OSError(errno.EIO, "simulated I/O error", str(folder))

    monkeypatch.setattr(f"{module}.fsync_dir", fail)
    path = tmp_path / f"new{EXT[fmt]}"
    sub = "fixed" if fmt == "raw" else "dynamic"
    with pytest.raises((OSError, VirtualDiskError), match="simulated I/O error"):
        create_disk(path, format=fmt, subformat=sub, size=SIZE)
    assert not path.exists()


def _fill(disk: VirtualDisk, seed: int, count: int = 12) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.choice([1, 512, 5000, 300_000])
        off = rng.randrange(0, disk.virtual_size - n)
        disk.write(off, rng.randbytes(n))


def _image(folder: Path, name: str, fmt: str, sub: str, seed: int) -> Path:
    path = folder / (name + EXT[fmt])
    block = {"vhd": 512 * 1024, "vhdx": 1 * MiB}.get(fmt) if sub == "dynamic" else None
    with create_disk(path, format=fmt, subformat=sub, size=SIZE, block_size=block) as disk:
        _fill(disk, seed)
    return path


def _all(path: Path) -> bytes:
    with open_disk(path, read_only=True) as disk:
        return disk.read(0, disk.virtual_size)


@pytest.mark.parametrize(("src_fmt", "src_sub"), _params())
@pytest.mark.parametrize(("dst_fmt", "dst_sub"), _params())
def test_convert_between_every_pair(
    tmp_path: Path, src_fmt: str, src_sub: str, dst_fmt: str, dst_sub: str
) -> None:
    src = _image(tmp_path, "src", src_fmt, src_sub, seed=1)
    dst = tmp_path / ("dst" + EXT[dst_fmt])
    convert(src, dst, dst_fmt, dst_sub)
    assert detect_format(dst) == (None if dst_fmt == "raw" else dst_fmt)
    with open_disk(src, read_only=True) as a, open_disk(dst, read_only=True) as b:
        assert b.virtual_size == SIZE
        assert (b.format, b.subformat) == (dst_fmt, dst_sub)
        assert compare(a, b) is None
        assert a.read(0, SIZE) == b.read(0, SIZE)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_convert_output_checked_by_qemu(tmp_path: Path) -> None:
    require_qemu()
    src = _image(tmp_path, "src", "vhd", "dynamic", seed=4)
    expected = _all(src)
    for fmt, qfmt in (("vhd", "vpc"), ("raw", "raw"), ("vhdx", "vhdx")):
        out = tmp_path / ("out" + EXT[fmt])
        convert(src, out, fmt, "dynamic" if fmt != "raw" else "fixed")
        qemu_compare_raw(out, expected, tmp_path, fmt=qfmt)


def test_convert_differencing_chain_flattens(tmp_path: Path) -> None:
    base = _image(tmp_path, "base", "vhd", "dynamic", seed=5)
    child = tmp_path / "child.avhd"
    with create_disk(child, format="vhd", subformat="differencing", parent=base) as disk:
        _fill(disk, 6)
    expected = _all(child)
    flat = tmp_path / "flat.vhd"
    flatten(child, flat)
    with open_disk(flat, read_only=True) as disk:
        assert disk.parent is None and disk.subformat == "dynamic"
        assert disk.read(0, SIZE) == expected


def test_convert_refuses_existing_destination(tmp_path: Path) -> None:
    src = _image(tmp_path, "src", "vhd", "dynamic", seed=1)
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"keep me")
    with pytest.raises(VirtualDiskError, match="already exists"):
        convert(src, dst, "raw", "fixed")
    assert dst.read_bytes() == b"keep me"


def test_convert_copies_only_allocated_data(tmp_path: Path) -> None:
    """A 1 TiB sparse disk with one written block converts in no time and stays sparse."""
    src = tmp_path / "big.vhd"
    with create_disk(src, format="vhd", subformat="dynamic", size=1 << 40) as disk:
        disk.write((1 << 39) + 12345, b"needle")
    dst = tmp_path / "big.raw"
    convert(src, dst, "raw", "fixed")
    assert dst.stat().st_size == 1 << 40
    assert dst.stat().st_blocks * 512 < 16 * MiB
    with open_disk(dst, read_only=True) as disk:
        assert disk.read((1 << 39) + 12345, 6) == b"needle"


# -- compare ----------------------------------------------------------------------------------
def test_compare_reports_first_difference(tmp_path: Path) -> None:
    a = _image(tmp_path, "a", "vhd", "dynamic", seed=9)
    b = tmp_path / "b.raw"
    convert(a, b, "raw", "fixed")
    with open_disk(a, read_only=True) as da, open_disk(b, read_only=True) as db:
        assert compare(da, db) is None
    with open_disk(b) as db:
        old = db.read(7 * MiB + 3, 1)
        db.write(7 * MiB + 3, bytes([old[0] ^ 0xFF]))
        db.write(9 * MiB, b"\x01")
    with open_disk(a, read_only=True) as da, open_disk(b, read_only=True) as db:
        assert compare(da, db) == 7 * MiB + 3
        assert compare(db, da) == 7 * MiB + 3


def test_compare_different_sizes(tmp_path: Path) -> None:
    small = tmp_path / "small.raw"
    big = tmp_path / "big.vhd"
    create_disk(small, format="raw", subformat="fixed", size=4 * MiB).close()
    with create_disk(big, format="vhd", subformat="dynamic", size=8 * MiB) as disk:
        disk.write(6 * MiB, bytes(4096))  # zeros beyond the smaller disk: still equal
    with open_disk(small, read_only=True) as s, open_disk(big, read_only=True) as b:
        assert compare(s, b) is None
    with open_disk(big) as disk:
        disk.write(6 * MiB + 100, b"\x07")
    with open_disk(small, read_only=True) as s, open_disk(big, read_only=True) as b:
        assert compare(s, b) == 6 * MiB + 100
        assert compare(b, s) == 6 * MiB + 100


# -- merge ------------------------------------------------------------------------------------
def _chain(folder: Path, fmt: str, depth: int) -> list[Path]:
    """base <- c1 <- ... <- c{depth-1}, each layer written."""
    ext = EXT[fmt]
    paths = [folder / f"base{ext}"]
    with create_disk(paths[0], format=fmt, subformat="dynamic", size=SIZE) as disk:
        _fill(disk, 100)
    for i in range(1, depth):
        path = folder / f"c{i}.a{ext[1:]}"
        with create_disk(path, format=fmt, subformat="differencing", parent=paths[-1]) as disk:
            _fill(disk, 100 + i)
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_merge_chain_with_relink(tmp_path: Path, fmt: str) -> None:
    base, c1, c2, c3 = _chain(tmp_path, fmt, 4)
    top = _all(c3)
    mid = _all(c2)
    merge(c2, relink=[c3])
    assert not c2.exists()
    assert _all(c3) == top
    with open_disk(c3, read_only=True) as disk:
        assert [layer.path.name for layer in disk.chain()] == [c3.name, c1.name, base.name]
    assert _all(c1) == mid  # the parent now holds the merged layer
    merge(c1, relink=[c3])
    assert _all(c3) == top
    with open_disk(c3, read_only=True) as disk:
        assert len(disk.chain()) == 2
    merge(c3)
    assert _all(base) == top
    with open_disk(base, read_only=True) as disk:
        assert disk.parent is None


def test_merge_relinks_several_children(tmp_path: Path) -> None:
    base, c1 = _chain(tmp_path, "vhd", 2)
    kids = []
    for i in range(2):
        kid = tmp_path / f"kid{i}.avhd"
        with create_disk(kid, format="vhd", subformat="differencing", parent=c1) as disk:
            _fill(disk, 200 + i)
        kids.append((kid, _all(kid)))
    merge(c1, relink=[k for k, _ in kids])
    for kid, expected in kids:
        assert _all(kid) == expected
        with open_disk(kid, read_only=True) as disk:
            assert disk.parent is not None and disk.parent.path.name == base.name


def test_merge_interrupted_after_writing_parent_finishes_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the parent was written but before the relinks: the merged disk and its
    children still read as before (only the parent changed, as a merge intends), and running
    merge again completes."""
    base, c1, c2, c3 = _chain(tmp_path, "vhd", 4)
    kid = tmp_path / "kid.avhd"
    with create_disk(kid, format="vhd", subformat="differencing", parent=c2) as disk:
        _fill(disk, 300)
    before = {p: _all(p) for p in (c2, c3, kid)}
    import sitepair.vdisk.ops as ops

    calls: list[Path] = []

    def crash_after_first(child: Path, new_parent: Path) -> None:
        if calls:
            raise KeyboardInterrupt("simulated crash")
        calls.append(child)
        from sitepair.vdisk import set_parent

        set_parent(child, new_parent)

    monkeypatch.setattr(ops, "set_parent", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        merge(c2, relink=[c3, kid])
    monkeypatch.undo()
    assert c2.exists()
    for path, data in before.items():
        assert _all(path) == data, path
    merge(c2, relink=[c3, kid])  # c3 is already relinked: accepted
    assert not c2.exists()
    for path in (c3, kid):
        assert _all(path) == before[path]
        with open_disk(path, read_only=True) as disk:
            assert disk.parent is not None and disk.parent.path.name == c1.name
    assert _all(c1) == before[c2]
    assert _all(base) != before[c2]


def test_merge_refuses_unrelated_relink(tmp_path: Path) -> None:
    base, c1, c2 = _chain(tmp_path, "vhd", 3)
    with pytest.raises(VirtualDiskError, match="cannot relink the merged disk or its parent"):
        merge(c2, relink=[c1])
    stranger = tmp_path / "stranger.avhd"
    create_disk(stranger, format="vhd", subformat="differencing", parent=base).close()
    with pytest.raises(VirtualDiskError, match=r"its parent is .*base.vhd, not .*refusing"):
        merge(c2, relink=[stranger])
    with pytest.raises(VirtualDiskError, match="not a differencing disk"):
        merge(base)
    assert c2.exists()


# -- digest -----------------------------------------------------------------------------------
def test_digest_matches_blake3_of_each_block(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    size = 5 * MiB + 512
    with create_disk(path, format="vhd", subformat="dynamic", size=size) as disk:
        disk.write(MiB + 17, b"x" * 3000)
        disk.write(size - 100, b"y" * 100)
    bs = 1 * MiB
    with open_disk(path, read_only=True) as disk:
        got = digest(disk, bs)
        data = disk.read(0, size)
    want = [blake3.blake3(data[i : i + bs]).digest() for i in range(0, size, bs)]
    assert got == want
    assert len(got) == 6
