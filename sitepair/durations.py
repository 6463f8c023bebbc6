"""Durations and sizes as operators write them: "30s", "5m", "24h", "5d", "64M", "1G"."""

from __future__ import annotations

import re

from sitepair.errors import InvalidArgument

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)


def parse_duration(text: str | int | float, *, what: str = "duration") -> float:
    """Seconds from "90", "90s", "5m", "24h", "5d", "1w", "250ms"."""
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidArgument(f"{what} must not be negative, got {text}")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise InvalidArgument(
            f"{what} {text!r} is not a duration", hint="use a number with s, m, h, d or w, e.g. 5d"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """Compact operator form: 432000 -> "5d", 5400 -> "1h30m", 42.5 -> "42.5s"."""
    if seconds < 60:
        return f"{seconds:g}s"
    out = []
    rest = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out)


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes from "512", "64M", "1G", "1GiB", "2T" (binary multiples, as qemu-img uses)."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"{what} must not be negative, got {text}")
        return text
    m = _SIZE.match(text)
    if not m:
        raise InvalidArgument(f"{what} {text!r} is not a size", hint="e.g. 512, 64M, 1G, 2T")
    unit = (m.group(2) or "B").upper()[0]
    mult = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}[unit]
    value = float(m.group(1)) * mult
    if value != int(value):
        raise InvalidArgument(f"{what} {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
