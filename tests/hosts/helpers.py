"""Helpers for the directory-backend tests: the seeded write plan a writer process follows, a
bytearray model of the guest disks, and readers of cut chains (ours, qemu-img, libvhdi)."""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.hosts.base import Cut
from sitepair import vdisk

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
ROOT = Path(__file__).resolve().parents[2]

#: The VM most tests use: one VHDX and one VHD disk, so every scenario covers both formats.
DISKS: list[tuple[str, str, int]] = [("os", "vhdx", 8 * MiB), ("data", "vhd", 4 * MiB)]
SIZES = {d: s for d, _f, s in DISKS}


def write_op(seed: int, n: int, *, aligned: bool) -> tuple[str, int, bytes]:
    """Write number ``n`` (from 1) of the plan ``seed``: ``(disk, offset, data)``. Each write's
    bytes are unique (its number in the first 8 bytes, then a fill byte), so a disk image shows
    exactly which writes reached it."""
    rng = random.Random(seed * 1_000_003 + n)
    disk = rng.choice(["os", "os", "data"])
    size = SIZES[disk]
    if aligned:
        length = BLOCK * rng.choice([1, 1, 2, 3])
        offset = rng.randrange(0, (size - length) // BLOCK + 1) * BLOCK
    else:
        length = rng.choice([512, 4 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 100 * KiB])
        offset = rng.randrange(0, size - length + 1)
        if rng.random() < 0.5:
            offset -= offset % 4096
    fill = 1 + n % 251
    data = struct.pack("<Q", n) + bytes([fill]) * (length - 8)
    return disk, offset, data


class Model:
    """The guest disks as the plan's first ``k`` writes leave them."""

    def __init__(self, seed: int, *, aligned: bool) -> None:
        self.seed = seed
        self.aligned = aligned
        self.k = 0
        self.disks = {d: bytearray(s) for d, s in SIZES.items()}

    def advance(self, k: int) -> None:
        assert k >= self.k
        for n in range(self.k + 1, k + 1):
            disk, off, data = write_op(self.seed, n, aligned=self.aligned)
            self.disks[disk][off : off + len(data)] = data
        self.k = k

    def snapshot(self) -> dict[str, bytes]:
        return {d: bytes(b) for d, b in self.disks.items()}


def blocks_of_writes(seed: int, first: int, last: int, *, aligned: bool) -> dict[str, set[int]]:
    """The 64 KiB blocks written by writes ``first..last`` (inclusive)."""
    out: dict[str, set[int]] = {d: set() for d in SIZES}
    for n in range(first, last + 1):
        disk, off, data = write_op(seed, n, aligned=aligned)
        out[disk].update(range(off // BLOCK, (off + len(data) - 1) // BLOCK + 1))
    return out


def blocks_of_ranges(ranges: Iterable[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for off, length in ranges:
        assert off % BLOCK == 0, (off, length)
        out.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
    return out


def read_image(path: Path) -> bytes:
    """The guest bytes of the chain ending at ``path``, through sitepair.vdisk."""
    with vdisk.open_disk(path, read_only=True) as disk:
        return disk.read(0, disk.virtual_size)


def read_cut(cut: Cut) -> dict[str, bytes]:
    return {d.disk_id: read_image(d.chain[-1]) for d in cut.disks}


def differing_blocks(a: bytes, b: bytes) -> set[int]:
    out = set()
    for i in range(0, len(a), BLOCK):
        if a[i : i + BLOCK] != b[i : i + BLOCK]:
            out.add(i // BLOCK)
    return out


def qemu_compare(image: Path, expected: bytes, tmp: Path) -> None:
    """``qemu-img compare`` of a standalone VHD/VHDX against raw bytes (qemu 7.2 reads no
    differencing VHDX or VHD, so only bases and dynamic disks go through it)."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
    raw = tmp / f"{image.name}.expected.raw"
    raw.write_bytes(expected)
    fmt = "vhdx" if vdisk.detect_format(image) is vdisk.DiskFormat.VHDX else "vpc"
    r = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    raw.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


def libvhdi_sha256(chain: tuple[Path, ...]) -> str:
    """SHA-256 of the guest bytes of a chain (base first) as libvhdi reads it."""
    pyvhdi: Any = pytest.importorskip("pyvhdi", reason="libvhdi's Python binding")
    top_first = list(reversed(chain))
    files = [pyvhdi.file() for _ in top_first]
    for f, p in zip(files, top_first, strict=True):
        f.open(str(p))
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    h = hashlib.sha256()
    top = files[0]
    offset, left = 0, top.media_size
    while left:
        b = top.read_buffer_at_offset(min(4 * MiB, left), offset)
        assert b
        h.update(b)
        offset += len(b)
        left -= len(b)
    for f in reversed(files):
        f.close()
    return h.hexdigest()


class WriterLog:
    """The log a writer process keeps: ``S n`` before write n, ``D n`` after it returned."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def marks(self) -> tuple[int, int, bool, bool]:
        """(last started, last done, ready, ended)."""
        started = done = 0
        ready = ended = False
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0, 0, False, False
        # Only whole lines count: the writer may be half-way through its last one ("S " without
        # its number yet), which is not a mark at all.
        for line in text.split("\n")[:-1]:
            if line.startswith("S "):
                started = int(line[2:])
            elif line.startswith("D "):
                done = int(line[2:])
            elif line == "R":
                ready = True
            elif line == "E":
                ended = True
        return started, done, ready, ended


def spawn(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.hosts.proc", *(str(a) for a in args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def start_writer(
    vm_root: Path, vm: str, seed: int, log: Path, stop: Path, *extra: str
) -> subprocess.Popen[bytes]:
    proc = spawn("write", vm_root, vm, str(seed), log, stop, *extra)
    wl = WriterLog(log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"writer exited early: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        return wl.marks()[2]

    wait_for(ready, "the writer to start")
    return proc
