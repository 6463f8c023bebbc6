"""Adaptive compression: compress a cycle's batches only while the link is the bottleneck.

zstd at level 1 costs about a CPU-second per 330 MB of text-like data here. On a WAN link that
is slower than the compressor every compressed byte is time saved; on a fast LAN the
compressor is the slowest stage and compressing makes the cycle slower (on the benchmark's
loopback, a cycle without compression is ~1.4x faster). The governor decides per batch, from
back-pressure in the sender's pipeline, the idea of zstd's ``--adapt``:

* when the sender needs the next batch and it is **already encoded**, the encoders are ahead of
  the link: the link is the bottleneck, so compress more batches;
* when the sender has to **wait** for it, the encoders are behind: compress fewer.

It keeps a fraction ``f`` of batches to compress (starting at 1: on a slow link nothing
changes), moved by ``STEP`` per observation, and spreads the compressed batches evenly with an
accumulator, so the decision is deterministic given the observations. The first ``warmup``
observations are ignored: while the pipeline fills, every batch is waited for whatever the
link. A batch sent uncompressed is still checked by its per-block digests on arrival; only the
bytes on the wire change.
"""

from __future__ import annotations

import threading

#: How far one observation moves the fraction of batches compressed.
STEP = 1 / 8


class CompressionGovernor:
    """Which batches to compress. Thread-safe: encoders ask, the sender observes."""

    def __init__(self, *, enabled: bool, adaptive: bool, warmup: int = 0) -> None:
        self.enabled = enabled
        self.adaptive = adaptive and enabled
        self._fraction = 1.0 if enabled else 0.0
        self._credit = 0.0
        self._warmup = warmup
        self._lock = threading.Lock()
        self.compressed = 0
        self.skipped = 0

    @property
    def fraction(self) -> float:
        return self._fraction

    def want(self) -> bool:
        """Whether the next batch to be encoded should be compressed."""
        if not self.enabled:
            return False
        with self._lock:
            self._credit += self._fraction
            if self._credit >= 1.0 - 1e-9:
                self._credit -= 1.0
                self.compressed += 1
                return True
            self.skipped += 1
            return False

    def observe(self, *, batch_was_ready: bool) -> None:
        """The sender took the next batch: it was ready (link-bound) or it had to wait."""
        if not self.adaptive:
            return
        with self._lock:
            if self._warmup > 0:
                self._warmup -= 1
                return
            step = STEP if batch_was_ready else -STEP
            self._fraction = min(1.0, max(0.0, self._fraction + step))
