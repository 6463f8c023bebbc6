"""Helpers for the VHD, raw, cross-format and CLI tests: the external oracles (qemu-img,
qemu-io, libvhdi) driven for the ``vpc`` (VHD) format, and tools to edit images on purpose."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sitepair.vdisk import vhd_layout as L

MiB = 1 << 20


def require_qemu() -> None:
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install qemu-utils)")


def require_pyvhdi() -> Any:
    return pytest.importorskip("pyvhdi", reason="libvhdi's Python binding (pip libvhdi-python)")


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def qemu_create_vpc(path: Path, size: int, *, subformat: str, force_size: bool = True) -> None:
    require_qemu()
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    r = run("qemu-img", "create", "-q", "-f", "vpc", "-o", opts, path, str(size))
    assert r.returncode == 0, r.stderr


def qemu_io(path: Path, *commands: str, fmt: str = "vpc") -> str:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = run(*args, path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "failed" not in out.lower(), out
    return out


def qemu_raw(path: Path, tmp: Path, fmt: str = "vpc") -> bytes:
    out = tmp / (path.name + ".qemu.raw")
    r = run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_virtual_size(path: Path, fmt: str = "vpc") -> int:
    import json

    r = run("qemu-img", "info", "--output=json", "-f", fmt, path)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["virtual-size"])


def qemu_compare_raw(path: Path, expected: bytes, tmp: Path, fmt: str = "vpc") -> None:
    """``qemu-img compare`` (exit 0 = same) of ``path`` against the raw expectation."""
    require_qemu()
    raw = tmp / "expected.raw"
    raw.write_bytes(expected)
    r = run("qemu-img", "compare", "-f", fmt, "-F", "raw", path, raw)
    raw.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


def pyvhdi_sha256(path: Path, parents: list[Path] | None = None) -> str:
    """SHA-256 of the guest bytes as libvhdi reads them; ``parents`` are the chain below
    ``path``, nearest first (linked with libvhdi's own ``set_parent``)."""
    pyvhdi = require_pyvhdi()
    chain = [path, *(parents or [])]
    files = [pyvhdi.file() for _ in chain]
    for f, p in zip(files, chain, strict=True):
        f.open(str(p))
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    top = files[0]
    h = hashlib.sha256()
    offset, left = 0, top.media_size
    while left:
        b = top.read_buffer_at_offset(min(4 * MiB, left), offset)
        assert b, "libvhdi returned a short read"
        h.update(b)
        offset += len(b)
        left -= len(b)
    for f in reversed(files):
        f.close()
    return h.hexdigest()


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def footer_offsets(path: Path) -> list[int]:
    """File offsets of the footer(s): the copy at 0 (dynamic) and the one at the end."""
    size = path.stat().st_size
    out = [size - 512]
    if read_at(path, 0, 8) == L.FOOTER_COOKIE:
        out.insert(0, 0)
    return out


def edit_footers(path: Path, field_offset: int, data: bytes) -> None:
    """Change a footer field in every footer and fix their checksums (so only the edit is
    wrong)."""
    for at in footer_offsets(path):
        buf = bytearray(read_at(path, at, 512))
        buf[field_offset : field_offset + len(data)] = data
        struct.pack_into(">I", buf, 64, L.checksum(buf, 64))
        patch(path, at, bytes(buf))


def edit_header(path: Path, field_offset: int, data: bytes, *, fix_checksum: bool = True) -> None:
    """Change a dynamic header field (at offset 512) and fix its checksum."""
    buf = bytearray(read_at(path, 512, 1024))
    buf[field_offset : field_offset + len(data)] = data
    if fix_checksum:
        struct.pack_into(">I", buf, 36, L.checksum(buf, 36))
    patch(path, 512, bytes(buf))


def bat_offset(path: Path) -> int:
    return int(struct.unpack_from(">Q", read_at(path, 512 + 16, 8))[0])


def bat_entry(path: Path, index: int) -> int:
    return int(struct.unpack(">I", read_at(path, bat_offset(path) + 4 * index, 4))[0])


def set_bat_entry(path: Path, index: int, value: int) -> None:
    patch(path, bat_offset(path) + 4 * index, struct.pack(">I", value))
