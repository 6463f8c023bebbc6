"""Adaptive compression: the governor's decisions, and a real cycle over a slow link."""

from __future__ import annotations

import random
from pathlib import Path

from agent.replication.adapt import EPOCH, PERIOD_MAX, CompressionGovernor
from agent.replication.throttle import TokenBucket
from sitepair import vdisk
from sitepair.v1 import replication_pb2
from tests.replication.conftest import Pair
from tests.replication.test_cycles import header, plan_for, replica_bytes

MiB = 1 << 20


class Link:
    """Feeds the governor deliveries as a link of given speeds would: ``compressed`` and
    ``plain`` are guest bytes per second in each mode."""

    def __init__(self, g: CompressionGovernor, *, compressed: float, plain: float) -> None:
        self.g, self.speed, self.now, self.index = g, {True: compressed, False: plain}, 0.0, 0
        self.modes: list[bool] = []

    def run(self, batches: int, size: int = MiB) -> None:
        for _ in range(batches):
            mode = self.g.want(self.index)
            self.modes.append(mode)
            self.now += size / self.speed[mode]
            self.g.delivered(self.index, size, self.now)
            self.index += 1


def test_disabled_never_compresses_and_always_mode_always_does() -> None:
    off = CompressionGovernor(enabled=False, adaptive=True)
    assert [off.want(i) for i in range(40)] == [False] * 40
    always = Link(CompressionGovernor(enabled=True, adaptive=False), compressed=1, plain=1e9)
    always.run(200)
    assert all(always.modes) and always.g.compressed == 200


def test_a_fast_link_ends_up_sending_plain_batches() -> None:
    """Compressing is the slow part (a LAN, busy cores): after the two probe epochs the
    governor sends plain batches, and only the periodic probes compress."""
    link = Link(CompressionGovernor(enabled=True, adaptive=True), compressed=300e6, plain=500e6)
    link.run(EPOCH * 60)
    modes = link.modes
    assert modes[:EPOCH] == [True] * EPOCH and modes[EPOCH : 2 * EPOCH] == [False] * EPOCH
    assert not link.g.best and link.g.rates[False] > link.g.rates[True]
    # Probes of the losing mode get rarer: at most one epoch in eight after the start.
    assert sum(modes[3 * EPOCH :]) <= len(modes[3 * EPOCH :]) / 8


def test_one_stalled_batch_does_not_decide_an_epoch() -> None:
    """The receiver's periodic fsync holds up a batch now and then; plain is faster, and a
    stall of a second in the first plain epoch must not make compression look better."""
    g = CompressionGovernor(enabled=True, adaptive=True)
    now = 0.0
    for i in range(EPOCH * 6):
        mode = g.want(i)
        now += MiB / (500e6 if not mode else 300e6) + (1.0 if i == EPOCH + 3 else 0.0)
        g.delivered(i, MiB, now)
    assert not g.best


def test_a_slow_link_keeps_compressing() -> None:
    link = Link(CompressionGovernor(enabled=True, adaptive=True), compressed=40e6, plain=10e6)
    link.run(EPOCH * 60)
    assert link.g.best and link.g.switches == 0
    assert len(link.modes) - sum(link.modes) <= EPOCH * 3  # the first probe, then rare ones


def test_when_the_link_changes_the_governor_follows() -> None:
    """A link that becomes slow (a failover to the WAN path, congestion): the next probe finds
    compression faster, and the governor switches back."""
    link = Link(CompressionGovernor(enabled=True, adaptive=True), compressed=300e6, plain=500e6)
    link.run(EPOCH * 20)
    assert not link.g.best
    link.speed = {True: 40e6, False: 10e6}
    link.run(EPOCH * (PERIOD_MAX + 10))
    assert link.g.best and link.g.switches == 2
    assert all(link.modes[-EPOCH * 4 :])


def test_a_slow_link_keeps_every_batch_compressed(pair: Pair, tmp_path: Path) -> None:
    """Over an 8 MB/s link the compressed probe epoch wins by far: apart from the one plain
    probe epoch every batch is compressed, and the replica is exact. (48 batches: the third
    epoch is decided once the plain probe is measured.)"""
    src = tmp_path / "src.vhdx"
    text = (b"sitepair compresses text well; " * 40000)[: 15 * MiB // 16]
    rng = random.Random(5)
    with vdisk.create_disk(src, format="vhdx", subformat="dynamic", size=48 * MiB) as d:
        for i in range(48):
            d.write(i * MiB, rng.randbytes(MiB // 16) + text)
    pair.grant("rel-1", "vm-1")
    with pair.client() as client:
        plan = plan_for(src, "os", replication_pb2.INITIAL)
        result = client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan,
            compress=True,
            adaptive=True,
            buckets=[TokenBucket(8_000_000)],
        )
        assert result.batches == 48
        assert result.uncompressed_batches == EPOCH  # the plain probe
        assert result.compressed_batches == 48 - EPOCH
        assert result.wire_bytes < result.raw_bytes * 0.4
        with vdisk.open_disk(src, read_only=True) as d:
            assert replica_bytes(pair, "rel-1", "os") == d.read(0, d.virtual_size)
