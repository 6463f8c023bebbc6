"""VHDX parent locator paths (2.6.2.6): this machine's paths to locator entries and back.

A differencing VHDX names its parent with ``relative_path`` (relative to the child's folder,
backslashes as separators), ``volume_path`` and ``absolute_win32_path``. :func:`locator_path`
turns one entry into a path on this machine where it can be one; :func:`parent_locator_entries`
writes the entries sitepair stores for a parent.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath

from sitepair.vdisk.vhdx_format import guid_text

__all__ = ["locator_path", "parent_locator_entries"]


def locator_path(value: str, child_dir: Path, *, relative: bool) -> Path | None:
    """A parent locator path as a path on this machine, or None if it cannot be one here."""
    if relative:
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
        return child_dir.joinpath(*parts) if parts else None
    text = value
    for prefix in ("\\\\?\\", "\\??\\"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return Path(text)
    posix = text.replace("\\", "/")
    if PureWindowsPath(text).drive or not posix.startswith("/"):
        return None  # a drive letter, UNC share or volume GUID path: not on this machine
    return Path(posix)


def _absolute_win32_path(path: Path) -> str:
    """``\\\\?\\d:\\dir\\file.vhdx`` on Windows; on POSIX the absolute path with backslashes
    after the same prefix (``\\\\?\\\\dir\\file.vhdx``), which we map back when resolving."""
    absolute = path.resolve()
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return "\\\\?\\" + str(absolute)
    return "\\\\?\\" + str(absolute).replace("/", "\\")


def _relative_path(target: Path, start_dir: Path) -> str:
    rel = os.path.relpath(target.resolve(), start_dir.resolve())
    parts = PurePosixPath(rel.replace(os.sep, "/")).parts
    if parts and parts[0] not in ("..", "."):
        parts = (".", *parts)
    return "\\".join(parts)


def parent_locator_entries(child: Path, parent: Path, linkage: uuid.UUID) -> dict[str, str]:
    """The locator entries of ``child`` naming ``parent`` (whose DataWriteGuid is ``linkage``)."""
    return {
        "parent_linkage": guid_text(linkage),
        "relative_path": _relative_path(parent, child.parent),
        "absolute_win32_path": _absolute_win32_path(parent),
    }
