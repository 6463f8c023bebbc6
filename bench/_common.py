"""Helpers shared by the benchmarks in this folder: machine facts, cold caches, tables, data.

Kept deliberately small: every benchmark stays readable on its own, and only what two of them
need lives here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 64 * KiB

#: glibc settings that keep ~1 MiB buffers out of mmap/munmap (see ../shared/PERFORMANCE.md).
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


# -- the machine -----------------------------------------------------------------------------
def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` seconds) until the 1-minute load is below ``limit``; returns the
    load measured at the end. The machine is shared: measure when others are not."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load >= limit and time.monotonic() < deadline:
        print(f"load {load:.2f} >= {limit}: waiting for a quieter machine ...", file=sys.stderr)
        time.sleep(15)
        load = load_average()
    return load


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc

    return {
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_1m_at_start": round(load_average(), 2),
    }


def can_drop_caches() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        drop_caches()
    except OSError:
        return False
    return True


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- numbers and tables ----------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """(round, order) with the order rotated each round, so no peer is always first."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names) if names else 0
        yield r, names[k:] + names[:k]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, doc: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# -- disk-like data --------------------------------------------------------------------------
class DiskLikeData:
    """Deterministic half-compressible disk content, per 64 KiB block: a share of zero blocks,
    a share of random (incompressible) blocks, the rest text (as ../shared/PERFORMANCE.md
    describes: 20 % zeros, 40 % random, 40 % text, seed 42, by default).

    Text blocks are 64 KiB slices at random offsets of a 16 MiB pool of generated words, so
    blocks within one ~1 MiB batch rarely share content (zstd sees realistic, not repeated,
    text)."""

    def __init__(self, seed: int = 42, *, zeros: float = 0.20, random_share: float = 0.40) -> None:
        self.seed = seed
        self.zeros = zeros
        self.random_share = random_share
        self._pool = _text_pool(seed)

    def blocks(self, count: int) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        zero = bytes(BLOCK)
        for _ in range(count):
            pick = rng.random()
            if pick < self.zeros:
                yield zero
            elif pick < self.zeros + self.random_share:
                yield rng.randbytes(BLOCK)
            else:
                yield self.text_block(rng)

    def text_block(self, rng: random.Random) -> bytes:
        off = rng.randrange(0, len(self._pool) - BLOCK)
        return self._pool[off : off + BLOCK]

    def changed_block(self, rng: random.Random) -> bytes:
        """New content for a rewritten block: never zero; half random, half text."""
        return rng.randbytes(BLOCK) if rng.random() < 0.5 else self.text_block(rng)


_POOLS: dict[int, bytes] = {}


def _text_pool(seed: int, size: int = 16 * MiB) -> bytes:
    """Log lines and prose from a 300-word vocabulary: zstd level 1 shrinks it about 3x."""
    if seed not in _POOLS:
        rng = random.Random(seed ^ 0x7E87)
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [12, 9, 8, 8, 7, 7, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
        vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(300)]
        levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN"]
        sources = ["agent.sender", "agent.receiver", "broker.control", "vdisk.vhdx", "hosts.dir"]
        out: list[str] = []
        total = 0
        clock = 1_795_000_000.0
        while total < size:
            lines = []
            for _ in range(2000):
                if rng.random() < 0.5:
                    clock += rng.random()
                    words = " ".join(rng.choices(vocab, k=rng.randint(3, 9)))
                    lines.append(
                        f"{clock:.3f} {rng.choice(levels)} {rng.choice(sources)}: {words} "
                        f"id={rng.randrange(100000)} bytes={rng.randrange(1 << 20)}\n"
                    )
                else:
                    lines.append(" ".join(rng.choices(vocab, k=rng.randint(6, 16))) + ".\n")
            chunk = "".join(lines)
            out.append(chunk)
            total += len(chunk)
        _POOLS[seed] = "".join(out).encode()[:size]
    return _POOLS[seed]
