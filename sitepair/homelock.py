"""One process per home: an exclusive OS lock on ``<home>/run/home.lock``, held for life.

Two brokers on one broker home, or two agents on one agent home, undo each other: a second
``sitepair-broker serve`` used to mark every host disconnected before it failed to bind (or, on
port 0, became a second leader on the same SQLite file and deleted the first one's run file on
exit), and two ``sitepair-agent run`` stole the control stream from each other forever. So each
process that owns a home takes this lock before it opens or changes anything in it, and a second
one refuses with :class:`~sitepair.errors.FailedPrecondition` and changes nothing.

Decisions:

* The lock is the operating system's, not the file's existence. A process that dies, however it
  dies (SIGKILL, power loss of a VM host), loses its locks with its file descriptors, so a lock
  file left by a crash never blocks the next start and no one has to delete it. For the same
  reason the file is never deleted: a process could otherwise lock a file that has just been
  unlinked while the next one locks a new file of the same name.
* POSIX uses ``fcntl.flock``, not ``lockf``/``fcntl`` record locks: flock locks belong to the
  open file description, so closing some other descriptor of the same file does not drop them,
  and a second acquire within one process is refused like one from another process.
* Acquiring never waits: a second process refuses at once, naming the home and, where it can
  read it, the holder's PID and role ("sitepair-broker serve"). The holder writes those into the
  file only after it holds the lock (truncating before that would erase the holder's PID), and
  empties the file again when it lets go. The content is advice for the operator, trusted for
  nothing else.
* The descriptor is not inheritable (PEP 446) and sitepair never forks, so a child process (a
  script the agent runs) cannot keep a home locked after its parent has died.
* The lock is per home, never per store: several brokers of one vault on *different* homes share
  one PostgreSQL database legitimately.
* Windows uses ``msvcrt.locking``. Its byte-range locks are mandatory (reading locked bytes
  fails), so the locked byte lies far beyond the content and the PID stays readable. That branch
  is exercised on Windows only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from types import TracebackType

from sitepair.errors import FailedPrecondition

#: Where the lock lives, relative to the home (``run/`` also holds the broker's run file).
LOCK_FILE = Path("run") / "home.lock"

#: Windows only: the byte that is locked, far beyond the few bytes of content.
_WINDOWS_LOCK_OFFSET = 1 << 30

_HINT = "stop the other process, or use another --home"


def lock_path(home: Path) -> Path:
    """The lock file of ``home``."""
    return Path(home) / LOCK_FILE


class HomeLock:
    """An exclusive lock on one home, held by this process until :meth:`release`.

    Use :meth:`acquire`; ``with HomeLock.acquire(...)`` releases on exit.
    """

    def __init__(self, home: Path, path: Path, fd: int) -> None:
        self.home = home
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, home: Path, *, what: str, holder: str) -> HomeLock:
        """Lock ``home`` or raise :class:`FailedPrecondition` at once (never waits).

        ``what`` names the home in messages ("broker home"); ``holder`` says what this process
        is ("sitepair-agent run"), for the message another process shows when it is refused.
        The home must exist; its ``run/`` folder is created if needed.
        """
        home = Path(home)
        path = lock_path(home)
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"{what} {home} does not exist") from exc
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot open the lock file of {what} {home}: {exc.strerror or exc}",
                hint="run as the user that owns the home",
            ) from exc
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if not _is_contention(exc):
                raise FailedPrecondition(
                    f"cannot lock {what} {home}: {exc.strerror or exc}",
                    hint="keep the home on a local file system that supports file locks",
                ) from exc
            raise FailedPrecondition(
                f"{what} {home} is in use by {_describe_holder(home)}", hint=_HINT
            ) from None
        # Ours now: replace whatever a previous holder (perhaps a crashed one) left.
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n{holder}\n".encode())
        except OSError:
            # The PID is advice for the operator; the lock holds without it.
            pass
        return cls(home, path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the file and let the lock go. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        # Closing the descriptor would release the lock too; unlocking first does not depend on
        # that (Windows documents the release at close as happening "eventually").
        with contextlib.suppress(OSError):
            _unlock(fd)
        os.close(fd)

    close = release

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_holder(home: Path) -> tuple[int | None, str]:
    """The PID and role the current holder wrote into ``home``'s lock file, where readable.

    ``(None, "")`` when the file is missing, empty (no holder, or one that has just started) or
    unreadable. A PID here is not proof the process still runs: a crashed holder leaves its PID.
    """
    try:
        with lock_path(home).open("rb") as f:
            text = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None, ""
    lines = text.splitlines()
    try:
        pid = int(lines[0]) if lines else None
    except ValueError:
        pid = None
    role = lines[1].strip() if len(lines) > 1 else ""
    return pid, role


def _describe_holder(home: Path) -> str:
    pid, role = read_holder(home)
    if pid is None:
        return "another process"
    return f"another process (pid {pid}: {role})" if role else f"another process (pid {pid})"


if sys.platform == "win32":  # pragma: no cover - Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    def _is_contention(exc: OSError) -> bool:
        # LK_NBLCK fails with EACCES (or EDEADLOCK) when another process holds the byte.
        return exc.errno in (errno.EACCES, errno.EDEADLOCK)

else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _is_contention(exc: OSError) -> bool:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
