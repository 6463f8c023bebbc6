"""sitepair.fsutil: durable folder updates raise their errors, except where unsupported."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from sitepair.fsutil import fsync_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no folder fsync on Windows")


def test_fsync_dir_raises_when_the_folder_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


def test_fsync_dir_raises_an_io_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        fsync_dir(tmp_path)


def test_fsync_dir_accepts_a_file_system_that_cannot_sync_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", unsupported)
    fsync_dir(tmp_path)  # nothing to do there, and nothing to report
