"""Small filesystems for "the replica's disk is full" faults.

``small_filesystem(path, size)`` mounts a size-limited filesystem on ``path`` for the duration
of a ``with`` block and unmounts it on exit, also after an exception:

``tmpfs``
    ``mount -t tmpfs -o size=N``: in memory, instant, exact size.
``ext4``
    a sparse image file next to the mount point, ``mkfs.ext4 -m 0`` (no root reserve, so "full"
    means full for root too) and ``mount -o loop``: a real block filesystem with a journal, for
    faults where the filesystem's own behaviour on ENOSPC matters. The loop device is released
    by the unmount (autoclear) and the image is deleted.

Both need root (mounting is privileged). Without it, :func:`small_filesystem_unavailable` gives
the reason and :func:`small_filesystem` raises :class:`FilesystemUnavailable` carrying it, so a
scenario can skip the fault with that reason. There is no unprivileged fallback that other
processes would see as a full disk: a user namespace's mounts are invisible to the agents.

Mount points whose name starts with ``sp-`` can be swept after a crashed run with
:func:`cleanup_stale_mounts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

FsKind = Literal["tmpfs", "ext4"]

log = logging.getLogger("sitepair.harness.fs")

#: The smallest image mkfs.ext4 makes a usable filesystem from (with its journal).
EXT4_MIN_BYTES = 4 << 20


class FilesystemUnavailable(RuntimeError):
    """A small filesystem cannot be made here; the message is the reason (for a skip)."""


@dataclasses.dataclass(frozen=True)
class SmallFilesystem:
    """A mounted, size-limited filesystem."""

    #: Where it is mounted.
    path: Path
    #: The size asked for, in bytes (usable space is a little less for ext4: metadata).
    size: int
    kind: FsKind
    #: The ext4 image file (None for tmpfs).
    image: Path | None = None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free


def small_filesystem_unavailable(kind: FsKind = "tmpfs") -> str | None:
    """Why a ``kind`` filesystem cannot be mounted here, or None when it can."""
    if not hasattr(os, "geteuid") or not Path("/proc/self/mounts").exists():
        return "size-limited filesystems need Linux"
    if os.geteuid() != 0:
        return "mounting a size-limited filesystem needs root (run the harness as root)"
    tools = ["mount", "umount"] + (["mkfs.ext4"] if kind == "ext4" else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install mount e2fsprogs)"
    if kind == "ext4" and not any(Path("/dev").glob("loop*")):
        return "no loop devices in /dev (mount -o loop needs /dev/loop-control)"
    return None


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise FilesystemUnavailable(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {detail}")


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (from /proc/self/mounts, which ``ismount`` can miss)."""
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and _unescape(fields[1]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def unmount(path: Path) -> None:
    """Unmount ``path``; retry while busy, then detach it lazily (and say so) as a last resort."""
    deadline = time.monotonic() + 5
    while mounted(path):
        proc = subprocess.run(
            ["umount", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            log.warning(
                "filesystem still busy; detached lazily",
                extra={"fields": {"path": str(path), "error": proc.stderr.strip()}},
            )
            _run(["umount", "-l", str(path)])
            return
        time.sleep(0.1)


@contextlib.contextmanager
def small_filesystem(path: Path, size: int, *, kind: FsKind = "tmpfs") -> Iterator[SmallFilesystem]:
    """Mount a ``size``-byte ``kind`` filesystem on ``path`` (created, must be empty).

    Unmounted on exit, also after an exception; the ext4 image is deleted.
    """
    reason = small_filesystem_unavailable(kind)
    if reason:
        raise FilesystemUnavailable(reason)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if kind == "ext4" and size < EXT4_MIN_BYTES:
        raise ValueError(f"an ext4 image needs at least {EXT4_MIN_BYTES} bytes, got {size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if mounted(path) or any(path.iterdir()):
        raise FilesystemUnavailable(f"{path} is already a mount point or not empty")
    image: Path | None = None
    try:
        if kind == "tmpfs":
            _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)])
        else:
            image = path.with_name(path.name + ".ext4.img")
            with image.open("wb") as f:
                f.truncate(size)
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(image)])
            _run(["mount", "-o", "loop", str(image), str(path)])
        yield SmallFilesystem(path=path, size=size, kind=kind, image=image)
    finally:
        unmount(path)
        if image is not None:
            with contextlib.suppress(OSError):
                image.unlink()


def cleanup_stale_mounts(prefix: str = "sp-") -> list[Path]:
    """Unmount filesystems left by a crashed run: mount points whose name starts with ``prefix``.

    Only tmpfs and ext4 mounts are considered, so nothing else that happens to share the name
    is touched. Returns the mount points unmounted.
    """
    if not prefix:
        raise ValueError("an empty prefix would match every mount")
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] in ("tmpfs", "ext4"):
                target = Path(_unescape(fields[1]))
                if target.name.startswith(prefix):
                    found.append(target)
    for target in reversed(found):  # the most recent (innermost) first
        unmount(target)
    return found
