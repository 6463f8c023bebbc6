"""Hypothesis: random writes, zero writes, flushes, reopens and child creation against a model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitepair.vdisk.base import SubFormat, VirtualDisk
from sitepair.vdisk.vhdx import open_vhdx
from sitepair.vdisk.vhdx_create import create_vhdx

MiB = 1 << 20
SIZE = 6 * MiB + 3 * 512  # not a multiple of the block size: a short last block

offsets = st.integers(0, SIZE - 1)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 3 * MiB), st.integers(0, 255)),
        st.tuples(st.just("zero"), offsets, st.integers(1, 3 * MiB), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("child"), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=14,
)


def check(disk: VirtualDisk, model: bytearray) -> None:
    assert disk.read(0, SIZE) == bytes(model)
    covered = bytearray(SIZE)
    for off, n in disk.allocated_ranges():
        covered[off : off + n] = model[off : off + n]
    assert covered == model


def run_program(subformat: SubFormat, program: list[tuple[str, int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = bytearray(SIZE)
        top = d / "disk0.vhdx"
        base_format = SubFormat.DYNAMIC if subformat == SubFormat.DIFFERENCING else subformat
        disk = create_vhdx(top, size=SIZE, subformat=base_format, block_size=MiB)
        if subformat == SubFormat.DIFFERENCING:
            disk.write(0, bytes(range(256)) * (SIZE // 256))
            model[: SIZE // 256 * 256] = bytes(range(256)) * (SIZE // 256)
            disk.close()
            top = d / "disk1.avhdx"
            disk = create_vhdx(
                top, size=0, subformat=SubFormat.DIFFERENCING, parent=d / "disk0.vhdx"
            )
        layers = 1
        try:
            for kind, off, length, value in program:
                n = min(length, SIZE - off)
                if kind == "write":
                    disk.write(off, bytes([value]) * n)
                    model[off : off + n] = bytes([value]) * n
                elif kind == "zero":
                    disk.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                elif kind == "flush":
                    disk.flush()
                elif kind == "reopen":
                    disk.close()
                    disk = open_vhdx(top)
                    check(disk, model)
                elif kind == "child" and layers < 4:
                    disk.close()
                    parent, top = top, d / f"disk{layers + 5}.avhdx"
                    disk = create_vhdx(
                        top, size=0, subformat=SubFormat.DIFFERENCING, block_size=MiB, parent=parent
                    )
                    layers += 1
            check(disk, model)
        finally:
            disk.close()
        with open_vhdx(top, read_only=True) as ro:
            check(ro, model)


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(ops)
def test_dynamic_matches_model(program: list[tuple[str, int, int, int]]) -> None:
    run_program(SubFormat.DYNAMIC, program)


@SETTINGS
@given(ops)
def test_fixed_matches_model(program: list[tuple[str, int, int, int]]) -> None:
    run_program(SubFormat.FIXED, program)


@SETTINGS
@given(ops)
def test_differencing_matches_model(program: list[tuple[str, int, int, int]]) -> None:
    run_program(SubFormat.DIFFERENCING, program)


def test_allocated_ranges_on_a_sparse_1_tib_disk(tmp_path: Path) -> None:
    """1 TiB, 1% of the 32 MiB blocks written: exact ranges straight from the BAT (the time it
    takes is measured by bench/vdisk.py, not asserted here)."""
    import random

    size = 1 << 40
    path = tmp_path / "sparse.vhdx"
    disk = create_vhdx(path, size=size, subformat=SubFormat.DYNAMIC)
    bs = disk.block_size
    blocks = sorted(random.Random(5).sample(range(size // bs), size // bs // 100))
    for b in blocks:
        disk.write(b * bs + 4096, b"x" * 4096)
    disk.close()
    with open_vhdx(path, read_only=True) as d:
        covered = [b for off, n in d.allocated_ranges() for b in range(off // bs, (off + n) // bs)]
        assert covered == blocks
        assert d.info().details["payload_block_states"] == {
            "not_present": size // bs - len(blocks),
            "fully_present": len(blocks),
        }
