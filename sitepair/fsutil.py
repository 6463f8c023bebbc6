"""Durable, atomic file updates and private files, portable between Linux and Windows.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the
target with ``os.replace`` and (on POSIX) fsyncs the folder, so a crash leaves either the old or
the new content, never a torn file. Private files (keys, secrets) are created with mode 0600 from
the start, never chmod'ed after being written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename, creation or removal inside the folder ``path`` durable.

    The one rule for every caller (the agent, the replica store, :mod:`sitepair.vdisk`): an
    error is raised, never swallowed, because a rename that is not durable breaks the crash
    safety built on it. The exceptions are where a folder cannot be fsync'd at all: Windows
    (no such call; NTFS journals the change), and a file system that answers ``EINVAL`` to an
    fsync of a folder (some network and FUSE file systems), where there is nothing more to do.
    """
    if sys.platform == "win32":  # pragma: no cover - Windows only
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically and durably; ``private`` makes it mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if private:
            tmp.chmod(0o600)
        elif sys.platform != "win32":
            tmp.chmod(0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sys.platform != "win32":
        path.chmod(0o700)
    return path


def private_file(path: Path) -> None:
    """Make an existing file the process owner's alone (0600; a no-op on Windows, where the
    folder's ACL decides). For files created by a library that cannot take a mode, before
    anything secret is written to them."""
    if sys.platform != "win32":
        path.chmod(0o600)
