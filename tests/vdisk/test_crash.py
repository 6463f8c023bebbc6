"""SIGKILL a writer during random writes and flushes: the image must always open, and every
write acknowledged by a completed flush must be there. Writes after the last flush may be
present or not, per sector, but nothing else may change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sitepair.vdisk import create_disk, fileio, open_disk, vhd
from tests.vdisk.crash_writer import plan

REPO = Path(__file__).resolve().parents[2]
SIZE = 64 << 20

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def _kill_writer(image: Path, seed: int, run_for: float) -> tuple[int, int]:
    """Run the writer for about ``run_for`` seconds after its first flush, SIGKILL it, and
    return (writes its last completed flush made durable, writes it started)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vdisk.crash_writer", str(image), str(seed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    durable = started = 0
    while not durable:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "writer died"
        kind, n = line.split()
        started = max(started, int(n))
        if kind == "F":
            durable = int(n)
    deadline = time.monotonic() + run_for
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    os.set_blocking(proc.stdout.fileno(), True)
    for line in proc.stdout.read().splitlines():
        kind, n = line.split()
        started = max(started, int(n))
        if kind == "F":
            durable = int(n)
    proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()
    return durable, started


def _check(image: Path, before: bytes, seed: int, durable: int, started: int) -> bytes:
    writes = plan(seed, SIZE, started)
    expected = bytearray(before)
    for off, length, value in writes[:durable]:
        expected[off : off + length] = bytes([value]) * length
    # Writes after the last flush: their ranges may hold old or new bytes.
    maybe = sorted((off, off + length) for off, length, _ in writes[durable:])
    allowed_extra = {value for _, _, value in writes[durable:]}
    with open_disk(image, read_only=True) as disk:
        got = disk.read(0, SIZE)
    pos = 0
    for start, end in maybe:
        if start > pos:
            assert got[pos:start] == expected[pos:start], f"flushed data lost in [{pos}, {start})"
        pos = max(pos, end)
    assert got[pos:] == expected[pos:], f"flushed data lost after {pos}"
    for start, end in maybe:
        for value in set(got[start:end]):
            assert value in allowed_extra or value in expected[start:end]
    return got


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_sigkill_never_loses_flushed_data(tmp_path: Path, kind: str) -> None:
    _sigkill_rounds(tmp_path, kind, (0.3, 0.8, 0.1, 1.2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_sigkill_many_rounds(tmp_path: Path, kind: str) -> None:
    _sigkill_rounds(tmp_path, kind, tuple(0.05 + 0.17 * (i % 9) for i in range(20)))


def _sigkill_rounds(tmp_path: Path, kind: str, durations: tuple[float, ...]) -> None:
    base = tmp_path / "base.vhd"
    with create_disk(base, format="vhd", subformat="dynamic", size=SIZE, block_size=16 << 10) as d:
        d.write(3 << 20, b"\x5a" * (1 << 20))
    image = base
    if kind == "differencing":
        image = tmp_path / "child.avhd"
        create_disk(
            image, format="vhd", subformat="differencing", parent=base, block_size=16 << 10
        ).close()
    with open_disk(image, read_only=True) as disk:
        state = disk.read(0, SIZE)
    for round_, run_for in enumerate(durations):
        seed = 1000 * round_ + 7
        durable, started = _kill_writer(image, seed, run_for)
        assert durable >= 4
        state = _check(image, state, seed, durable, started)
        # A writable open repairs what the crash left (a torn end footer, unreferenced
        # blocks) without changing the guest view.
        with open_disk(image) as disk:
            assert disk.read(0, SIZE) == state
        with open_disk(image, read_only=True) as disk:
            assert disk.read(0, SIZE) == state
            assert disk.info().details["footer"] == "end of file"


class _Recorder:
    """Records the file operations of an image writer, so any prefix of them (and a torn
    last write) can be replayed into the file a crash at that moment would leave."""

    def __init__(self, image: Path) -> None:
        self.ops: list[tuple[str, int, bytes]] = []
        #: (number of ops done, guest writes made durable so far) at each completed flush.
        self.flushes: list[tuple[int, int]] = []
        # Only the image under test is recorded: os.ftruncate is patched process-wide, and
        # other threads of the test process (left by earlier tests) may truncate their files.
        self._inode = image.stat().st_ino
        self._ftruncate = os.ftruncate

    def _ours(self, fd: int) -> bool:
        return os.fstat(fd).st_ino == self._inode

    def pwrite_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self._ours(fd):
            self.ops.append(("write", offset, bytes(data)))
        fileio.pwrite_all(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._ours(fd):
            self.ops.append(("truncate", length, b""))
        self._ftruncate(fd, length)

    def replay(self, initial: bytes, count: int, *, torn: bool) -> bytes:
        image = bytearray(initial)
        for i, (kind, at, data) in enumerate(self.ops[:count]):
            if kind == "truncate":
                del image[at:]
                image.extend(bytes(max(0, at - len(image))))
                continue
            part = data
            if torn and i == count - 1:
                # Devices write sectors atomically; a longer write can stop between sectors.
                part = data[: max(512, len(data) // 2 // 512 * 512)]
            if len(image) < at + len(part):
                image.extend(bytes(at + len(part) - len(image)))
            image[at : at + len(part)] = part
        return bytes(image)


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_every_crash_point_opens_with_flushed_data(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay every prefix of a writer's file operations (each also with its last write torn
    between sectors, as a power cut inside a multi-sector write would leave it): the image
    opens, keeps every flushed write, and a writable open repairs it to the same guest view.
    Single-sector writes are never torn: devices write a sector atomically, which is all the
    VHD format (and we) rely on."""
    size = 1 << 20
    base = tmp_path / "base.vhd"
    with create_disk(base, format="vhd", subformat="dynamic", size=size, block_size=16 << 10) as d:
        d.write(100_000, b"\x5a" * 70_000)
    image = base
    if kind == "differencing":
        image = tmp_path / "child.avhd"
        create_disk(
            image, format="vhd", subformat="differencing", parent=base, block_size=16 << 10
        ).close()
    initial = image.read_bytes()
    with open_disk(image, read_only=True) as disk:
        before = disk.read(0, size)

    rec = _Recorder(image)
    monkeypatch.setattr(vhd, "pwrite_all", rec.pwrite_all)
    monkeypatch.setattr(os, "ftruncate", rec.ftruncate)
    writes = plan(5, size, 40)
    states = [before]  # guest view after each flush
    model = bytearray(before)
    with open_disk(image) as disk:
        for n, (off, length, value) in enumerate(writes, start=1):
            disk.write(off, bytes([value]) * length)
            model[off : off + length] = bytes([value]) * length
            if n % 5 == 0:
                disk.flush()
                rec.flushes.append((len(rec.ops), n))
                states.append(bytes(model))
    monkeypatch.undo()

    snapshot = tmp_path / ("snap" + image.suffix)
    through_copy = 0
    for count in range(len(rec.ops) + 1):
        last = rec.ops[count - 1] if count else ("", 0, b"")
        for torn in (False, True) if len(last[2]) > 512 else (False,):
            applied = count - 1 if torn else count  # operations fully on disk
            done = [n for ops_done, n in rec.flushes if ops_done <= applied]
            durable = done[-1] if done else 0
            started = min(len(writes), durable + 5)
            snapshot.write_bytes(rec.replay(initial, count, torn=torn))
            expected = bytearray(states[len(done)])
            with open_disk(snapshot, read_only=True) as disk:
                got = disk.read(0, size)
                through_copy += disk.info().details["footer"] != "end of file"
            for off, length, _ in writes[durable:started]:
                # In flight at the crash: may hold old or new bytes.
                expected[off : off + length] = got[off : off + length]
            assert got == expected, (
                f"after {count} operations (torn={torn}): last "
                f"{[(k, a, len(d)) for k, a, d in rec.ops[max(0, count - 3) : count]]}, "
                f"first difference at {next(i for i in range(size) if got[i] != expected[i])}"
            )
            with open_disk(snapshot) as disk:
                assert disk.read(0, size) == got
            with open_disk(snapshot, read_only=True) as disk:
                assert disk.read(0, size) == got
                assert disk.info().details["footer"] == "end of file"
            snapshot.unlink()
    assert through_copy, "no crash point exercised the footer copy"
