"""Application-consistent cuts: the pre- and post-checkpoint hooks (the VSS analog)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.hosts.base import QuiesceFailed
from agent.hosts.directory import DirectoryBackend
from sitepair.errors import FailedPrecondition


def hook(folder: Path, name: str, body: str) -> Path:
    (folder / "hooks").mkdir(exist_ok=True)
    path = folder / "hooks" / name
    path.write_text(body)
    return path


def marker_script(marker: str) -> str:
    return (
        "import os, pathlib\n"
        f"pathlib.Path({marker!r}).write_text(os.environ['SITEPAIR_VM_NAME'] + ' ' "
        "+ os.environ['SITEPAIR_HOOK'])\n"
    )


def test_failing_pre_checkpoint_hook_means_no_cut(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    hook(
        folder,
        "pre-checkpoint.py",
        "import sys\nprint('database refused to freeze')\nsys.exit(3)\n",
    )
    hook(folder, "post-checkpoint.py", marker_script(str(folder / "post.ran")))
    chains = [d.chain for d in backend.read_vm(folder).disks]
    with pytest.raises(QuiesceFailed) as err:  # a FailedPrecondition the loop recognises
        backend.take_cut(vm, app_consistent=True)
    message = str(err.value)
    assert "VM web01: pre-checkpoint hook" in message and "pre-checkpoint.py" in message
    assert "exit code 3" in message and "database refused to freeze" in message
    assert backend.outstanding_cut(vm) is None
    assert [d.chain for d in backend.read_vm(folder).disks] == chains
    assert not (folder / "post.ran").exists()
    # A crash-consistent cut does not run hooks at all.
    assert not backend.take_cut(vm).app_consistent


def test_hooks_run_around_the_cut_and_the_flag_is_recorded(
    backend: DirectoryBackend, vm: str, vm_root: Path
) -> None:
    folder = backend.vm_root / vm
    hook(folder, "pre-checkpoint.py", marker_script(str(folder / "pre.ran")))
    post = hook(
        folder,
        "post-checkpoint",
        f"#!/bin/sh\necho \"$SITEPAIR_VM_ID\" > '{folder / 'post.ran'}'\n",
    )
    post.chmod(0o755)
    cut = backend.take_cut(vm, app_consistent=True)
    assert cut.app_consistent
    assert (folder / "pre.ran").read_text() == "web01 pre-checkpoint"
    assert (folder / "post.ran").read_text().strip() == cut.vm_id
    restarted = DirectoryBackend(vm_root)
    outstanding = restarted.outstanding_cut(vm)
    assert outstanding is not None and outstanding.app_consistent


def test_without_a_hook_the_cut_is_only_crash_consistent(
    backend: DirectoryBackend, vm: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sitepair.agent.directory"):
        cut = backend.take_cut(vm, app_consistent=True)
    assert not cut.app_consistent
    assert "no pre-checkpoint hook" in caplog.text


def test_hook_timeout_and_failing_post_hook(
    vm_root: Path, vm: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = DirectoryBackend(vm_root, hook_timeout=0.5)
    folder = vm_root / vm
    pre = hook(folder, "pre-checkpoint.py", "import time\ntime.sleep(30)\n")
    with pytest.raises(FailedPrecondition, match=r"did not finish within 0\.5 s"):
        backend.take_cut(vm, app_consistent=True)
    assert backend.outstanding_cut(vm) is None
    pre.write_text("pass\n")
    hook(folder, "post-checkpoint.py", "raise SystemExit(1)\n")
    with caplog.at_level(logging.WARNING, logger="sitepair.agent.directory"):
        cut = backend.take_cut(vm, app_consistent=True)
    assert cut.app_consistent  # the guest was quiesced for the cut; only the thaw failed
    assert "post-checkpoint hook failed" in caplog.text
