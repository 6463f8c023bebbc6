"""Fixtures shared by the virtual-disk tests."""

from __future__ import annotations

import pytest

from sitepair.vdisk import vhdx_available


@pytest.fixture
def needs_vhdx() -> None:
    """Skip a test that needs the VHDX implementation where this tree does not have it."""
    if not vhdx_available():
        pytest.skip("sitepair.vdisk.vhdx is not available in this tree")
