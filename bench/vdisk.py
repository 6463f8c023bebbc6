#!/usr/bin/env python3
"""Virtual-disk benchmark: our VHD/VHDX code against a raw file and qemu-img, in one run.

Measures, with the peers side by side:

1. sequential read of a fully allocated 1 GiB dynamic VHDX and VHD, against reading the same
   bytes from a raw file (plain ``os.pread`` and through our raw driver) and against qemu
   reading the same images (``qemu-img convert -n`` into qemu's null driver: the equivalent
   of ``convert -O raw ... /dev/null``, which qemu refuses); the page cache is dropped before
   every read when running as root (``echo 3 > /proc/sys/vm/drop_caches``), otherwise the
   runs are warm and the table says so;
2. ``allocated_ranges()`` on 1 TiB sparse images with 1% of their blocks allocated (and the
   open that precedes it), VHDX and VHD, against SEEK_DATA/SEEK_HOLE on a sparse raw file;
3. random 64 KiB writes per second (then one flush) into the same 1 GiB images (overwriting
   allocated blocks) and into fresh empty ones (allocating as they go).

Ratios matter, not absolute numbers: run it on an otherwise idle machine. ``--update-docs``
rewrites the "Virtual disks" section of docs/benchmarks.md with the table and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sitepair.vdisk import create_disk, open_disk  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class Bench:
    def __init__(self, folder: Path, runs: int) -> None:
        self.folder = folder
        self.runs = runs
        self.cold = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        if self.cold:
            try:
                self.drop_caches()
            except OSError:
                self.cold = False

    def drop_caches(self) -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def interleaved(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median wall time of each function, running them in turn within each round (so a
        drift in the machine's speed affects all of them alike, in a rotating order), page
        cache dropped before each one when possible."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_ in range(self.runs):
            # Rotate the order each round so no reader is always the first after a drop.
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                fn = fns[name]
                if self.cold:
                    self.drop_caches()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    def timed(self, fn: Callable[[], object], *, cold: bool) -> float:
        """Median wall time of ``fn`` over the runs (page cache dropped first if asked)."""
        times = []
        for _ in range(self.runs):
            if cold and self.cold:
                self.drop_caches()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def _fill_source(path: Path, size: int) -> None:
    """A raw file of ``size`` bytes of incompressible, never-zero data."""
    rng = random.Random(42)
    chunk = bytearray(rng.randbytes(16 * MiB))
    with path.open("wb") as f:
        for i in range(size // len(chunk)):
            chunk[0] = (i % 255) + 1
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _read_pread(path: Path, size: int, request: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            got = os.pread(fd, request, pos)
            pos += len(got)
    finally:
        os.close(fd)


def _read_disk(path: Path, size: int, request: int) -> None:
    with open_disk(path, read_only=True) as disk:
        pos = 0
        while pos < size:
            disk.read(pos, request)
            pos += request


def _read_disk_into(path: Path, size: int, request: int) -> None:
    """The same through ``read_into`` and one reused buffer (no allocation, no copy)."""
    buf = memoryview(bytearray(request))
    with open_disk(path, read_only=True) as disk:
        pos = 0
        while pos < size:
            disk.read_into(pos, buf)
            pos += request


def _qemu_read(path: Path, fmt: str, size: int) -> None:
    """qemu-img reading the whole image into its null driver (``/dev/null`` cannot be a
    target of ``convert -n``: qemu checks its size)."""
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", fmt, "--target-image-opts", str(path),
         f"driver=null-co,size={size}"],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _random_writes(path: Path, count: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(64 * 1024)
    with open_disk(path) as disk:
        for _ in range(count):
            disk.write(rng.randrange(size // 65536) * 65536, data)
        disk.flush()


def _sparse_image(path: Path, fmt: str, block: int, fraction: float, seed: int) -> None:
    with create_disk(
        path, format=fmt, subformat="dynamic" if fmt != "raw" else "fixed", size=TiB
    ) as disk:
        blocks = TiB // block
        rng = random.Random(seed)
        for index in sorted(rng.sample(range(blocks), int(blocks * fraction))):
            disk.write(index * block + 4096, b"\x5a" * 4096)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--size", type=float, default=1, help="GiB of the read/write images")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--writes", type=int, default=4000, help="random 64 KiB writes per run")
    parser.add_argument("--update-docs", action="store_true", help="rewrite docs/benchmarks.md")
    args = parser.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="vdisk-bench-", dir="/var/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    bench = Bench(folder, args.runs)
    size = int(args.size * 1024) * MiB
    formats = ["vhd", "vhdx"]
    have_qemu = shutil.which("qemu-img") is not None
    try:
        print(f"building images in {folder} ...", file=sys.stderr)
        raw = folder / "full.raw"
        _fill_source(raw, size)
        images = {"raw": raw}
        from sitepair.vdisk.ops import convert

        for fmt in formats:
            images[fmt] = folder / f"full.{fmt}"
            convert(raw, images[fmt], fmt, "dynamic")

        rows: list[list[str]] = []
        # 1. Sequential reads.
        seq: dict[str, dict[str, float]] = {}
        for request in (1 * MiB, 4 * MiB):
            readers: dict[str, Callable[[], object]] = {
                "raw file, os.pread": partial(_read_pread, raw, size, request),
                "raw, sitepair read()": partial(_read_disk, raw, size, request),
            }
            for fmt in formats:
                readers[f"{fmt.upper()} dynamic, sitepair read()"] = partial(
                    _read_disk, images[fmt], size, request
                )
            for fmt in formats:
                readers[f"{fmt.upper()} dynamic, sitepair read_into()"] = partial(
                    _read_disk_into, images[fmt], size, request
                )
            for name, t in bench.interleaved(readers).items():
                seq.setdefault(name, {})[f"{request // MiB}M"] = t
        if have_qemu:
            qemu_readers: dict[str, Callable[[], object]] = {}
            for fmt, qfmt in [("raw", "raw")] + [(f, "vpc" if f == "vhd" else f) for f in formats]:
                label = f"{fmt.upper() if fmt != 'raw' else 'raw'}, qemu-img convert"
                qemu_readers[label] = partial(_qemu_read, images[fmt], qfmt, size)
            for name, t in bench.interleaved(qemu_readers).items():
                seq.setdefault(name, {})["qemu"] = t
        raw_1m = seq["raw file, os.pread"]["1M"]
        raw_4m = seq["raw file, os.pread"]["4M"]
        for name, results in seq.items():
            cells = [name]
            for key, base in (("1M", raw_1m), ("4M", raw_4m)):
                if key in results:
                    t = results[key]
                    cells.append(f"{size / t / 1e9:.2f} GB/s ({base / t:.2f}x)")
                else:
                    cells.append("")
            qemu = results.get("qemu")
            cells.append(f"{size / qemu / 1e9:.2f} GB/s ({raw_1m / qemu:.2f}x)" if qemu else "")
            rows.append(cells)
        cache_note = (
            "page cache dropped before every read"
            if bench.cold
            else "WARM page cache (not root: could not drop caches)"
        )

        # 2. allocated_ranges on 1 TiB sparse images, 1% of blocks allocated.
        ranges_rows: list[list[str]] = []
        sparse_specs = [("raw", 2 * MiB)] + [
            (f, 2 * MiB if f == "vhd" else 32 * MiB) for f in formats
        ]
        for fmt, block in sparse_specs:
            path = folder / f"sparse.{fmt}"
            _sparse_image(path, fmt, block, 0.01, seed=7)
            count = 0
            timings: list[float] = []

            def scan(p: Path = path) -> None:
                nonlocal count
                with open_disk(p, read_only=True) as disk:
                    count = sum(1 for _ in disk.allocated_ranges())

            def scan_only(p: Path = path, timings: list[float] = timings) -> None:
                with open_disk(p, read_only=True) as disk:
                    start = time.perf_counter()
                    list(disk.allocated_ranges())
                    timings.append(time.perf_counter() - start)

            total = bench.timed(scan, cold=True)
            bench.timed(scan_only, cold=True)
            label = "raw, SEEK_DATA/SEEK_HOLE" if fmt == "raw" else f"{fmt.upper()} dynamic"
            ranges_rows.append(
                [
                    label,
                    f"{block // MiB} MiB",
                    f"{TiB // block}",
                    f"{count}",
                    f"{statistics.median(timings) * 1000:.1f} ms",
                    f"{total * 1000:.1f} ms",
                ]
            )
            path.unlink()

        # 3. Random 64 KiB writes.
        write_rows: list[list[str]] = []
        for fmt in ["raw", *formats]:
            per_s = args.writes / bench.timed(
                partial(_random_writes, images[fmt], args.writes, size, 3), cold=True
            )
            fresh_times = []
            for run in range(args.runs):
                fresh = folder / f"fresh{run}.{fmt}"
                sub = "fixed" if fmt == "raw" else "dynamic"
                create_disk(fresh, format=fmt, subformat=sub, size=size).close()
                start = time.perf_counter()
                _random_writes(fresh, args.writes, size, seed=run)
                fresh_times.append(time.perf_counter() - start)
                fresh.unlink()
            fresh_per_s = args.writes / statistics.median(fresh_times)
            write_rows.append(
                [
                    "raw" if fmt == "raw" else f"{fmt.upper()} dynamic",
                    f"{per_s:,.0f}/s ({per_s * 65536 / 1e6:.0f} MB/s)",
                    f"{fresh_per_s:,.0f}/s ({fresh_per_s * 65536 / 1e6:.0f} MB/s)",
                ]
            )
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)

    command = "make bench  # = .venv/bin/python bench/vdisk.py" + (
        " --update-docs" if args.update_docs else ""
    )
    text = _render(rows, ranges_rows, write_rows, cache_note, size, args.runs, args.writes, command)
    print(text)
    if args.update_docs:
        _update_docs(text)
    return 0


def _gib(size: int) -> str:
    return f"{size / GiB:g} GiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _render(
    seq_rows: list[list[str]],
    ranges_rows: list[list[str]],
    write_rows: list[list[str]],
    cache_note: str,
    size: int,
    runs: int,
    writes: int,
    command: str,
) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs ({cpu}), "
        f"Python {platform.python_version()}; median of {runs} runs. Command: `{command}`.",
        "",
        f"**Sequential read of {_gib(size)}, fully allocated** ({cache_note}); the ratio is "
        "against `os.pread` of the raw file with the same request size. `read()` returns a new "
        "`bytes` per request (for a request spanning two VHD blocks that costs one copy, the "
        "blocks being apart in the file); `read_into()` fills a caller's buffer:",
        "",
        _table(
            ["reader", "1 MiB requests", "4 MiB requests", "qemu-img convert (to null-co)"],
            seq_rows,
        ),
        "",
        "**`allocated_ranges()` on a 1 TiB sparse image with 1% of its blocks allocated** "
        "(each allocated block holds 4 KiB of data; page cache dropped):",
        "",
        _table(
            [
                "image",
                "block",
                "blocks",
                "ranges",
                "allocated_ranges()",
                "open + allocated_ranges()",
            ],
            ranges_rows,
        ),
        "",
        f"**Random 64 KiB writes** ({writes} aligned writes, then one flush):",
        "",
        _table(
            ["image", f"into the full {_gib(size)} image", "into a fresh empty image"], write_rows
        ),
    ]
    return "\n".join(lines) + "\n"


def _update_docs(text: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    intro = (
        "# Benchmarks\n\n"
        "Results of the benchmarks in `bench/`, each printing our numbers with the peers side by "
        "side. Ratios matter more than absolute figures: they were measured on a shared 2-core "
        "machine (see ../shared/PERFORMANCE.md for its ceilings).\n"
    )
    current = path.read_text() if path.exists() else intro
    section = "## Virtual disks\n\n" + text
    start = current.find("## Virtual disks")
    if start < 0:
        new = current.rstrip("\n") + "\n\n" + section
    else:
        end = current.find("\n## ", start + 1)
        new = current[:start] + section + ("" if end < 0 else current[end:])
    path.write_text(new)
    print(f"updated {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
