"""Adaptive compression: the governor's decisions, and a real cycle over a slow link."""

from __future__ import annotations

import random
from pathlib import Path

from agent.replication.adapt import STEP, CompressionGovernor
from agent.replication.sender import ReplicaClient
from agent.replication.throttle import TokenBucket
from sitepair import vdisk
from sitepair.v1 import replication_pb2
from tests.replication.conftest import Pair
from tests.replication.test_cycles import header, plan_for, replica_bytes

MiB = 1 << 20


def decisions(g: CompressionGovernor, n: int) -> list[bool]:
    return [g.want() for _ in range(n)]


def test_disabled_never_compresses_and_always_mode_ignores_back_pressure() -> None:
    off = CompressionGovernor(enabled=False, adaptive=True)
    off.observe(batch_was_ready=True)
    assert decisions(off, 10) == [False] * 10
    always = CompressionGovernor(enabled=True, adaptive=False)
    for _ in range(50):
        always.observe(batch_was_ready=False)
    assert decisions(always, 10) == [True] * 10 and always.compressed == 10


def test_waiting_for_encoders_lowers_the_share_and_a_full_pipeline_raises_it() -> None:
    g = CompressionGovernor(enabled=True, adaptive=True, warmup=3)
    assert decisions(g, 4) == [True] * 4  # starts compressing everything
    for _ in range(3):  # the pipeline filling up says nothing
        g.observe(batch_was_ready=False)
    assert g.fraction == 1.0
    for _ in range(4):
        g.observe(batch_was_ready=False)
    assert g.fraction == 1.0 - 4 * STEP
    # Half the batches, evenly spread.
    assert sum(decisions(g, 16)) == 8
    for _ in range(100):
        g.observe(batch_was_ready=False)
    assert g.fraction == 0.0 and not any(decisions(g, 20))
    for _ in range(100):
        g.observe(batch_was_ready=True)
    assert g.fraction == 1.0 and all(decisions(g, 20))
    assert g.compressed + g.skipped == 4 + 16 + 20 + 20


def test_a_slow_link_keeps_every_batch_compressed(pair: Pair, tmp_path: Path) -> None:
    """With the link at 4 MB/s the encoders are always ahead: the governor never backs off (a
    hiccup of the machine may cost one batch), and the replica is exact. 32 batches: the
    decisions for the last 16 come after 8 observations, so a governor that backed off under
    a slow link would send many of them uncompressed."""
    src = tmp_path / "src.vhdx"
    text = (b"sitepair compresses text well; " * 40000)[: 3 * MiB // 4]
    rng = random.Random(5)
    with vdisk.create_disk(src, format="vhdx", subformat="dynamic", size=32 * MiB) as d:
        for i in range(32):
            d.write(i * MiB, rng.randbytes(MiB // 4) + text)
    pair.grant("rel-1", "vm-1")
    client = ReplicaClient(
        identity=pair.primary,
        replica_host=pair.replica.host_id,
        address=pair.cert_address,
        auth="certificate",
    )
    try:
        plan = plan_for(src, "os", replication_pb2.INITIAL)
        result = client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan,
            compress=True,
            adaptive=True,
            buckets=[TokenBucket(4_000_000)],
        )
        assert result.batches == 32
        assert result.uncompressed_batches <= 1
        assert result.compressed_batches + result.uncompressed_batches == 32
        assert result.wire_bytes < result.raw_bytes * 0.4
        with vdisk.open_disk(src, read_only=True) as d:
            assert replica_bytes(pair, "rel-1", "os") == d.read(0, d.virtual_size)
    finally:
        client.close()
