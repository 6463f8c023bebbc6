"""Faults on the wire and at the replica: corruption, truncation, resume, bad digests, full disk."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from agent.replication.blocks import BlockRef
from agent.replication.sender import CyclePlan, CycleRefused
from sitepair import pki, vdisk
from sitepair.errors import SitepairError
from sitepair.v1 import replication_pb2
from tests.replication.conftest import Pair
from tests.replication.test_cycles import MiB, header, make_disk, plan_for, replica_bytes
from tests.support.proxy import FaultProxy


def idle_partial(pair: Pair, rel: str) -> tuple[int, int, bytes]:
    """The replica's partial cycle once the receiver has finished with the broken stream."""
    lock = pair.registry.busy_lock(rel)
    assert lock.acquire(timeout=30)
    try:
        return pair.registry.store(pair.state.grant(rel)).partial()  # type: ignore[arg-type]
    finally:
        lock.release()


def test_corrupted_bytes_on_the_wire_are_never_applied(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "src.vhdx"
    model = make_disk(src, 24 * MiB, writes=80)
    pair.grant("rel-1", "vm-1")
    proxy = FaultProxy(pair.cert_address)
    try:
        plan = plan_for(src, "os", replication_pb2.INITIAL)
        # Flip one byte deep inside the stream, twice. The offset counts from the start of each
        # connection, and the second attempt resumes after the batches the first made durable,
        # so its stream is shorter (about 9 MB of 12): the same offset keeps both flips inside.
        for _ in range(2):
            proxy.corrupt_at = 3 * MiB
            with pair.client(address=proxy.address) as client, pytest.raises(SitepairError):
                client.send_cycle(
                    header("rel-1", "vm-1", 1, replication_pb2.INITIAL), plan, compress=False
                )
            assert pair.registry.store(pair.state.grant("rel-1")).state.committed_sequence == 0  # type: ignore[arg-type]
        assert proxy.stats.corrupted == 2
        with pair.client(address=proxy.address) as client:
            result = client.send_cycle(
                header("rel-1", "vm-1", 1, replication_pb2.INITIAL), plan, compress=False
            )
        assert result.resumed_from > 0  # durable batches from the broken attempts were kept
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)
    finally:
        proxy.close()


def test_truncated_stream_resumes_from_the_last_acknowledged_batch(
    pair: Pair, tmp_path: Path
) -> None:
    src = tmp_path / "src.vhdx"
    model = make_disk(src, 32 * MiB, writes=120)
    pair.grant("rel-1", "vm-1")
    proxy = FaultProxy(pair.cert_address)
    try:
        plan = plan_for(src, "os", replication_pb2.INITIAL)
        proxy.cut_after = 12 * MiB
        with pair.client(address=proxy.address) as client, pytest.raises(SitepairError):
            client.send_cycle(
                header("rel-1", "vm-1", 1, replication_pb2.INITIAL), plan, compress=False
            )
        assert proxy.stats.cut == 1
        partial_seq, acked, _ = idle_partial(pair, "rel-1")
        assert partial_seq == 1 and acked >= 8
        with pair.client(address=proxy.address) as client:
            result = client.send_cycle(
                header("rel-1", "vm-1", 1, replication_pb2.INITIAL), plan, compress=False
            )
        assert (
            result.resumed_from >= acked
        )  # the receiver may have made more durable as the stream ended
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)
    finally:
        proxy.close()


def test_delta_interrupted_then_resumed_is_atomic(pair: Pair, tmp_path: Path) -> None:
    """A delta stream cut half-way leaves the replica exactly at the previous cycle."""
    src = tmp_path / "src.vhdx"
    model = make_disk(src, 16 * MiB)
    pair.grant("rel-1", "vm-1")
    with pair.client() as client:
        client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan_for(src, "os", replication_pb2.INITIAL),
            compress=True,
        )
    before = bytes(model)
    with vdisk.open_disk(src) as d:
        data = os.urandom(12 * MiB)
        d.write(2 * MiB, data)
        model[2 * MiB : 14 * MiB] = data
    delta = plan_for(src, "os", replication_pb2.DELTA, [(2 * MiB, 12 * MiB)])
    proxy = FaultProxy(pair.cert_address)
    try:
        proxy.cut_after = 9 * MiB
        with pair.client(address=proxy.address) as client, pytest.raises(SitepairError):
            client.send_cycle(
                header("rel-1", "vm-1", 2, replication_pb2.DELTA), delta, compress=False
            )
        assert replica_bytes(pair, "rel-1", "os") == before  # nothing of the half cycle shows
        with pair.client(address=proxy.address) as client:
            result = client.send_cycle(
                header("rel-1", "vm-1", 2, replication_pb2.DELTA), delta, compress=False
            )
        assert result.resumed_from > 0
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)
    finally:
        proxy.close()


def test_bad_digest_from_an_authenticated_sender_is_refused(pair: Pair, tmp_path: Path) -> None:
    """Corruption inside TLS (a buggy or hostile sender): the receiver's own check refuses."""
    src = tmp_path / "src.vhdx"
    make_disk(src, 4 * MiB)
    pair.grant("rel-1", "vm-1")
    channel = grpc.secure_channel(
        pair.cert_address,
        pair.primary.channel_credentials(),
        options=[("grpc.ssl_target_name_override", pki.agent_dns_name(pair.replica.host_id))],
    )
    with channel:
        cycle = channel.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=replication_pb2.CycleMessage.SerializeToString,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        h = header("rel-1", "vm-1", 1, replication_pb2.INITIAL)
        h.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
        h.batch_count = 1
        payload = os.urandom(65536)
        bad = replication_pb2.BlockBatch(index=0, raw_length=65536, payload=payload)
        bad.blocks.add(
            disk_id="os",
            offset=0,
            length=65536,
            kind=replication_pb2.Block.DATA,
            digest=b"\x00" * 32,
        )
        replies = list(
            cycle(
                iter(
                    [
                        replication_pb2.CycleMessage(header=h),
                        replication_pb2.CycleMessage(batch=bad),
                    ]
                ),
                timeout=10,
            )
        )
    kinds = [r.WhichOneof("body") for r in replies]
    assert kinds == ["accepted", "refused"]
    assert replies[-1].refused.code == replication_pb2.ERROR_BAD_DIGEST
    assert "does not match its digest" in replies[-1].refused.message
    store = pair.registry.store(pair.state.grant("rel-1"))  # type: ignore[arg-type]
    assert store.state.committed_sequence == 0
    assert store.partial()[1] == 0


def test_oversized_decompression_claim_refused_before_allocating(pair: Pair) -> None:
    from agent.replication.blocks import BadBatch, Decoder

    batch = replication_pb2.BlockBatch(
        index=0, raw_length=(1 << 32) - 1, codec=replication_pb2.CODEC_ZSTD, payload=b"x"
    )
    with pytest.raises(BadBatch, match="claims"):
        Decoder().decode(batch)
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(8 * MiB))
    batch = replication_pb2.BlockBatch(
        index=0, raw_length=65536, codec=replication_pb2.CODEC_ZSTD, payload=bomb
    )
    batch.blocks.add(
        disk_id="os", offset=0, length=65536, kind=replication_pb2.Block.DATA, digest=b"\x00" * 32
    )
    with pytest.raises(BadBatch):
        Decoder().decode(batch)


def test_resume_state_from_the_replica_is_checked(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica answering with an impossible resume point is not believed."""
    from agent.replication import incoming as incoming_mod

    src = tmp_path / "src.vhdx"
    make_disk(src, 4 * MiB)
    pair.grant("rel-1", "vm-1")
    original = incoming_mod.Incoming.__init__

    def lying_init(self, *a, **kw):  # type: ignore[no-untyped-def]
        original(self, *a, **kw)
        self.resume = 10_000

    monkeypatch.setattr(incoming_mod.Incoming, "__init__", lying_init)
    with (
        pair.client() as client,
        pytest.raises(SitepairError, match="refusing its resume state"),
    ):
        client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan_for(src, "os", replication_pb2.INITIAL),
            compress=True,
        )


def test_replica_disk_full_is_refused_cleanly_and_recovers(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.replication import replica as replica_mod

    src = tmp_path / "src.vhdx"
    model = make_disk(src, 8 * MiB)
    pair.grant("rel-1", "vm-1")
    with pair.client() as client:
        client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan_for(src, "os", replication_pb2.INITIAL),
            compress=True,
        )
        before = bytes(model)
        with vdisk.open_disk(src) as d:
            d.write(MiB, b"\xab" * MiB)
            model[MiB : 2 * MiB] = b"\xab" * MiB
        delta = plan_for(src, "os", replication_pb2.DELTA, [(MiB, MiB)])
        monkeypatch.setattr(replica_mod.ReplicaStore, "free_space", lambda self: 10 * MiB)
        with pytest.raises(CycleRefused) as err:
            client.send_cycle(
                header("rel-1", "vm-1", 2, replication_pb2.DELTA), delta, compress=True
            )
        assert err.value.code == replication_pb2.ERROR_DISK_FULL
        assert "free space" in str(err.value) or "MiB free" in str(err.value)
        assert replica_bytes(pair, "rel-1", "os") == before
        monkeypatch.undo()
        result = client.send_cycle(
            header("rel-1", "vm-1", 2, replication_pb2.DELTA), delta, compress=True
        )
        assert (
            result.resumed_from == 1
        )  # all batches were durable: only the trailer travelled again
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)


def test_plan_blocks_are_aligned_and_cover_ranges() -> None:
    from agent.replication.blocks import blocks_for, group

    refs = list(blocks_for("d", [(100, 10), (65530, 20), (70000, 1)], 200_000))
    assert refs == [BlockRef("d", 0, 65536), BlockRef("d", 65536, 65536)]
    tail = list(blocks_for("d", [(199_990, 10)], 200_000))
    assert tail == [BlockRef("d", 196608, 200_000 - 196608)]
    batches = group(blocks_for("d", [(0, 3 * MiB)], 4 * MiB))
    assert [sum(b.length for b in batch) for batch in batches] == [MiB, MiB, MiB]
    assert CyclePlan  # imported for the type
