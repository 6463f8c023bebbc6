"""The cross-process lock of one VM folder: writers share it, checkpoints and merges hold it alone.

Two files in the VM folder::

    vm.lock       the reader/writer lock itself, and a 64-byte header every party reads with
                  one ``pread``: magic, generation, request, done (little-endian u64 each)
    vm.ops.lock   held exclusively by the backend for the whole of one exclusive operation
                  (checkpoint, merge, recovery); whoever holds it is alive, because the
                  operating system drops a lock when its process dies

The header fields:

``generation``
    Raised by every operation that changes a disk chain, *before* ``vm.json`` changes. A writer
    remembers the generation it opened its disks under; once it holds the shared lock again it
    compares, and rereads ``vm.json`` when the number moved.
``request`` / ``done``
    The backend raises ``request`` before it waits for the exclusive lock and sets ``done`` to
    the same value when it lets go. ``request != done`` means "an exclusive operation wants the
    disks": writers then close their disks and release the shared lock (a writer's watcher
    thread notices within a few milliseconds, even when the writer is idle), and do not take
    the shared lock again until ``done`` catches up. That also keeps a stream of writers from
    starving the checkpoint, which ``flock`` alone would allow. If the backend died in the
    middle (``vm.ops.lock`` is free although ``request != done``), writers go on: the next
    operation of the backend finishes or undoes what the dead one left (see
    :mod:`agent.hosts.directory`).

Why writers close their disks rather than just pause: a writer holds its active layer open for
writing, which :mod:`sitepair.vdisk` locks exclusively and whose metadata (VHDX BAT, VHD BAT)
is only in the writer's memory until a flush. A checkpoint must read that layer and create a
child of it, so every writer flushes and closes first.

On POSIX the locks are ``flock`` locks (per open file description, so two threads of one
process exclude each other as two processes do). On Windows, ``msvcrt.locking`` offers only
exclusive byte-range locks: a shared holder locks one of :data:`_WIN_SLOTS` bytes and an
exclusive holder locks all of them. That path is exercised on Windows only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sitepair.errors import Unavailable
from sitepair.vdisk.fileio import O_BINARY, pread, pwrite_all

LOCK_NAME = "vm.lock"
OPS_LOCK_NAME = "vm.ops.lock"
_MAGIC = b"SPVMLOCK"
_HEADER = struct.Struct("<8sQQQ")  # magic, generation, request, done
_GENERATION_AT, _REQUEST_AT, _DONE_AT = 8, 16, 24
#: Windows: offset and count of the lock slots (beyond the header, since Windows byte-range
#: locks are mandatory and would otherwise block reading it).
_WIN_BASE = 4096
_WIN_SLOTS = 64


@dataclasses.dataclass(frozen=True)
class LockState:
    generation: int
    request: int
    done: int

    @property
    def requested(self) -> bool:
        """An exclusive operation asked for the disks and has not finished."""
        return self.request != self.done


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)


class _Lock:
    """One open file description of a lock file, locked shared or exclusive, or not at all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _open(path)
        self._win_slot: int | None = None
        self.held = ""

    def try_lock(self, *, exclusive: bool) -> bool:
        assert not self.held, "lock already held through this descriptor"
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            ok = self._win_try(exclusive=exclusive)
        else:
            import fcntl

            try:
                fcntl.flock(
                    self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
                )
                ok = True
            except BlockingIOError:
                ok = False
        if ok:
            self.held = "exclusive" if exclusive else "shared"
        return ok

    def unlock(self) -> None:
        if not self.held:
            return
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            self._win_unlock()
        else:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.held = ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.unlock()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only

        def _win_try(self, *, exclusive: bool) -> bool:
            """Windows only: shared = one slot byte, exclusive = every slot byte."""
            import msvcrt

            if exclusive:
                os.lseek(self.fd, _WIN_BASE, os.SEEK_SET)
                try:
                    msvcrt.locking(self.fd, msvcrt.LK_NBLCK, _WIN_SLOTS)
                except OSError:
                    return False
                self._win_slot = -1
                return True
            start = os.getpid() % _WIN_SLOTS
            for i in range(_WIN_SLOTS):
                slot = (start + i) % _WIN_SLOTS
                os.lseek(self.fd, _WIN_BASE + slot, os.SEEK_SET)
                try:
                    msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
                except OSError:
                    continue
                self._win_slot = slot
                return True
            return False

        def _win_unlock(self) -> None:
            """Windows only."""
            import msvcrt

            slot = self._win_slot
            self._win_slot = None
            if slot is None:
                return
            if slot < 0:
                os.lseek(self.fd, _WIN_BASE, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, _WIN_SLOTS)
            else:
                os.lseek(self.fd, _WIN_BASE + slot, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)


def _backoff(attempt: int) -> float:
    """Sleep between polls of a lock: 0.5 ms growing to 10 ms."""
    return float(min(0.0005 * (2 ** min(attempt, 5)), 0.01))


class VmLockFile:
    """``vm.lock`` of one VM folder, opened by one party (a writer or one backend operation)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._lock = _Lock(self.path)
        # Header I/O goes through its own descriptor: on Windows the locking calls move the
        # lock descriptor's file position.
        self._header_fd = _open(self.path)
        self._ops_path = folder / OPS_LOCK_NAME

    def close(self) -> None:
        self._lock.close()
        with contextlib.suppress(OSError):
            os.close(self._header_fd)

    @property
    def held(self) -> str:
        return self._lock.held

    # -- header ----------------------------------------------------------------------------
    def state(self) -> LockState:
        raw = pread(self._header_fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size:
            return LockState(0, 0, 0)
        _magic, generation, request, done = _HEADER.unpack(raw)
        return LockState(generation, request, done)

    def _put(self, offset: int, value: int) -> None:
        if pread(self._header_fd, 8, 0) != _MAGIC:
            pwrite_all(self._header_fd, _HEADER.pack(_MAGIC, 0, 0, 0), 0)
        pwrite_all(self._header_fd, struct.pack("<Q", value), offset)

    # -- writers' side ---------------------------------------------------------------------
    def backend_busy(self) -> bool:
        """True while some process holds ``vm.ops.lock`` (an exclusive operation is running)."""
        probe = _Lock(self._ops_path)
        try:
            if probe.try_lock(exclusive=False):
                probe.unlock()
                return False
            return True
        finally:
            probe.close()

    def acquire_shared(self, *, stop: Callable[[], bool] | None = None) -> LockState:
        """Take the shared lock once no live exclusive operation wants the disks, and return
        the header as seen while holding it. Waits as long as the backend is alive and busy;
        ``stop`` (checked while waiting) aborts with :class:`Unavailable`."""
        attempt = 0
        while True:
            st = self.state()
            if not (st.requested and self.backend_busy()) and self._lock.try_lock(exclusive=False):
                st = self.state()
                if not (st.requested and self.backend_busy()):
                    return st
                self._lock.unlock()
            if stop is not None and stop():
                raise Unavailable(f"{self.path}: gave up waiting for the VM's disks")
            time.sleep(_backoff(attempt))
            attempt += 1

    def release(self) -> None:
        self._lock.unlock()


class ExclusiveSection:
    """What an exclusive operation may do while it holds the VM: raise the generation."""

    def __init__(self, lock: VmLockFile) -> None:
        self._lock = lock

    @property
    def path(self) -> Path:
        return self._lock.path

    def bump_generation(self) -> int:
        """Raise the chain generation (before ``vm.json`` changes, so that a writer can never
        miss a change); returns the new value."""
        new = self._lock.state().generation + 1
        self._lock._put(_GENERATION_AT, new)
        return new


_PROCESS_GATES: dict[Path, threading.Lock] = {}
_GATES_GUARD = threading.Lock()


def _process_gate(folder: Path) -> threading.Lock:
    """One in-process lock per VM folder, so threads of one backend queue in order rather than
    polling the ops lock against each other."""
    key = folder.resolve()
    with _GATES_GUARD:
        gate = _PROCESS_GATES.get(key)
        if gate is None:
            gate = _PROCESS_GATES[key] = threading.Lock()
        return gate


@contextlib.contextmanager
def operations_lock(folder: Path) -> Iterator[None]:
    """Hold ``vm.ops.lock`` exclusively: serialises the backend's own updates of one VM
    (``vm.json``, ``changes/cuts.json``) across threads and processes, without touching the
    writers."""
    gate = _process_gate(folder)
    with gate:
        ops = _Lock(folder / OPS_LOCK_NAME)
        try:
            attempt = 0
            while not ops.try_lock(exclusive=True):
                time.sleep(_backoff(attempt))
                attempt += 1
            yield
        finally:
            ops.close()


@contextlib.contextmanager
def exclusive(folder: Path, *, what: str, timeout: float) -> Iterator[ExclusiveSection]:
    """Hold the VM alone: the operations lock, then ``vm.lock`` exclusively once every writer
    has closed its disks (they are asked through ``request``). ``timeout`` bounds the wait for
    the writers; ``what`` names the VM in the error."""
    with operations_lock(folder):
        lock = VmLockFile(folder)
        try:
            request = lock.state().request + 1
            lock._put(_REQUEST_AT, request)
            try:
                deadline = time.monotonic() + timeout
                attempt = 0
                while not lock._lock.try_lock(exclusive=True):
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"{what}: a writer did not release the VM's disks within "
                            f"{timeout:g} s (lock file {lock.path})",
                            hint="a process writing the VM's disks is stopped or hung; "
                            "resume or stop it and try again",
                        )
                    time.sleep(_backoff(attempt))
                    attempt += 1
                yield ExclusiveSection(lock)
            finally:
                lock._put(_DONE_AT, request)
        finally:
            lock.close()
