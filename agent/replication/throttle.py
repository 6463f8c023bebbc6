"""Bandwidth limits: token buckets, per host and per VM, changeable while cycles run.

Operators who would otherwise configure QoS set a rate in bytes per second; 0 means unlimited.
A sender passes every wire message through its VM's bucket and the host's shared bucket, so the
host limit holds however many VMs replicate at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float = 0.0,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp = clock()
        self.set_rate(rate, burst=burst)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float, *, burst: float | None = None) -> None:
        """Change the limit at once; ``burst`` defaults to a quarter second's worth (min 1 MiB)."""
        with self._lock:
            self._refill()
            self._rate = max(0.0, rate)
            self._burst = burst if burst is not None else max(self._rate / 4, 1024 * 1024)
            self._tokens = min(self._tokens, self._burst)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def consume(self, n: int) -> float:
        """Take ``n`` bytes' worth, sleeping as needed; returns the time slept."""
        slept = 0.0
        while True:
            with self._lock:
                if self._rate <= 0:
                    return slept
                self._refill()
                if self._tokens >= min(n, self._burst):
                    self._tokens -= n  # may go negative for a message bigger than the burst
                    return slept
                wait = (min(n, self._burst) - self._tokens) / self._rate
            wait = min(wait, 0.5)  # re-check often: the rate may change meanwhile
            self._sleep(wait)
            slept += wait
