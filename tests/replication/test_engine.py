"""The source engine with the directory backend: initial, delta, resync, verify, fencing."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest

from agent.hosts.directory import DirectoryBackend
from agent.replication.engine import TRANSIENT_BACKOFF, SourceRelationship
from agent.replication.sender import CycleRefused
from agent.replication.state import SenderState, SourceConfig
from sitepair import vdisk
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import StaleEpoch, Unavailable
from sitepair.v1 import control_pb2, replication_pb2
from tests.replication.conftest import Pair
from tests.support.proxy import FaultProxy

MiB = 1 << 20


def setup_source(
    pair: Pair,
    tmp_path: Path,
    *,
    fmt: str = "vhdx",
    tracker: str = "changelog",
    auth: str = "certificate",
    size: int = 32 * MiB,
    recovery_points: int = 0,
) -> tuple[DirectoryBackend, SourceRelationship, str]:
    backend = DirectoryBackend(pair.primary_home / "vms")
    spec = backend.create_vm("web01", disks=[("os", fmt, size), ("data", fmt, size // 2)])
    pair.grant("rel-1", spec.id, auth=auth, recovery_points=recovery_points, point_interval=0.0)
    config = SourceConfig(
        relationship="rel-1",
        vm_id=spec.id,
        replica_host=pair.replica.host_id,
        address=pair.cert_address if auth == "certificate" else pair.ticket_address,
        epoch=1,
        auth=auth,
    )
    pair.state.put_source(config, SenderState(tracker=tracker))
    rel = SourceRelationship(
        config,
        backend=backend,
        state=pair.state,
        identity=lambda: pair.primary,
        clock=SYSTEM_CLOCK,
        work_dir=tmp_path / "work",
        ticket_provider=(lambda: pair.ticket("rel-1", spec.id)) if auth == "ticket" else None,
        tracker=tracker,
    )
    return backend, rel, spec.id


def write_random(
    backend: DirectoryBackend, vm: str, models: dict[str, bytearray], rng: random.Random, n: int
) -> None:
    with backend.open_writer(vm) as w:
        for _ in range(n):
            disk = rng.choice(sorted(models))
            size = len(models[disk])
            length = rng.choice([512, 4096, 65536, 200_000])
            off = rng.randrange(0, size - length)
            data = rng.randbytes(length) if rng.random() < 0.8 else bytes(length)
            w.write(disk, off, data)
            models[disk][off : off + length] = data
        w.flush()


def replica_of(pair: Pair, disk: str) -> bytes:
    store = pair.registry.store(pair.state.grant("rel-1"))  # type: ignore[arg-type]
    with vdisk.open_disk(store.latest_chain(disk), read_only=True) as d:
        return d.read(0, d.virtual_size)


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
@pytest.mark.parametrize("tracker", ["changelog", "scan"])
def test_cycles_follow_the_writes_exactly(
    pair: Pair, tmp_path: Path, fmt: str, tracker: str
) -> None:
    backend, rel, vm = setup_source(pair, tmp_path, fmt=fmt, tracker=tracker)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    rng = random.Random(7)
    write_random(backend, vm, models, rng, 30)
    first = rel.run_cycle()
    assert first is not None and first.kind == replication_pb2.INITIAL
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)
    for round_ in range(3):
        write_random(backend, vm, models, rng, 15)
        result = rel.run_cycle()
        assert result is not None and result.kind == replication_pb2.DELTA, round_
        assert result.raw_bytes < 8 * MiB  # only what changed travelled
        for disk, model in models.items():
            assert replica_of(pair, disk) == bytes(model)
    assert rel.stats.cycles_succeeded == 4 and rel.stats.state == control_pb2.STATE_PROTECTED


def test_untrusted_tracking_becomes_a_checksum_resync(pair: Pair, tmp_path: Path) -> None:
    backend, rel, vm = setup_source(pair, tmp_path)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    rng = random.Random(3)
    write_random(backend, vm, models, rng, 40)
    rel.run_cycle()
    # Someone writes the active layer behind the backend's back while the VM is off.
    folder, spec = backend.find_vm(vm)
    active = (
        folder / spec.disks[0].chain[-1]
        if not Path(spec.disks[0].chain[-1]).is_absolute()
        else Path(spec.disks[0].chain[-1])
    )
    with vdisk.open_disk(active) as d:
        d.write(MiB, b"\x5a" * 4096)
    models["os"][MiB : MiB + 4096] = b"\x5a" * 4096
    result = rel.run_cycle()
    assert result is not None and result.kind == replication_pb2.RESYNC
    assert result.raw_bytes <= 2 * 65536  # only the differing block(s), not the disk
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)
    # Tracking is trusted again afterwards.
    write_random(backend, vm, models, rng, 5)
    assert rel.run_cycle().kind == replication_pb2.DELTA  # type: ignore[union-attr]


def test_lost_tracking_is_reported_as_resync_required_until_a_resync_commits(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Change tracking lost and the resync failed (the replica's disk is full): the primary
    reports STATE_RESYNC_REQUIRED, also after a restart, until a resync cycle commits."""
    from agent.replication import replica as replica_mod

    backend, rel, vm = setup_source(pair, tmp_path)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    write_random(backend, vm, models, random.Random(5), 20)
    rel.run_cycle()
    assert rel.reported_state(pair.state.sender("rel-1")) == control_pb2.STATE_PROTECTED
    folder, spec = backend.find_vm(vm)
    chain_top = Path(spec.disks[0].chain[-1])
    active = chain_top if chain_top.is_absolute() else folder / chain_top
    with vdisk.open_disk(active) as d:  # written behind the backend's back: tracking is lost
        d.write(MiB, b"\x5a" * 4096)
    models["os"][MiB : MiB + 4096] = b"\x5a" * 4096
    monkeypatch.setattr(replica_mod.ReplicaStore, "free_space", lambda self: 0)
    with pytest.raises(CycleRefused):
        rel.run_cycle()
    assert rel.stats.last_error_code == replication_pb2.ERROR_DISK_FULL
    sender = pair.state.sender("rel-1")
    assert sender.needs_resync
    assert rel.reported_state(sender) == control_pb2.STATE_RESYNC_REQUIRED
    # After a restart (a new engine, nothing run yet) it says the same.
    restarted = SourceRelationship(
        rel.config,
        backend=backend,
        state=pair.state,
        identity=lambda: pair.primary,
        clock=SYSTEM_CLOCK,
        work_dir=tmp_path / "work",
    )
    assert restarted.reported_state(sender) == control_pb2.STATE_RESYNC_REQUIRED
    monkeypatch.undo()
    result = restarted.run_cycle()
    assert result is not None and result.kind == replication_pb2.RESYNC
    assert restarted.reported_state(pair.state.sender("rel-1")) == control_pb2.STATE_PROTECTED
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)


def test_verify_finds_and_repairs_corruption_at_rest(pair: Pair, tmp_path: Path) -> None:
    backend, rel, vm = setup_source(pair, tmp_path)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    rng = random.Random(5)
    write_random(backend, vm, models, rng, 40)
    rel.run_cycle()
    clean = rel.verify(repair=False)
    assert clean.disks == {}
    store = pair.registry.store(pair.state.grant("rel-1"))  # type: ignore[arg-type]
    with vdisk.open_disk(store.latest_chain("os")) as d:
        d.write(3 * MiB + 17, os.urandom(100))  # bit rot on the replica
    report = rel.verify(repair=True)
    assert list(report.disks) == ["os"] and report.repaired
    assert report.disks["os"] == [(3 * MiB, 65536)]
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)
    assert rel.verify(repair=False).disks == {}


def test_ticket_mode_end_to_end(pair: Pair, tmp_path: Path) -> None:
    backend, rel, vm = setup_source(pair, tmp_path, auth="ticket")
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    write_random(backend, vm, models, random.Random(9), 20)
    rel.run_cycle()
    write_random(backend, vm, models, random.Random(10), 5)
    rel.run_cycle()
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)


def test_higher_epoch_on_the_replica_fences_the_source(pair: Pair, tmp_path: Path) -> None:
    backend, rel, vm = setup_source(pair, tmp_path)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    write_random(backend, vm, models, random.Random(2), 10)
    rel.run_cycle()
    g = pair.state.grant("rel-1")
    import dataclasses

    pair.state.put_grant(dataclasses.replace(g, epoch=2))  # type: ignore[type-var]
    write_random(backend, vm, models, random.Random(4), 5)
    with pytest.raises(StaleEpoch):
        rel.run_cycle()
    assert rel.stats.state == control_pb2.STATE_FENCED


def test_recovery_points_are_sealed_and_pruned(pair: Pair, tmp_path: Path) -> None:
    backend, rel, vm = setup_source(pair, tmp_path, recovery_points=2)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    rng = random.Random(11)
    snapshots = []
    from agent.replication.receiver import ReplicationServicer

    def on_commit(grant, store, header):  # type: ignore[no-untyped-def]
        store.maybe_seal(
            max_points=grant.recovery_points,
            interval=grant.point_interval,
            app_consistent=header.app_consistent,
        )

    for s in pair.receiver.servicers.values():
        s.on_commit = on_commit
    assert ReplicationServicer
    for _ in range(4):
        write_random(backend, vm, models, rng, 10)
        result = rel.run_cycle()
        assert result is not None
        snapshots.append((result.sequence, {k: bytes(v) for k, v in models.items()}))
    store = pair.registry.store(pair.state.grant("rel-1"))  # type: ignore[arg-type]
    points = store.state.points
    assert [p.sequence for p in points] == [3, 4]  # two kept, the oldest merged away
    expected = dict(snapshots)
    for p in points:
        for disk in ("os", "data"):
            with vdisk.open_disk(store.path(p.layers[disk]), read_only=True) as d:
                assert d.read(0, d.virtual_size) == expected[p.sequence][disk], (p.sequence, disk)
    for disk, model in models.items():
        assert replica_of(pair, disk) == bytes(model)


def test_a_broken_connection_is_retried_within_the_cycle(pair: Pair, tmp_path: Path) -> None:
    """A stream cut mid-cycle, then a corrupted byte: one run_cycle call still lands the cycle,
    resuming on a new connection, and no failure is counted."""
    backend, rel, vm = setup_source(pair, tmp_path)
    models = {"os": bytearray(32 * MiB), "data": bytearray(16 * MiB)}
    write_random(backend, vm, models, random.Random(21), 60)
    proxy = FaultProxy(pair.cert_address)
    try:
        rel.config = dataclasses.replace(rel.config, address=proxy.address)
        proxy.cut_next(1 * MiB)
        result = rel.run_cycle()
        assert result is not None and result.resumed_from > 0
        write_random(backend, vm, models, random.Random(22), 60)
        proxy.corrupt_next(256 << 10)  # on the connection the cycles keep
        assert rel.run_cycle() is not None
        assert (proxy.stats.cut, proxy.stats.corrupted) == (1, 1)
        assert rel.stats.cycles_failed == 0 and rel.stats.cycles_succeeded == 2
        for disk, model in models.items():
            assert replica_of(pair, disk) == bytes(model)
    finally:
        proxy.close()


def test_a_replica_that_stays_away_fails_the_cycle_after_the_retries(
    pair: Pair, tmp_path: Path
) -> None:
    _, rel, _ = setup_source(pair, tmp_path)
    proxy = FaultProxy(pair.cert_address)
    try:
        rel.config = dataclasses.replace(rel.config, address=proxy.address)
        proxy.partition()
        with pytest.raises(Unavailable):
            rel.run_cycle()
        assert (
            rel.stats.cycles_failed == 1
            and rel.stats.last_error_code == replication_pb2.ERROR_UNAVAILABLE
        )
        assert proxy.stats.refused >= 1 + len(TRANSIENT_BACKOFF)  # tried, then retried
    finally:
        proxy.close()
