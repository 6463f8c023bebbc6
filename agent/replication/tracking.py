"""Change tracking: which blocks a cycle must carry.

Two trackers, chosen per relationship:

* ``changelog`` (default): the host backend's changed-block log, the portable equivalent of
  Hyper-V Resilient Change Tracking. The cut says which ranges changed since the last released
  cut, or that tracking cannot be trusted (then the cycle becomes a checksum resync).
* ``scan``: hash every allocated block of the frozen cut with BLAKE3 in threads and compare with
  the digests recorded when the previous cycle committed. It needs nothing from the backend and
  reads the whole allocated disk, so it is the fallback, not the default.

Both produce byte ranges aligned to :data:`~agent.replication.blocks.BLOCK`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from agent.replication.blocks import BLOCK
from sitepair import vdisk
from sitepair.errors import SitepairError
from sitepair.fsutil import atomic_write
from sitepair.vdisk import ops as vdisk_ops

_MAGIC = b"SPDIGST1"
_HEAD = struct.Struct("<8sIQ")


def digests_of(chain_top: Path, *, block: int = BLOCK, threads: int = 2) -> list[bytes]:
    """BLAKE3 per block of the guest view of a (frozen) chain; unallocated blocks not read."""
    with vdisk.open_disk(chain_top, read_only=True) as disk:
        return vdisk_ops.digest(disk, block, threads=threads)


def differing_ranges(
    ours: Sequence[bytes], theirs: Sequence[bytes], *, virtual_size: int, block: int = BLOCK
) -> list[tuple[int, int]]:
    """Coalesced byte ranges of the blocks whose digests differ (or that one side lacks)."""
    out: list[tuple[int, int]] = []
    count = max(len(ours), len(theirs))
    for i in range(count):
        a = ours[i] if i < len(ours) else None
        b = theirs[i] if i < len(theirs) else None
        if a == b:
            continue
        off = i * block
        length = min(block, virtual_size - off)
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


class DigestStore:
    """Per-disk block digests of the last committed cut, for the scan tracker and verify."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, disk_id: str) -> Path:
        return self.directory / f"{disk_id}.digests"

    def load(self, disk_id: str, *, block: int = BLOCK) -> list[bytes] | None:
        path = self._path(disk_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _HEAD.size:
            return None
        magic, blk, count = _HEAD.unpack_from(data)
        body = data[_HEAD.size :]
        if magic != _MAGIC or blk != block or len(body) != count * 32:
            return None  # unusable: the next cycle resyncs instead of trusting it
        return [body[i * 32 : (i + 1) * 32] for i in range(count)]

    def save(self, disk_id: str, digests: Sequence[bytes], *, block: int = BLOCK) -> None:
        if any(len(d) != 32 for d in digests):
            raise SitepairError("digests must be 32 bytes each")
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self._path(disk_id), _HEAD.pack(_MAGIC, block, len(digests)) + b"".join(digests)
        )

    def clear(self) -> None:
        for p in self.directory.glob("*.digests"):
            p.unlink()
