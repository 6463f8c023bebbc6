"""Workloads that write known data into VMs and can prove what any copy must hold.

A :class:`Writer` writes into a running VM through the host backend, like a guest: 4 KiB
aligned writes, each 4 KiB chunk starting with a tag (magic, write number, chunk number) followed
by seeded bytes (half random, half text, so compression has something to do). It logs every
write that completed, in order.

Because every chunk names the write that put it there, any copy of the disks (a replica, a
recovery point, a failed-over VM) can be checked against the log without knowing when its cut
was taken: :func:`check_prefix` reads only the chunks the log covers, finds the newest write the
copy shows, and verifies the copy is *exactly* the state after the first k writes, for that k:
every chunk holds the last write at or before k that covered it, nothing newer, nothing torn.
That is "the replica is always one committed point in time" made checkable.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.hosts.directory import DirectoryBackend
from sitepair import vdisk
from sitepair.errors import FailedPrecondition

CHUNK = 4096
MAGIC = b"SPWL"
_TAG = struct.Struct("<4sQI")  # magic, write number (1-based), chunk index within the write
_TEXT = b"sitepair harness workload: the quick brown fox jumps over the lazy dog. " * 64


def chunk_bytes(seed: int, write_no: int, chunk_no: int) -> bytes:
    rng = random.Random((seed << 40) ^ (write_no << 12) ^ chunk_no)
    body_len = CHUNK - _TAG.size
    half = body_len // 2
    body = rng.randbytes(half) + _TEXT[: body_len - half]
    return _TAG.pack(MAGIC, write_no, chunk_no) + body


@dataclasses.dataclass(frozen=True)
class WriteRecord:
    no: int
    disk: str
    offset: int
    length: int
    started: float
    done: float


class WriteLog:
    """The append-only log of completed writes (JSON lines), readable while it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, rec: WriteRecord) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(rec)) + "\n")

    def records(self) -> list[WriteRecord]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                out.append(WriteRecord(**json.loads(line)))
        return out


class Writer(threading.Thread):
    """A guest writing into a VM at a target rate until stopped or the VM is powered off."""

    def __init__(
        self,
        backend: DirectoryBackend,
        vm: str,
        log: WriteLog,
        *,
        seed: int,
        disks: dict[str, int],
        rate: float = 200.0,
        first_no: int = 1,
        max_chunks: int = 16,
    ) -> None:
        super().__init__(daemon=True, name=f"writer-{vm}")
        self.backend, self.vm, self.log = backend, vm, log
        self.seed = seed
        self.disks = disks  # disk id -> virtual size
        self.rate = rate
        self.next_no = first_no
        self.max_chunks = max_chunks
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.powered_off = False

    @property
    def written(self) -> int:
        return self.next_no - 1

    def run(self) -> None:
        try:
            with self.backend.open_writer(self.vm, running_only=True) as w:
                interval = 1.0 / self.rate if self.rate > 0 else 0.0
                while not self.stop_event.is_set():
                    disk = self.rng.choice(sorted(self.disks))
                    chunks = self.rng.randint(1, self.max_chunks)
                    size = self.disks[disk]
                    offset = self.rng.randrange(0, size // CHUNK - chunks + 1) * CHUNK
                    no = self.next_no
                    data = b"".join(chunk_bytes(self.seed, no, c) for c in range(chunks))
                    started = time.time()
                    try:
                        w.write(disk, offset, data)
                    except FailedPrecondition:
                        self.powered_off = True
                        return
                    self.log.append(WriteRecord(no, disk, offset, len(data), started, time.time()))
                    self.next_no += 1
                    if interval:
                        self.stop_event.wait(interval)
        except BaseException as exc:
            self.error = exc
        finally:
            self.stopped.set()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.stopped.wait(timeout)


@dataclasses.dataclass
class PrefixCheck:
    ok: bool
    prefix: int  # the k the copy shows (0 = none of the logged writes)
    chunks_checked: int
    problems: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _chunks(records: list[WriteRecord], disk: str) -> Iterator[tuple[int, int, int]]:
    """(chunk offset, write number, chunk index) for every chunk of every write, in order."""
    for r in records:
        if r.disk != disk:
            continue
        for c in range(r.length // CHUNK):
            yield r.offset + c * CHUNK, r.no, c


def check_prefix(copy: dict[str, Path], records: list[WriteRecord], *, seed: int) -> PrefixCheck:
    """Is ``copy`` (disk id -> top layer of a chain) exactly the state after some prefix of
    ``records``? Reads only the chunks the log covers."""
    problems: list[str] = []
    seen: dict[tuple[str, int], tuple[int, int]] = {}  # (disk, chunk offset) -> (write, chunk)
    expected_at: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for disk in copy:
        for off, no, c in _chunks(records, disk):
            expected_at.setdefault((disk, off), []).append((no, c))
    checked = 0
    newest = 0
    for disk, top in copy.items():
        with vdisk.open_disk(top, read_only=True) as d:
            for dk, off in sorted(k for k in expected_at if k[0] == disk):
                data = d.read(off, CHUNK)
                checked += 1
                if data[:4] == MAGIC:
                    _, no, c = _TAG.unpack_from(data)
                    if data != chunk_bytes(seed, no, c):
                        problems.append(f"{dk}@{off}: a torn or foreign chunk claims write {no}")
                        continue
                    seen[(dk, off)] = (no, c)
                    newest = max(newest, no)
                elif data != bytes(CHUNK):
                    problems.append(f"{dk}@{off}: neither zeros nor a workload chunk")
                else:
                    seen[(dk, off)] = (0, 0)
    # The copy must be exactly prefix(newest): each chunk shows the last write <= newest.
    for key, history in expected_at.items():
        want = (0, 0)
        for no, c in history:
            if no <= newest:
                want = (no, c)
        got = seen.get(key)
        if got is not None and got != want:
            problems.append(
                f"{key[0]}@{key[1]}: shows write {got[0]}, but the state after write {newest} "
                f"holds write {want[0]} there (not a single point in time)"
            )
    return PrefixCheck(
        ok=not problems, prefix=newest, chunks_checked=checked, problems=problems[:20]
    )


def completed_before(records: list[WriteRecord], t: float) -> int:
    """How many writes had completed before time ``t`` (the log is in order)."""
    n = 0
    for r in records:
        if r.done <= t:
            n = r.no
    return n
