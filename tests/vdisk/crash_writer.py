"""Writer process for the crash tests: random writes and flushes into an existing image.

Usage: ``python -m tests.vdisk.crash_writer IMAGE SEED``. Before write ``n`` it prints
``W <n>``; after each completed flush, ``F <n>`` (the number of writes made durable so far),
flushing standard output each time, so the parent knows which writes must survive a SIGKILL
and which may have been in flight. The sequence of writes is a pure
function of the seed and the image size (see :func:`plan`), so the parent can replay it.
"""

from __future__ import annotations

import random
import sys

from sitepair.vdisk import open_disk

FLUSH_EVERY = 4


def plan(seed: int, size: int, count: int = 100_000) -> list[tuple[int, int, int]]:
    """``(offset, length, value)`` of each write: ``value`` fills the range (0 = zeros)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        length = rng.choice([1, 100, 512, 4096, 65536, 300_000])
        off = rng.randrange(0, size - length + 1)
        if rng.random() < 0.5:
            off -= off % 512
        value = 0 if i % 9 == 5 else 1 + (seed * 31 + i) % 255
        out.append((off, length, value))
    return out


def main() -> int:
    path, seed = sys.argv[1], int(sys.argv[2])
    with open_disk(path) as disk:
        for n, (off, length, value) in enumerate(plan(seed, disk.virtual_size), start=1):
            sys.stdout.write(f"W {n}\n")
            sys.stdout.flush()
            disk.write(off, bytes([value]) * length)
            if n % FLUSH_EVERY == 0:
                disk.flush()
                sys.stdout.write(f"F {n}\n")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
