"""Cycles between two real agents' identities over real mTLS and ticket TLS."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from agent.replication.blocks import blocks_for, group
from agent.replication.sender import CyclePlan, CycleRefused, DiskPlan
from sitepair import vdisk
from sitepair.errors import PermissionDenied, Unauthenticated
from sitepair.v1 import replication_pb2
from tests.replication.conftest import Pair

MiB = 1 << 20


def make_disk(
    path: Path, size: int, fmt: str = "vhdx", seed: int = 1, writes: int = 40
) -> bytearray:
    model = bytearray(size)
    rng = random.Random(seed)
    with vdisk.create_disk(path, format=fmt, subformat="dynamic", size=size) as d:
        for _ in range(writes):
            off = rng.randrange(0, size - 300_000)
            n = rng.randrange(1, 300_000)
            data = rng.randbytes(n) if rng.random() < 0.7 else (b"text " * (n // 5 + 1))[:n]
            d.write(off, data)
            model[off : off + n] = data
    return model


def plan_for(
    path: Path, disk_id: str, kind: int, ranges: list[tuple[int, int]] | None = None
) -> CyclePlan:
    with vdisk.open_disk(path, read_only=True) as d:
        size = d.virtual_size
        fmt = d.format.value
        rngs = list(d.allocated_ranges()) if ranges is None else ranges
    batches = group(blocks_for(disk_id, rngs, size))
    return CyclePlan(
        kind=kind,
        disks=(DiskPlan(disk_id, path, size, fmt),),
        batches=tuple(tuple(b) for b in batches),
    )


def header(rel: str, vm: str, seq: int, kind: int, epoch: int = 1) -> replication_pb2.CycleHeader:
    return replication_pb2.CycleHeader(
        relationship_id=rel, vm_id=vm, sequence=seq, base_sequence=seq - 1, epoch=epoch, kind=kind
    )


def replica_bytes(pair: Pair, rel: str, disk_id: str) -> bytes:
    store = pair.registry.store(pair.state.grant(rel))  # type: ignore[arg-type]
    with vdisk.open_disk(store.latest_chain(disk_id), read_only=True) as d:
        return d.read(0, d.virtual_size)


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
@pytest.mark.parametrize("auth", ["certificate", "ticket"])
def test_initial_then_delta_is_byte_exact(pair: Pair, tmp_path: Path, fmt: str, auth: str) -> None:
    src = tmp_path / f"src.{fmt}"
    model = make_disk(src, 16 * MiB, fmt)
    pair.grant("rel-1", "vm-1", auth=auth)
    with pair.client(auth, ticket=lambda: pair.ticket("rel-1", "vm-1")) as client:
        st = client.get_state("rel-1")
        assert st.committed_sequence == 0
        result = client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan_for(src, "os", replication_pb2.INITIAL),
            compress=True,
        )
        assert result.resumed_from == 0 and result.batches > 0
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)
        # Change some blocks and send only those.
        changed = []
        with vdisk.open_disk(src) as d:
            for off in (0, 5 * MiB + 123, 15 * MiB):
                data = os.urandom(70_000)
                d.write(off, data)
                model[off : off + len(data)] = data
                changed.append((off, len(data)))
            d.write_zeroes(8 * MiB, MiB)
            model[8 * MiB : 9 * MiB] = bytes(MiB)
            changed.append((8 * MiB, MiB))
        changed.sort()
        delta = plan_for(src, "os", replication_pb2.DELTA, changed)
        result = client.send_cycle(
            header("rel-1", "vm-1", 2, replication_pb2.DELTA), delta, compress=True
        )
        assert result.zero_blocks >= 16
        assert replica_bytes(pair, "rel-1", "os") == bytes(model)
        assert client.get_state("rel-1").committed_sequence == 2


def test_wrong_base_and_stale_epoch_are_refused(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "src.vhdx"
    make_disk(src, 4 * MiB)
    pair.grant("rel-1", "vm-1", epoch=3)
    with pair.client() as client:
        with pytest.raises(CycleRefused) as err:
            client.send_cycle(
                header("rel-1", "vm-1", 2, replication_pb2.DELTA, epoch=3),
                plan_for(src, "os", replication_pb2.DELTA),
                compress=True,
            )
        assert err.value.code == replication_pb2.ERROR_WRONG_BASE
        with pytest.raises(Exception, match="epoch 2 is older than 3"):
            client.send_cycle(
                header("rel-1", "vm-1", 1, replication_pb2.INITIAL, epoch=2),
                plan_for(src, "os", replication_pb2.INITIAL),
                compress=True,
            )


def test_only_the_granted_source_may_send(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "src.vhdx"
    make_disk(src, 4 * MiB)
    pair.grant("rel-1", "vm-1", source="host-someone-else")
    with pair.client() as client, pytest.raises(PermissionDenied, match="not the source"):
        client.get_state("rel-1")


def test_tickets_expired_replayed_forged_refused(pair: Pair, tmp_path: Path) -> None:
    from sitepair import tickets

    pair.grant("rel-1", "vm-1", auth="ticket")
    used = pair.ticket("rel-1", "vm-1")
    cases = {
        "replayed": used,
        "expired": pair.ticket("rel-1", "vm-1", now=1_000_000.0),
        "forged": tickets.issue(
            tickets.generate_signing_key(),
            source_host=pair.primary.host_id,
            replica_host=pair.replica.host_id,
            relationship="rel-1",
            vm="vm-1",
            epoch=1,
            now=__import__("time").time(),
        ),
        "other host": pair.ticket("rel-1", "vm-1", replica_host="host-x"),
        "other vm": pair.ticket("rel-1", "vm-2"),
        "garbage": "not-a-ticket",
    }
    with pair.client("ticket", ticket=lambda: used) as first:
        assert first.get_state("rel-1").committed_sequence == 0  # the ticket works once
    for what, text in cases.items():
        with (
            pair.client("ticket", ticket=lambda text=text: text) as client,
            pytest.raises((Unauthenticated, PermissionDenied)),
        ):
            client.get_state("rel-1")
            pytest.fail(f"a {what} ticket was accepted")
    # A certificate-mode relationship cannot be reached on the ticket port and vice versa.
    pair.grant("rel-2", "vm-1", auth="certificate")
    with (
        pair.client("ticket", ticket=lambda: pair.ticket("rel-2", "vm-1")) as client,
        pytest.raises(PermissionDenied, match="uses certificate authentication"),
    ):
        client.get_state("rel-2")
