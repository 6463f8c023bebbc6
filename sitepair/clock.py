"""Injected time, so tests can move it: expiry, backoff, heartbeats, schedules, RPO.

Components take a :class:`Clock` and never call ``time.time()`` themselves. ``now()`` is wall
time (UTC seconds since the epoch, what certificates and the store record); ``monotonic()`` is for
measuring intervals.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Protocol

from sitepair.errors import ConfigError

#: Test hook: seconds (may be negative, may be fractional) added to this process' wall clock.
CLOCK_OFFSET_ENV = "SITEPAIR_CLOCK_OFFSET"

log = logging.getLogger("sitepair.clock")


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


class OffsetClock:
    """Another clock's wall time plus a fixed offset: one host whose clock is wrong (tests).

    Only ``now()`` moves; ``monotonic()`` is the base clock's, because a skewed wall clock does
    not make intervals longer or shorter.
    """

    def __init__(self, offset: float, base: Clock = SYSTEM_CLOCK) -> None:
        self.offset = offset
        self.base = base

    def now(self) -> float:
        return self.base.now() + self.offset

    def monotonic(self) -> float:
        return self.base.monotonic()


def clock_from_env(environ: Mapping[str, str] | None = None) -> Clock:
    """The process clock: the system clock, skewed by ``SITEPAIR_CLOCK_OFFSET`` when it is set.

    This is a test hook for the cross-site harness ("clock skew on one host"), never meant for
    production: a host whose wall clock is off by that many seconds (negative = behind). When
    the variable is set a warning is logged, so a skewed agent is never mistaken for a healthy
    one. An unparsable value is a configuration error rather than silently no skew.
    """
    env = os.environ if environ is None else environ
    raw = env.get(CLOCK_OFFSET_ENV, "").strip()
    if not raw:
        return SYSTEM_CLOCK
    try:
        offset = float(raw)
    except ValueError:
        offset = math.nan
    if not math.isfinite(offset):
        raise ConfigError(
            f"{CLOCK_OFFSET_ENV}={raw!r} is not a number of seconds",
            hint=f"unset {CLOCK_OFFSET_ENV}, or give seconds such as 90 or -3600",
        )
    log.warning(
        "wall clock skewed on purpose by a test hook",
        extra={"fields": {"variable": CLOCK_OFFSET_ENV, "offset_seconds": offset}},
    )
    return OffsetClock(offset)


def to_datetime(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def iso(ts: float | None) -> str:
    """ISO-8601 UTC with seconds, or "-" for None (for operator output)."""
    if ts is None:
        return "-"
    return to_datetime(ts).strftime("%Y-%m-%dT%H:%M:%SZ")
