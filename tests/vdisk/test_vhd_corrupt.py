"""Damaged and hostile VHD images: each must fail with a VirtualDiskError that names the
problem (no crash, no hang, no allocation proportional to a claimed size), or, where the
format has a second copy (the footer), be read through it and repaired by a writable open."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import open_disk
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.vhd import VhdDisk, open_vhd, set_parent_vhd
from sitepair.vdisk.vhd_create import create_vhd
from tests.vdisk.helpers import (
    MiB,
    bat_entry,
    bat_offset,
    edit_footers,
    edit_header,
    patch,
    read_at,
    set_bat_entry,
)

SIZE = 8 * MiB


def _dynamic(path: Path, *, blocks: tuple[int, ...] = (0, 1, 3)) -> bytes:
    """A dynamic VHD with data in the given 2 MiB blocks; returns the expected guest bytes."""
    expected = bytearray(SIZE)
    with create_vhd(path, size=SIZE, subformat="dynamic") as disk:
        for b in blocks:
            data = bytes([b + 1]) * 5000
            disk.write(b * 2 * MiB + 100, data)
            expected[b * 2 * MiB + 100 : b * 2 * MiB + 5100] = data
    return bytes(expected)


def _fails(path: Path, match: str, *, read_only: bool = True) -> VirtualDiskError:
    with pytest.raises(VirtualDiskError, match=match) as info:
        open_vhd(path, read_only=read_only).close()
    assert str(path) in str(info.value)
    return info.value


# -- truncation ------------------------------------------------------------------------------
def test_tiny_file(tmp_path: Path) -> None:
    img = tmp_path / "tiny.vhd"
    img.write_bytes(b"conectix" + bytes(92))
    _fails(img, "too small to be a VHD")


def test_truncated_in_the_bat(tmp_path: Path) -> None:
    img = tmp_path / "t.vhd"
    _dynamic(img)
    os.truncate(img, bat_offset(img) + 8)
    _fails(img, "BAT .* extends beyond the end of the file")


def test_truncated_in_the_last_block(tmp_path: Path) -> None:
    """The end footer is gone, so the copy at 0 is used; the BAT then points past the end."""
    img = tmp_path / "t.vhd"
    _dynamic(img)
    os.truncate(img, img.stat().st_size - 512 - 4096)
    _fails(img, r"BAT entry 3 points beyond the end of the file")


def test_truncated_fixed_disk(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    create_vhd(img, size=SIZE, subformat="fixed").close()
    footer = read_at(img, SIZE, 512)
    os.truncate(img, SIZE - 4096)
    patch(img, SIZE - 4096, footer)  # the footer survives, the data area is short
    _fails(img, "truncated fixed VHD")


# -- checksums and the footer copy -------------------------------------------------------------
def test_bad_footer_checksum_on_fixed_disk(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    create_vhd(img, size=SIZE, subformat="fixed").close()
    patch(img, SIZE + 48, b"\x00\x00\x00\x01")  # current size, checksum not fixed
    _fails(img, r"footer at the end of the file: bad checksum")


def test_damaged_end_footer_reads_through_copy_and_is_repaired(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    expected = _dynamic(img)
    end = img.stat().st_size - 512
    patch(img, end + 30, b"XX")  # creator application, checksum now wrong
    with open_vhd(img, read_only=True) as disk:
        assert disk.read(0, SIZE) == expected
        note = str(disk.info().details["footer"])
        assert "damaged" in note and "copy at offset 0" in note
    with open_vhd(img) as disk:  # writable: repairs
        assert "rewrote the damaged footer" in " ".join(disk.info().details["repaired"])  # type: ignore[arg-type]
    assert read_at(img, img.stat().st_size - 512, 512) == read_at(img, 0, 512)
    with open_vhd(img, read_only=True) as disk:
        assert disk.info().details["footer"] == "end of file"
        assert disk.read(0, SIZE) == expected


def test_damaged_footer_copy_is_repaired(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    expected = _dynamic(img)
    patch(img, 70, b"\xff\xff")
    with open_vhd(img, read_only=True) as disk:
        assert "damaged" in str(disk.info().details["footer_copy"])
        assert disk.read(0, SIZE) == expected
    open_vhd(img).close()
    assert read_at(img, 0, 512) == read_at(img, img.stat().st_size - 512, 512)


def test_both_footers_bad(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    patch(img, 70, b"\xff\xff")
    patch(img, img.stat().st_size - 512 + 70, b"\xff\xff")
    err = _fails(img, "footer at the end of the file: bad checksum")
    assert "footer copy at offset 0: bad checksum" in str(err)


def test_no_footer_at_all(tmp_path: Path) -> None:
    img = tmp_path / "junk.vhd"
    img.write_bytes(os.urandom(64 * 1024))
    _fails(img, "not a VHD image")


def test_bad_dynamic_header_checksum(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_header(img, 32, struct.pack(">I", 4 * MiB), fix_checksum=False)
    _fails(img, "dynamic disk header: bad checksum")


# -- the BAT ---------------------------------------------------------------------------------
def test_bat_entry_beyond_end_of_file(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    set_bat_entry(img, 2, img.stat().st_size // 512 + 100)
    _fails(img, r"BAT entry 2 points beyond the end of the file")


def test_overlapping_blocks(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    set_bat_entry(img, 3, bat_entry(img, 1) + 8)
    _fails(img, r"BAT entries 1 and 3 overlap")


def test_block_over_metadata(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    set_bat_entry(img, 2, bat_offset(img) // 512)
    _fails(img, r"BAT entry 2 .* overlaps the BAT")


# -- absurd sizes -------------------------------------------------------------------------------
def test_absurd_virtual_size(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_footers(img, 48, struct.pack(">Q", 1 << 60))
    _fails(img, "exceeds the VHD maximum of 2040 GiB")


def test_virtual_size_not_sector_multiple(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_footers(img, 48, struct.pack(">Q", SIZE + 7))
    _fails(img, "not a multiple of 512")


def test_huge_bat_claim_allocates_nothing(tmp_path: Path) -> None:
    """2000 GiB in 512-byte blocks would be a 16 GiB BAT: refused before reading it."""
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_footers(img, 48, struct.pack(">Q", 2000 << 30))
    edit_header(img, 28, struct.pack(">II", 0xFFFFFFFF, 512))
    _fails(img, "larger than this implementation supports")
    edit_header(img, 28, struct.pack(">II", 0xFFFFFFFF, 2 * MiB))
    _fails(img, r"the BAT \(4294967295 entries .*\) extends beyond the end of the file")


def test_bat_too_small_for_size(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_header(img, 28, struct.pack(">I", 2))
    _fails(img, "the BAT has 2 entries, too few")


def test_block_size_not_power_of_two(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_header(img, 32, struct.pack(">I", 3 * MiB))
    _fails(img, "block size 3145728 is not a power of two")


def test_unknown_disk_type(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    _dynamic(img)
    edit_footers(img, 60, struct.pack(">I", 9))
    _fails(img, "unsupported disk type 9")


def test_create_refuses_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(VirtualDiskError, match="positive multiple of 512"):
        create_vhd(tmp_path / "a.vhd", size=1000, subformat="dynamic")
    with pytest.raises(VirtualDiskError, match="2040 GiB"):
        create_vhd(tmp_path / "b.vhd", size=4 << 40, subformat="dynamic")
    with pytest.raises(VirtualDiskError, match="not a power of two"):
        create_vhd(tmp_path / "c.vhd", size=SIZE, subformat="dynamic", block_size=3000)
    assert not list(tmp_path.iterdir())


# -- parents ---------------------------------------------------------------------------------
def _chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.avhd", tmp_path / "top.avhd"
    _dynamic(base)
    create_vhd(mid, size=None, subformat="differencing", parent=base).close()
    create_vhd(top, size=None, subformat="differencing", parent=mid).close()
    return base, mid, top


def _force_parent(child: Path, parent: Path) -> None:
    """Point ``child`` at ``parent`` bypassing the checks set_parent_vhd makes (as a foreign
    tool or a damaged file could), to see that opening still fails cleanly."""
    fd = os.open(parent, os.O_RDONLY)
    with VhdDisk(parent, fd, read_only=True, chain=(), open_parent=False) as p:
        pid = p.identity
    fd = os.open(child, os.O_RDWR)
    with VhdDisk(child, fd, read_only=False, chain=(), open_parent=False) as disk:
        disk._relink(parent, pid, SIZE)


def test_parent_loop(tmp_path: Path) -> None:
    _base, mid, top = _chain(tmp_path)
    with pytest.raises(VirtualDiskError, match="parent loop"):
        set_parent_vhd(mid, top)  # refused up front
    _force_parent(mid, top)
    err = _fails(top, "parent loop")
    assert "mid.avhd -> " in str(err)
    _fails(mid, "parent loop")


def test_self_parent(tmp_path: Path) -> None:
    _base, mid, _top = _chain(tmp_path)
    with pytest.raises(VirtualDiskError, match="its own parent"):
        set_parent_vhd(mid, mid)
    _force_parent(mid, mid)
    _fails(mid, "parent loop")


def test_missing_parent(tmp_path: Path) -> None:
    base, _mid, top = _chain(tmp_path)
    base.unlink()
    err = _fails(top, "parent not found; tried W2ru")
    assert "base.vhd" in str(err)


def test_parent_id_mismatch(tmp_path: Path) -> None:
    base, mid, _top = _chain(tmp_path)
    base.unlink()
    _dynamic(base)  # same name and size, different disk
    _fails(mid, "parent id mismatch")


def test_parent_size_mismatch(tmp_path: Path) -> None:
    base, mid, _top = _chain(tmp_path)
    other = tmp_path / "small.vhd"
    create_vhd(other, size=SIZE // 2, subformat="dynamic").close()
    with pytest.raises(VirtualDiskError, match="differs from the new parent"):
        set_parent_vhd(mid, other)
    assert base.exists()


def test_relink_after_move(tmp_path: Path) -> None:
    """Moving the parent breaks the link (clear error); set_parent_vhd repairs it."""
    base, mid, top = _chain(tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    base.rename(moved / "base.vhd")
    _fails(top, "parent not found")
    set_parent_vhd(mid, moved / "base.vhd")
    with open_disk(top, read_only=True) as t:
        assert t.chain()[-1].path == moved / "base.vhd"


# -- fuzzing ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_fuzz_footer_parser(buf: bytes) -> None:
    with contextlib.suppress(VirtualDiskError):
        L.parse_footer(buf, "fuzz")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1024, max_size=1024), st.booleans())
def test_fuzz_header_parser(buf: bytes, fix: bool) -> None:
    raw = bytearray(L.HEADER_COOKIE + buf[8:]) if fix else bytearray(buf)
    if fix:
        struct.pack_into(">I", raw, 36, L.checksum(raw, 36))
    with contextlib.suppress(VirtualDiskError):
        L.parse_dynamic_header(bytes(raw), "fuzz")


_TEMPLATE: dict[str, bytes] = {}


def _template(tmp: Path) -> bytes:
    """A small differencing-free dynamic image with data, built once."""
    if "img" not in _TEMPLATE:
        img = tmp / "template.vhd"
        with create_vhd(img, size=256 * 1024, subformat="dynamic", block_size=16 * 1024) as d:
            for i in (0, 3, 7, 15):
                d.write(i * 16 * 1024 + 300, bytes([i + 1]) * 900)
        _TEMPLATE["img"] = img.read_bytes()
        img.unlink()
    return _TEMPLATE["img"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(
            # Mostly the fields: footer copy, dynamic header, BAT; sometimes anywhere.
            st.one_of(
                st.integers(0, 99),
                st.integers(512, 512 + 63),
                st.integers(1536, 1536 + 63),
                st.integers(0, 4095),
            ),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
    tail_edit=st.one_of(
        st.none(), st.tuples(st.integers(0, 511), st.binary(min_size=1, max_size=8))
    ),
    fix_checksums=st.booleans(),
)
def test_fuzz_image_metadata(
    tmp_path: Path,
    edits: list[tuple[int, bytes]],
    tail_edit: tuple[int, bytes] | None,
    fix_checksums: bool,
) -> None:
    """Random edits of the footer copy, header and BAT (and the end footer), optionally with
    valid checksums so the edits reach the deeper checks: opening either works (and reading
    is bounded and consistent) or raises VirtualDiskError."""
    image = bytearray(_template(tmp_path))
    for at, data in edits:
        image[at : at + len(data)] = data
    if tail_edit is not None:
        at, data = tail_edit
        base = len(image) - 512
        image[base + at : base + at + len(data)] = data[: 512 - at]
    if fix_checksums:
        for base in (0, len(image) - 512):
            struct.pack_into(">I", image, base + 64, L.checksum(image[base : base + 512], 64))
        header = image[512:1536]
        struct.pack_into(">I", image, 512 + 36, L.checksum(header, 36))
    img = tmp_path / "fuzz.vhd"
    img.write_bytes(bytes(image))
    try:
        with open_vhd(img, read_only=True) as disk:
            size = disk.virtual_size
            for off, length in list(disk.allocated_ranges())[:64]:
                disk.read(off, min(length, 1 << 20))
            disk.read(0, min(size, 65536))
            disk.read(max(0, size - 4096), min(size, 4096))
            disk.info()
    except VirtualDiskError:
        pass
    finally:
        img.unlink()
