"""Advisory whole-file locks so two processes never write the same image at once.

A writable open takes an exclusive lock, a read-only open a shared one; a conflicting open fails
at once with a :class:`VirtualDiskError` that names the file instead of waiting. On Linux this is
``flock`` (independent of the OFD locks qemu takes, so qemu-img can still read our images in
tests); on Windows, ``msvcrt.locking`` on the first byte, which only supports exclusive locks, so
read-only opens there take no lock (Windows itself refuses a second writer through share modes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sitepair.errors import VirtualDiskError


def lock_file(fd: int, path: Path, *, exclusive: bool) -> None:
    """Lock ``fd`` (an open descriptor of ``path``) or raise VirtualDiskError if it is in use."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        if not exclusive:
            return
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            raise VirtualDiskError(
                f"{path}: the image is in use by another process",
                hint="stop the process that has it open, or open it read-only",
            ) from exc
        return
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        wanted = "for writing" if exclusive else "for reading"
        raise VirtualDiskError(
            f"{path}: cannot be opened {wanted}: another process has it open",
            hint="stop the process that has it open (a running VM, a replication cycle), "
            "or open it read-only",
        ) from exc
