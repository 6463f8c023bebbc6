"""Injected time, so tests can move it: expiry, backoff, heartbeats, schedules, RPO.

Components take a :class:`Clock` and never call ``time.time()`` themselves. ``now()`` is wall
time (UTC seconds since the epoch, what certificates and the store record); ``monotonic()`` is for
measuring intervals.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock UTC seconds since the epoch."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._mono = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            self._mono += seconds


SYSTEM_CLOCK = SystemClock()


def to_datetime(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def iso(ts: float | None) -> str:
    """ISO-8601 UTC with seconds, or "-" for None (for operator output)."""
    if ts is None:
        return "-"
    return to_datetime(ts).strftime("%Y-%m-%dT%H:%M:%SZ")
