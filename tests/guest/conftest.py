"""The guest tests need QEMU and the image-building tools; without them the whole folder is
skipped with the list of what is missing. The image is built once per session (and cached
between sessions, see tests/support/guest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.guest import GuestImage, missing_tools


def _skip_if_missing() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"guest tests need {', '.join(missing)}; scripts/setup.sh installs them on Debian"
        )


@pytest.fixture(autouse=True)
def _needs_qemu() -> None:
    _skip_if_missing()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    _skip_if_missing()
    return GuestImage.build()


@pytest.fixture
def disks(guest_image: GuestImage, tmp_path: Path) -> tuple[Path, Path]:
    """Fresh copies of the boot and data disks for one test."""
    return guest_image.copy_disks(tmp_path / "disks")
