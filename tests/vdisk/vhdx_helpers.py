"""Shared helpers for the VHDX tests: the external oracles (qemu-img, qemu-io, libvhdi) and
small tools to damage images on purpose."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sitepair.vdisk.vhdx_crc import checksum_with_field_zeroed
from sitepair.vdisk.vhdx_format import HEADER_OFFSETS, HEADER_SIZE, REGION_TABLE_OFFSETS

MiB = 1 << 20


def require_qemu() -> None:
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install qemu-utils)")


def require_pyvhdi() -> Any:
    return pytest.importorskip("pyvhdi", reason="libvhdi's Python binding (pip libvhdi-python)")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], check=False, capture_output=True, text=True, timeout=120
    )


def qemu_create(
    path: Path, size: int, *, subformat: str = "dynamic", block_size: str = "1M"
) -> None:
    require_qemu()
    r = run(
        "qemu-img", "create", "-q", "-f", "vhdx", "-o",
        f"subformat={subformat},block_size={block_size}", path, str(size),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def qemu_io(path: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "vhdx"]
    for c in commands:
        args += ["-c", c]
    r = run(*args, path)
    assert r.returncode == 0 and "failed" not in r.stdout.lower(), r.stdout + r.stderr


def qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".raw")
    r = run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", path, out)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_check(path: Path) -> None:
    r = run("qemu-img", "check", "-f", "vhdx", path)
    assert r.returncode == 0, r.stdout + r.stderr


def qemu_compare_raw(path: Path, expected: bytes, tmp: Path) -> None:
    raw = tmp / "expected.raw"
    raw.write_bytes(expected)
    r = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", path, raw)
    raw.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


def pyvhdi_sha256(path: Path, parents: list[Path] = ()) -> str:  # type: ignore[assignment]
    """SHA-256 of the guest bytes as libvhdi reads them; ``parents`` are the chain below
    ``path``, nearest first."""
    pyvhdi = require_pyvhdi()
    files = [pyvhdi.file() for _ in range(1 + len(parents))]
    for f, p in zip(files, [path, *parents], strict=True):
        f.open(str(p))
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    top = files[0]
    h = hashlib.sha256()
    left = top.media_size
    while left:
        b = top.read(min(4 * MiB, left))
        assert b, "libvhdi returned a short read"
        h.update(b)
        left -= len(b)
    for f in files:
        f.close()
    return h.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def rechecksum_header(path: Path, slot: int) -> None:
    """Recompute header ``slot``'s CRC after a deliberate edit (so only the edit is wrong)."""
    buf = bytearray(read_at(path, HEADER_OFFSETS[slot], HEADER_SIZE))
    struct.pack_into("<I", buf, 4, checksum_with_field_zeroed(buf))
    patch(path, HEADER_OFFSETS[slot], bytes(buf))


def rechecksum_regions(path: Path) -> None:
    for offset in REGION_TABLE_OFFSETS:
        buf = bytearray(read_at(path, offset, 64 * 1024))
        struct.pack_into("<I", buf, 4, checksum_with_field_zeroed(buf))
        patch(path, offset, bytes(buf))


def current_header_slot(path: Path) -> int:
    seqs = [struct.unpack_from("<Q", read_at(path, off, 16), 8)[0] for off in HEADER_OFFSETS]
    return 0 if seqs[0] > seqs[1] else 1


def edit_both_headers(path: Path, offset_in_header: int, data: bytes) -> None:
    for slot in (0, 1):
        patch(path, HEADER_OFFSETS[slot] + offset_in_header, data)
        rechecksum_header(path, slot)
