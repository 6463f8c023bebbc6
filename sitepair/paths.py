"""The one rule for names that become paths, and for paths that must stay inside a root.

Anything that names a file or folder and came from another host (a disk id in a cycle header, a
VM id or name in an inventory, a replica folder in a broker command, a storage path a host
reports) passes through here before it touches the file system:

* :func:`check_component` -- an identifier that becomes *one* path component: 1-128 ASCII
  letters, digits, dots, dashes and underscores, starting and ending with a letter, digit,
  dash or underscore (so never ``.``/``..``, never a hidden file, never a trailing dot that
  Windows would strip), and not a Windows device name (``CON``, ``NUL``, ``COM1`` ...).
  Separators (``/``, ``\\``), drive letters, NUL and every other character are refused.
* :func:`check_display_name` -- a free-form name an operator reads (a Hyper-V VM name may hold
  spaces and punctuation): bounded length, printable, no control characters. It never becomes a
  path as it is; :func:`slug` makes a component of it.
* :func:`inside` / :func:`check_inside` -- join or take a path and prove that, fully resolved
  (``..``, symlinks, absolute parts), it is still inside ``root``. Checking the string is not
  enough: a symlink planted in a replica folder would lead out of it.

Each check raises :class:`~sitepair.errors.InvalidArgument` that names the value and the rule,
so the refusal an operator reads says what was wrong.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path, PurePath

from sitepair.errors import InvalidArgument
from sitepair.logsafe import shown

#: Longest path component we create (NTFS and ext4 allow 255; leave room for suffixes).
MAX_COMPONENT = 128
#: Longest display name we keep (Hyper-V allows 100 characters for a VM name).
MAX_DISPLAY_NAME = 256

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9_-])?$")
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def _shown(value: str, limit: int = 80) -> str:
    """``value`` quoted for an error message: cut, control characters escaped, its length kept
    (sitepair.logsafe), so a hostile value cannot flood or forge a log."""
    return f"'{shown(value, limit)}'"


def check_component(value: str, what: str) -> str:
    """``value`` if it is safe as a single path component on Linux and Windows; else raise."""
    if not isinstance(value, str) or not _COMPONENT_RE.match(value):
        raise InvalidArgument(
            f"{what} {_shown(str(value))} is not a valid name",
            hint="use 1-128 letters, digits, dots, dashes and underscores, starting with a "
            "letter, digit or underscore and not ending with a dot; no slashes, backslashes, "
            "spaces or other characters",
        )
    if value.split(".", 1)[0].upper() in _WINDOWS_DEVICES:
        raise InvalidArgument(
            f"{what} {_shown(value)} is a reserved device name on Windows",
            hint="choose another name",
        )
    return value


def check_display_name(value: str, what: str, *, max_length: int = MAX_DISPLAY_NAME) -> str:
    """``value`` if it is a printable name of at most ``max_length`` characters; else raise."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > max_length:
        raise InvalidArgument(
            f"{what} {_shown(value)} is longer than {max_length} characters",
        )
    for ch in value:
        if unicodedata.category(ch)[0] == "C":  # Cc, Cf, Cs, Co, Cn: controls, format, ...
            raise InvalidArgument(
                f"{what} {_shown(value)} holds the control character U+{ord(ch):04X}",
                hint="names may hold printable characters only",
            )
    return value


def slug(value: str, *, max_length: int = 48) -> str:
    """A path component made of a display name, for readable folder names. Different names can
    give the same slug: callers add a unique id (``<slug>-<relationship id>``)."""
    text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    text = _SLUG_BAD.sub("-", text).strip(".-")[:max_length].strip(".-")
    if not text or text.split(".", 1)[0].upper() in _WINDOWS_DEVICES:
        text = f"vm-{text}" if text else "vm"
    return check_component(text, "name")


def _resolve(path: Path) -> Path:
    # strict=False: the path may not exist yet; its existing prefix is resolved through
    # symlinks, the rest is normalised lexically.
    return Path(os.path.realpath(path))


def _refuse_raw(value: str, what: str) -> None:
    if "\0" in value:
        raise InvalidArgument(f"{what} {_shown(value)} holds a NUL byte")


def is_inside(root: Path, path: Path) -> bool:
    """True when ``path``, resolved, is ``root`` (resolved) or below it."""
    r, p = _resolve(root), _resolve(path)
    return p == r or r in p.parents


def check_inside(root: Path, path: str | PurePath, what: str) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, if it stays inside ``root``."""
    text = str(path)
    _refuse_raw(text, what)
    if "\\" in text and os.sep != "\\":
        raise InvalidArgument(f"{what} {_shown(text)} holds a backslash")
    candidate = Path(text)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = _resolve(candidate)
    if not is_inside(root, resolved):
        raise InvalidArgument(
            f"{what} {_shown(text)} is outside {root}",
            hint="paths from other hosts must stay inside the folder configured for them",
        )
    return resolved


def inside(root: Path, *components: str, what: str) -> Path:
    """``root / c1 / c2 ...`` where every ``c`` is a checked component, resolved and proved to
    stay inside ``root`` (a symlink inside ``root`` cannot lead out)."""
    for c in components:
        check_component(c, what)
    return check_inside(root, Path(root, *components), what)
