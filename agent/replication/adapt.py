"""Adaptive compression: compress a cycle's batches only when that makes the cycle faster.

zstd at level 1 costs about a CPU-second per 330 MB of text-like data here. On a WAN link that
is slower than the compressor every compressed byte is time saved; on a fast LAN, or when the
sender's cores are busy, the compressor is the slowest stage and compressing makes the cycle
slower (in the benchmark, a cycle without compression is ~1.4x faster on loopback).

Watching back-pressure alone cannot tell these apart when the link's own cost is CPU on the same
cores (TLS, gRPC), so the governor measures what matters: guest bytes delivered per second (over an
epoch, leaving out its slowest batch, so that one stall does not decide). The batches are taken in
*epochs* of :data:`EPOCH` batches. The first epoch is compressed and the second is not (probes);
from then on every epoch uses the faster mode (plain only when it is :data:`PLAIN_MARGIN`
faster, since compressing also saves bytes on the wire), and its rate keeps that mode's
estimate fresh. Every ``period`` epochs the other mode is probed again for one epoch: if it
wins, the governor switches and probes again soon (period back to :data:`PERIOD_MIN`); if not,
the period doubles up to :data:`PERIOD_MAX`, so a steady link pays for probes rarely.

Decisions are made per batch index (``want(index)``), so they do not depend on which worker
thread encodes a batch; rates come from the sender (``delivered(index, bytes, when)``) when it
hands each batch to the link. A batch's mode is decided about a pipeline window before it is
sent, so a new measurement steers the epochs after the next one. A batch sent uncompressed is
still checked by its per-block digests on arrival; only the bytes on the wire change.
"""

from __future__ import annotations

import dataclasses
import threading

#: Batches (~1 MiB each) per epoch: one mode, one rate measurement. Longer than the sender's
#: pipeline window, because only the batches whose encoding *and* sending both fall inside the
#: epoch say anything about its mode (see :meth:`CompressionGovernor.delivered`).
EPOCH = 16
#: Epochs between probes of the mode not in use: after a switch, and at most.
PERIOD_MIN = 8
PERIOD_MAX = 64
#: How much weight a new epoch's rate gets in a mode's estimate.
SMOOTHING = 0.5
#: Plain must be this much faster to be chosen: compressing also saves bytes on the wire.
PLAIN_MARGIN = 1.05
#: An epoch with less guest data than this (mostly zero blocks) is not timed.
MIN_EPOCH_BYTES = 1 << 20


@dataclasses.dataclass
class _Epoch:
    compress: bool
    last_at: float | None = None
    #: (seconds before it was taken, guest bytes) of each timed batch.
    batches: list[tuple[float, int]] = dataclasses.field(default_factory=list)


class CompressionGovernor:
    """Which batches to compress. Thread-safe: encoders ask, the sender reports deliveries."""

    def __init__(self, *, enabled: bool, adaptive: bool, window: int = 0) -> None:
        """``window``: how many batches the sender has encoded (or is encoding) ahead of the
        one it hands to the link."""
        if not 0 <= window <= EPOCH - 4:
            raise ValueError(f"a pipeline window of {window} leaves nothing to time in an epoch")
        self.enabled = enabled
        self.adaptive = adaptive and enabled
        self._timed = min(EPOCH - 1, EPOCH - window)
        self._lock = threading.Lock()
        #: Mode per epoch index, decided the first time a batch of it is asked for.
        self._modes: dict[int, bool] = {}
        self._epochs: dict[int, _Epoch] = {}
        #: Guest bytes per second, per mode (True = compressed), once measured.
        self.rates: dict[bool, float] = {}
        self.best = True
        self._next_probe = 1 + PERIOD_MIN
        self._period = PERIOD_MIN
        self.compressed = 0
        self.skipped = 0
        self.switches = 0

    def want(self, index: int) -> bool:
        """Whether batch ``index`` should be compressed."""
        if not self.enabled:
            with self._lock:
                self.skipped += 1
            return False
        if not self.adaptive:
            with self._lock:
                self.compressed += 1
            return True
        with self._lock:
            epoch = index // EPOCH
            mode = self._modes.get(epoch)
            if mode is None:
                mode = self._decide(epoch)
                self._modes[epoch] = mode
            if mode:
                self.compressed += 1
            else:
                self.skipped += 1
            return mode

    def _decide(self, epoch: int) -> bool:
        if epoch == 0:
            return True
        if epoch == 1:
            return False
        if epoch >= self._next_probe and len(self.rates) == 2:
            self._next_probe = epoch + self._period
            return not self.best
        return self.best

    def delivered(self, index: int, raw_bytes: int, when: float) -> None:
        """Batch ``index`` (``raw_bytes`` guest bytes of data) went to the link at ``when``.

        The wait before the sender took batch ``i`` covers sending batch ``i - 1`` and
        encoding batches ``i`` to ``i + window - 1``. So within an epoch starting at ``a`` only
        the waits before batches ``a + 1`` to ``a + EPOCH - window`` are all of the epoch's own
        mode; those are timed, and the epoch is measured after the last of them."""
        if not self.adaptive:
            return
        with self._lock:
            epoch, offset = divmod(index, EPOCH)
            mode = self._modes.get(epoch)
            if mode is None or offset > self._timed:
                return  # a batch the receiver already held (not encoded), or not timed
            e = self._epochs.setdefault(epoch, _Epoch(mode))
            if offset > 0 and e.last_at is not None:
                e.batches.append((max(0.0, when - e.last_at), raw_bytes))
            e.last_at = when
            if offset == self._timed:
                self._measured(epoch, e)

    def _measured(self, epoch: int, e: _Epoch) -> None:
        del self._epochs[epoch]
        # Bytes over time, without the slowest batch: the receiver makes its batches durable
        # (fsync) every few dozen batches, and that one stall would otherwise decide for the
        # whole epoch; slowness spread over the epoch still counts, as it does in a cycle.
        kept = sorted(e.batches)[:-1]
        seconds = sum(t for t, _ in kept)
        data = sum(n for _, n in kept)
        if seconds <= 0 or data < MIN_EPOCH_BYTES:
            return  # mostly zero blocks, or too fast to time: says nothing
        rate = data / seconds
        old = self.rates.get(e.compress)
        self.rates[e.compress] = rate if old is None else old + SMOOTHING * (rate - old)
        if len(self.rates) < 2:
            return
        best = self.rates[True] * PLAIN_MARGIN >= self.rates[False]
        if e.compress != self.best:  # a probe of the other mode finished
            if best != self.best:
                self.best = best
                self.switches += 1
                self._period = PERIOD_MIN
            else:
                self._period = min(PERIOD_MAX, self._period * 2)
            self._next_probe = epoch + self._period
