"""An independent reader for the harness's final checks: libvhdi (pyvhdi), which nobody here
wrote, reads a whole differencing chain and hashes the guest's bytes.

qemu-img 7.2 cannot open differencing VHDX/VHD images (see ../shared/oracle/README.md), and
every replica and every running copy is a chain, so the byte-for-byte comparison between sites
goes through libvhdi; our own reader is the other side of each check (workload.check_prefix).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

MiB = 1 << 20


def available() -> str | None:
    """None when libvhdi's Python binding can be used, else why not."""
    try:
        import pyvhdi  # noqa: F401
    except ImportError:
        return "libvhdi's Python binding is missing (pip install libvhdi-python)"
    return None


def chain_sha256(chain: list[Path]) -> str:
    """SHA-256 of the guest bytes of ``chain`` (base first, top last) as libvhdi reads them."""
    import pyvhdi

    files: list[Any] = [pyvhdi.file() for _ in chain]
    try:
        for f, path in zip(files, chain, strict=True):
            f.open(str(path))
        top_first = list(reversed(files))
        for child, parent in itertools.pairwise(top_first):
            child.set_parent(parent)
        top = top_first[0]
        h = hashlib.sha256()
        offset, left = 0, int(top.media_size)
        while left:
            data = top.read_buffer_at_offset(min(4 * MiB, left), offset)
            if not data:
                raise OSError(f"libvhdi returned a short read at {offset} of {chain[-1]}")
            h.update(data)
            offset += len(data)
            left -= len(data)
        return h.hexdigest()
    finally:
        for f in files:
            f.close()
