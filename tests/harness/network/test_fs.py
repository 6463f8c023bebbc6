"""Size-limited filesystems fill up with ENOSPC and are unmounted afterwards."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.network.fs import (
    FilesystemUnavailable,
    FsKind,
    cleanup_stale_mounts,
    mounted,
    small_filesystem,
    small_filesystem_unavailable,
)


def require(kind: FsKind) -> None:
    reason = small_filesystem_unavailable(kind)
    if reason:
        pytest.skip(reason)


def fill(folder: Path) -> tuple[int, OSError]:
    """Write until the filesystem refuses; returns the bytes written and the refusal."""
    written = 0
    block = os.urandom(64 * 1024)
    with (folder / "replica.vhdx").open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
                os.fsync(f.fileno())  # ext4 may accept into the page cache and refuse at writeback
            except OSError as exc:
                return written, exc


@pytest.mark.root
@pytest.mark.parametrize(("kind", "size"), [("tmpfs", 1 << 20), ("ext4", 8 << 20)])
def test_small_filesystem_fills_up_with_enospc(tmp_path: Path, kind: FsKind, size: int) -> None:
    require(kind)
    mount_point = tmp_path / "sp-test-replica"
    with small_filesystem(mount_point, size, kind=kind) as small:
        assert mounted(mount_point)
        assert small.free_bytes() <= size
        written, refusal = fill(mount_point)
        assert refusal.errno == errno.ENOSPC
        assert 0 < written <= size
        assert small.free_bytes() < 64 * 1024
        image = small.image
    assert not mounted(mount_point)
    assert mount_point.is_dir() and not any(mount_point.iterdir())  # the data went with it
    if kind == "ext4":
        assert image is not None and not image.exists()


@pytest.mark.root
def test_unmounted_after_an_exception_and_stale_mounts_swept(tmp_path: Path) -> None:
    require("tmpfs")
    mount_point = tmp_path / "sp-test-boom"
    with pytest.raises(RuntimeError, match="boom"), small_filesystem(mount_point, 1 << 20):
        raise RuntimeError("boom")
    assert not mounted(mount_point)

    crashed = tmp_path / f"sp-stale{os.getpid():x}-disk"  # what a killed run leaves mounted
    crashed.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(crashed)], check=True)
    try:
        assert cleanup_stale_mounts(f"sp-stale{os.getpid():x}-") == [crashed]
        assert not mounted(crashed)
    finally:
        if mounted(crashed):
            subprocess.run(["umount", str(crashed)])


def test_refuses_a_busy_or_used_mount_point(tmp_path: Path) -> None:
    require("tmpfs")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_bytes(b"x")
    with (
        pytest.raises(FilesystemUnavailable, match="not empty"),
        small_filesystem(tmp_path / "used", 1 << 20),
    ):
        pass
    with (
        pytest.raises(ValueError, match="at least"),
        small_filesystem(tmp_path / "tiny", 1 << 20, kind="ext4"),
    ):
        pass


def test_without_root_the_reason_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = small_filesystem_unavailable("ext4")
    assert reason is not None and "root" in reason
    with pytest.raises(FilesystemUnavailable, match="root"), small_filesystem(tmp_path / "x", 1):
        pass
