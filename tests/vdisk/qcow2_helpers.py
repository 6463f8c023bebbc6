"""Helpers for the qcow2 tests: qemu-img and qemu-io as the oracle (images made and written by
QEMU, the top layer's allocation from ``qemu-img map``, the chain's guest bytes from
``qemu-img convert``), and small tools to damage a qcow2 header or table on purpose."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

from sitepair.vdisk.base import coalesce
from tests.vdisk.helpers import qemu_io, qemu_raw, read_at, require_qemu, run

MiB = 1 << 20
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def qemu_create_qcow2(
    path: Path,
    size: int | None = None,
    *,
    options: str = "",
    backing: str | Path | None = None,
    backing_fmt: str | None = None,
) -> None:
    """``qemu-img create -f qcow2``; ``backing`` is stored as given (a bare name is relative to
    the overlay's folder), ``size`` defaults to the backing file's."""
    require_qemu()
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", str(backing)]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    args.append(path)
    if size is not None:
        args.append(str(size))
    r = run(*args)
    assert r.returncode == 0, r.stderr


def qemu_io_qcow2(path: Path, *commands: str) -> None:
    """Run qemu-io commands on a qcow2 image (its backing chain opened by QEMU)."""
    qemu_io(path, *commands, fmt="qcow2")


def qemu_chain_raw(path: Path, tmp: Path) -> bytes:
    """The guest bytes of ``path`` and its backing chain, as ``qemu-img convert -O raw``."""
    return qemu_raw(path, tmp, fmt="qcow2")


class TopLayer(NamedTuple):
    """What ``qemu-img map`` says the top layer holds (coalesced ranges)."""

    data: list[tuple[int, int]]
    zero: list[tuple[int, int]]

    @property
    def allocated(self) -> list[tuple[int, int]]:
        return list(coalesce(sorted(self.data + self.zero)))


def qemu_map(path: Path) -> list[dict[str, object]]:
    r = run("qemu-img", "map", "--output=json", "-f", "qcow2", path)
    assert r.returncode == 0, r.stderr
    entries: list[dict[str, object]] = json.loads(r.stdout)
    return entries


def qemu_top_layer(path: Path) -> TopLayer:
    """The top layer's own allocation: map entries of depth 0 that are present, split into
    data (plain or compressed) and ranges that read as zeros."""
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    for e in qemu_map(path):
        if e["depth"] != 0 or not e["present"]:
            continue
        start, length = int(str(e["start"])), int(str(e["length"]))
        (data if e["data"] else zero).append((start, length))
    return TopLayer(list(coalesce(data)), list(coalesce(zero)))


# -- editing images on purpose --------------------------------------------------------------
def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def u32(path: Path, at: int) -> int:
    return int(struct.unpack(">I", read_at(path, at, 4))[0])


def u64(path: Path, at: int) -> int:
    return int(struct.unpack(">Q", read_at(path, at, 8))[0])


def set_u32(path: Path, at: int, value: int) -> None:
    patch(path, at, struct.pack(">I", value))


def set_u64(path: Path, at: int, value: int) -> None:
    patch(path, at, struct.pack(">Q", value))


def cluster_size(path: Path) -> int:
    return 1 << u32(path, 20)


def l1_offset(path: Path) -> int:
    return u64(path, 40)


def l2_offset(path: Path, l1_index: int = 0) -> int:
    """File offset of the L2 table behind an L1 entry (0 if none)."""
    return u64(path, l1_offset(path) + 8 * l1_index) & OFFSET_MASK


def l2_entry_at(path: Path, index: int, *, l1_index: int = 0, entry_size: int = 8) -> int:
    """File offset of an L2 entry (the table must exist)."""
    table = l2_offset(path, l1_index)
    assert table, f"no L2 table behind L1 entry {l1_index}"
    return table + entry_size * index
