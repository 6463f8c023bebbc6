"""VHD parent locator paths: a locator's text as a path on this machine, and the relative text
sitepair writes (W2ru, relative to the child's folder with backslashes; W2ku is absolute)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from sitepair.vdisk import vhd_layout as L

__all__ = ["locator_to_path", "relative_locator"]


def locator_to_path(text: str, base: Path, platform: int) -> Path | None:
    """A locator's path on this system, or ``None`` if it cannot name a file here."""
    if not text:
        return None
    if platform == L.PLATFORM_W2RU:
        parts = PureWindowsPath(text).parts if "\\" in text else PurePosixPath(text).parts
        if PureWindowsPath(text).is_absolute() or PurePosixPath(text).is_absolute():
            return None
        return base.joinpath(*parts) if parts else None
    # W2ku: absolute. A Windows path ("C:\\...") only means something on Windows; ours on a
    # POSIX host is a POSIX absolute path.
    if os.name == "nt":  # pragma: no cover - Windows only
        return Path(text) if PureWindowsPath(text).is_absolute() else None
    posix = text.replace("\\", "/") if not PureWindowsPath(text).drive else None
    if posix is None or not posix.startswith("/"):
        return None
    return Path(posix)


def relative_locator(parent: Path, child: Path) -> str | None:
    """The W2ru text for ``parent`` seen from ``child``'s folder (".\\name" style), or None
    where no relative path exists (different Windows drives)."""
    try:
        rel = os.path.relpath(parent.absolute(), child.absolute().parent)
    except ValueError:  # pragma: no cover - Windows: different drives
        return None
    rel = rel.replace(os.sep, "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    return rel
