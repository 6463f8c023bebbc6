"""Property tests: random sequences of writes, zeroing, flushes, close/reopen and (for VHD)
differencing-child creation, checked against a bytearray model of the guest disk."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitepair.vdisk import VirtualDisk, create_disk, open_disk

KiB = 1024
#: VDISK_PROPERTY_EXAMPLES=2000 runs a thorough pass; the default keeps the suite quick.
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("VDISK_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_PATTERN = bytes(range(256)) * 2


def _data(seed: int, length: int) -> bytes:
    """Position-dependent bytes, so data landing at the wrong offset is noticed."""
    start = seed % 256
    block = _PATTERN[start : start + 256]
    return (block * (length // 256 + 1))[:length]


@st.composite
def operations(draw: st.DrawFn, size: int, *, children: bool) -> list[tuple[object, ...]]:
    kinds = ["write", "write", "write", "zero", "flush", "reopen", "read"]
    if children:
        kinds.append("child")
    ops: list[tuple[object, ...]] = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("write", "zero", "read"):
            off = draw(st.integers(0, size - 1))
            length = draw(st.integers(1, min(size - off, 70 * KiB)))
            if kind == "write":
                ops.append((kind, off, length, draw(st.integers(0, 255))))
            else:
                ops.append((kind, off, length))
        else:
            ops.append((kind,))
    return ops


def _check_ranges(disk: VirtualDisk, model: bytearray) -> None:
    """Every non-zero byte lies inside allocated_ranges (outside reads as zeros)."""
    pos = 0
    for off, length in disk.allocated_ranges():
        assert off >= pos and length > 0
        assert not any(model[pos:off])
        pos = off + length
    assert pos <= len(model)
    assert not any(model[pos:])


def _run(
    folder: Path,
    fmt: str,
    subformat: str,
    size: int,
    block_size: int | None,
    ops: list[tuple[object, ...]],
) -> None:
    ext = {"vhd": ".vhd", "raw": ".raw", "vhdx": ".vhdx"}[fmt]
    names = (folder / f"layer{i}{ext}" for i in itertools.count())
    path = next(names)
    model = bytearray(size)
    disk = create_disk(path, format=fmt, subformat=subformat, size=size, block_size=block_size)
    try:
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, off, length, seed = op
                assert isinstance(off, int) and isinstance(length, int) and isinstance(seed, int)
                data = _data(seed, length) if seed else bytes(length)
                disk.write(off, data)
                model[off : off + length] = data
            elif kind == "zero":
                _, off, length = op
                assert isinstance(off, int) and isinstance(length, int)
                disk.write_zeroes(off, length)
                model[off : off + length] = bytes(length)
            elif kind == "read":
                _, off, length = op
                assert isinstance(off, int) and isinstance(length, int)
                assert disk.read(off, length) == model[off : off + length]
            elif kind == "flush":
                disk.flush()
            elif kind == "reopen":
                disk.close()
                disk = open_disk(path)
            elif kind == "child":
                disk.close()
                parent, path = path, next(names)
                disk = create_disk(path, format=fmt, subformat="differencing", parent=parent)
        assert disk.read(0, size) == model
        _check_ranges(disk, model)
    finally:
        disk.close()
    with open_disk(path, read_only=True) as again:
        assert again.virtual_size == size
        assert again.read(0, size) == model
        _check_ranges(again, model)


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    size=st.sampled_from([64 * KiB, 100 * KiB + 512, 1024 * KiB + 1536]),
    block_size=st.sampled_from([512, 2 * KiB, 4 * KiB, 16 * KiB, 64 * KiB]),
)
def test_vhd_dynamic_and_differencing_match_model(
    data: st.DataObject, size: int, block_size: int
) -> None:
    ops = data.draw(operations(size, children=True))
    with tempfile.TemporaryDirectory() as folder:
        _run(Path(folder), "vhd", "dynamic", size, block_size, ops)


@PROPERTY_SETTINGS
@given(data=st.data(), size=st.sampled_from([64 * KiB, 300 * KiB + 512]))
def test_vhd_fixed_base_with_children_matches_model(data: st.DataObject, size: int) -> None:
    ops = data.draw(operations(size, children=True))
    with tempfile.TemporaryDirectory() as folder:
        _run(Path(folder), "vhd", "fixed", size, None, ops)


@PROPERTY_SETTINGS
@given(data=st.data(), size=st.sampled_from([64 * KiB, 300 * KiB + 77]))
def test_raw_matches_model(data: st.DataObject, size: int) -> None:
    ops = data.draw(operations(size, children=False))
    with tempfile.TemporaryDirectory() as folder:
        _run(Path(folder), "raw", "fixed", size, None, ops)


@pytest.mark.slow
@settings(PROPERTY_SETTINGS, max_examples=1500)
@given(
    data=st.data(),
    fmt_sub=st.sampled_from([("vhd", "dynamic"), ("vhd", "fixed"), ("raw", "fixed")]),
    size=st.sampled_from([64 * KiB, 100 * KiB + 512, 1024 * KiB + 1536]),
    block_size=st.sampled_from([512, 4 * KiB, 16 * KiB, 64 * KiB, 2048 * KiB]),
)
def test_thorough_all_formats_match_model(
    data: st.DataObject, fmt_sub: tuple[str, str], size: int, block_size: int
) -> None:
    """The same properties with many more examples, block sizes down to one sector, and
    images up to 1 MiB (``make test-slow``)."""
    fmt, sub = fmt_sub
    ops = data.draw(operations(size, children=fmt == "vhd"))
    with tempfile.TemporaryDirectory() as folder:
        _run(Path(folder), fmt, sub, size, block_size if sub == "dynamic" else None, ops)
