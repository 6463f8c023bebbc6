"""Fixtures of the directory-backend tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hosts.directory import DirectoryBackend
from tests.hosts.helpers import DISKS, MiB


@pytest.fixture
def vm_root(tmp_path: Path) -> Path:
    return tmp_path / "vms"


@pytest.fixture
def backend(vm_root: Path) -> DirectoryBackend:
    return DirectoryBackend(vm_root)


@pytest.fixture
def vm(backend: DirectoryBackend) -> str:
    """A VM with a VHDX and a VHD disk (1 MiB VHDX blocks keep the files small)."""
    backend.create_vm("web01", disks=list(DISKS), nics=[("eth0", "prod")], block_size=1 * MiB)
    return "web01"
