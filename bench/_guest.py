"""A running test guest for bench/replication.py's ``guest-delta`` part: the guest's disks with
its workload's pace set, a console reader that stamps lines with host time, the guest's own
per-record latencies, and timing of the qemu backend's cut and release.

The guest is tests/support/guest.py's (a Debian kernel and busybox writing durable records to
ext4 on a VHDX, acknowledging each on its serial console). Its pace is a kernel command line
parameter here (``sitepair.interval``: the pause after each record), set in a copy of the boot
disk's ``syslinux.cfg``, because the qemu backend starts VMs from their definition alone (no
``-fw_cfg``). Each record is reported as ``SITEPAIR LATENCY <seq> record_us=<n> fsync_us=<n>
at=<guest epoch>``: the time from the start of its write to the log's fsync, and the two syncs
in it (the record's file and folder, then the log), by the guest's clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import percentile

_LATENCY = re.compile(r"SITEPAIR LATENCY (\d+) record_us=(\d+) fsync_us=(\d+) at=(\d+\.\d+)")


# -- the guest's disks ---------------------------------------------------------------------------
def boot_disk(image: Any, dest: Path, params: str) -> Path:
    """A copy of the guest's boot disk (VHDX) whose kernel command line ends with ``params``
    (``image`` is a tests.support.guest.GuestImage)."""
    from tests.support import guest

    dest.mkdir(parents=True, exist_ok=True)
    raw = dest / "boot-params.raw"
    shutil.copyfile(image.boot_raw, raw)
    cfg = dest / "syslinux.cfg"
    cmdline = f"{guest.KERNEL_CMDLINE} {params}"
    cfg.write_text(guest.SYSLINUX_CFG.replace(guest.KERNEL_CMDLINE, cmdline))
    # mtools refuses images whose geometry it finds odd; ours is a plain file, not a floppy.
    subprocess.run(
        ["mcopy", "-o", "-i", str(raw), str(cfg), "::/syslinux.cfg"],
        check=True,
        capture_output=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    vhdx = dest / "boot.vhdx"
    guest.to_vhdx(raw, vhdx)
    raw.unlink()
    return vhdx


def record_size(seed: int, seq: int) -> int:
    """Bytes of record ``seq``'s file (what the guest's application wrote)."""
    from tests.support.guest import record_bytes

    return len(record_bytes(seed, seq))


# -- the console, stamped with host time ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Record:
    """One durable record as the guest timed it, placed on the host's clock."""

    seq: int
    #: From the start of the record's write to the log's fsync (guest clock), seconds.
    seconds: float
    #: The two syncs in it (the record's file and folder, then the log), seconds.
    fsync_seconds: float
    #: Start and end on the host's clock (time.time()).
    start: float
    end: float


class ConsoleTail:
    """Reads a guest's serial log as it grows (every 20 ms, in a thread) and keeps each
    ``SITEPAIR LATENCY`` line with the host time it was first seen. The guest's clock (set from
    the emulated RTC at boot, to the second) is mapped to the host's by the smallest difference
    between a record's end and the moment its line appeared: lines appear after their record
    ends, never before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        partial = b""
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
                if chunk:
                    now = time.time()
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        text = line.decode(errors="replace").strip()
                        if text.startswith("SITEPAIR LATENCY"):
                            self._seen.append((now, text))
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def records(self, breaks: Sequence[float] = ()) -> list[Record]:
        """The records seen so far. ``breaks``: host times at which the guest was resumed
        after a pause (its clock stands still while paused, so each stretch between breaks
        gets its own mapping)."""
        parsed = []
        for seen, text in list(self._seen):
            m = _LATENCY.fullmatch(text)
            if m:
                seq, rec_us, fs_us, at = int(m[1]), int(m[2]), int(m[3]), float(m[4])
                parsed.append((seen, seq, rec_us / 1e6, fs_us / 1e6, at))
        edges = [float("-inf"), *sorted(breaks), float("inf")]
        out = []
        for lo, hi in itertools.pairwise(edges):
            part = [x for x in parsed if lo <= x[0] < hi]
            if not part:
                continue
            offset = min(seen - (at + rec) for seen, _, rec, _, at in part)
            out += [
                Record(seq, rec, fs, at + offset, at + rec + offset) for _, seq, rec, fs, at in part
            ]
        return out

    def lags(self, breaks: Sequence[float] = ()) -> list[float]:
        """Per record, how long after its mapped end its line was seen (sorted): small and
        steady if the guest's clock keeps pace with the host's."""
        ends = {r.seq: r.end for r in self.records(breaks)}
        out = []
        for seen, text in list(self._seen):
            m = _LATENCY.fullmatch(text)
            if m and int(m[1]) in ends:
                out.append(seen - ends[int(m[1])])
        return sorted(out)


# -- other processes on this shared machine -------------------------------------------------------
#: Cores that other processes may use before a latency round waits (the guest paused) for quiet.
QUIET_CORES = 0.25


@dataclasses.dataclass(frozen=True)
class CpuReading:
    at: float
    #: CPU seconds of the whole machine (user, nice, system, irq, softirq: not idle or steal).
    busy: float
    #: CPU seconds of our processes (and their reaped children).
    own: float


def cpu_reading(pids: Sequence[int]) -> CpuReading:
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq
    own = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            c = psutil.Process(pid).cpu_times()
            own += c.user + c.system + c.children_user + c.children_system
    return CpuReading(time.monotonic(), busy, own)


def foreign_cores(a: CpuReading, b: CpuReading) -> float:
    """Cores used between two readings by processes that are not ours (kernel threads
    included: page writeback on our behalf counts as foreign, so this errs high)."""
    return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / max(b.at - a.at, 1e-9)


# -- latency figures -----------------------------------------------------------------------------
def overlaps(r: Record, spans: Sequence[tuple[float, float]]) -> bool:
    return any(r.start <= b and a <= r.end for a, b in spans)


def latency_stats(records: Sequence[Record], seconds: float | None = None) -> dict[str, Any]:
    rec = sorted(r.seconds for r in records)
    fs = sorted(r.fsync_seconds for r in records)
    out: dict[str, Any] = {"records": len(records)}
    if seconds:
        out["records_per_s"] = len(records) / seconds
    for name, values in (("record", rec), ("fsync", fs)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
        out[f"{name}_max"] = values[-1] if values else float("nan")
    return out


# -- timing the qemu backend's cut and release, in the sender's process ----------------------------
#: (what, start, end) on the host's clock: cut and release (the backend calls), and inside them
#: the QMP ``transaction`` (the instant of the cut) and the ``block-commit`` job (the fold).
SPANS: list[tuple[str, float, float]] = []


@contextlib.contextmanager
def _span(what: str) -> Iterator[None]:
    start = time.time()
    try:
        yield
    finally:
        SPANS.append((what, start, time.time()))


def timed_qemu_backend(vm_root: Path) -> Any:
    """A QemuBackend (TCG) whose cuts and releases, and the QMP transaction and block-commit
    inside them, are recorded in :data:`SPANS`. Instrumentation only: the same code runs."""
    from agent.hosts import qemu_monitor
    from agent.hosts.qemu import QemuBackend

    session_cls = qemu_monitor.QmpSession
    if not getattr(session_cls, "_bench_timed", False):
        execute, run_job = session_cls.execute, session_cls.run_job

        def timed_execute(self: Any, command: str, arguments: Any = None) -> Any:
            if command != "transaction":
                return execute(self, command, arguments)
            with _span("transaction"):
                return execute(self, command, arguments)

        def timed_run_job(self: Any, command: str, arguments: Any, *, timeout: float) -> None:
            if command != "block-commit":
                run_job(self, command, arguments, timeout=timeout)
                return
            with _span("block-commit"):
                run_job(self, command, arguments, timeout=timeout)

        session_cls.execute = timed_execute  # type: ignore[method-assign]
        session_cls.run_job = timed_run_job  # type: ignore[method-assign]
        session_cls._bench_timed = True  # type: ignore[attr-defined]

    class TimedQemuBackend(QemuBackend):
        def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Any:
            with _span("cut"):
                return super().take_cut(vm_ref, app_consistent=app_consistent)

        def release_cut(self, vm_ref: str, cut_id: str) -> None:
            with _span("release"):
                super().release_cut(vm_ref, cut_id)

    return TimedQemuBackend(vm_root, accel="tcg", stop_timeout=30)
