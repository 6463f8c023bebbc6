"""Ticket mode over kept connections: tickets from the real broker over one channel, cycles over
one connection to the replica, both rebuilt when the agent's certificate is renewed.

A ticket still authorizes one call (the receiver refuses a nonce it has seen), so the broker is
asked once per call; what no longer happens per call or per cycle is a TLS handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.identity import AgentIdentity
from agent.renewal import CertificateRenewer, IdentityHolder
from agent.replication.engine import SourceRelationship
from agent.replication.receiver import ReplicationServicer
from agent.replication.service import BrokerTickets
from broker.store.models import Relationship, RelationshipState
from sitepair import tickets
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import PermissionDenied, Unauthenticated
from tests.replication.conftest import Pair
from tests.replication.test_engine import MiB, setup_source, write_random

CYCLES = 4


class Connections:
    """What one of the replica's ports saw: the caller's address and port of each call, so
    the number of distinct ones is the number of TCP connections."""

    def __init__(self, servicer: ReplicationServicer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        admit = servicer._call

        def counting(context: grpc.ServicerContext) -> Any:
            self.calls.append(context.peer())
            return admit(context)

        monkeypatch.setattr(servicer, "_call", counting)

    @property
    def connections(self) -> int:
        return len(set(self.calls))


def broker_relationship(pair: Pair, vm_id: str) -> None:
    """The relationship as the broker records it, so that it issues tickets for it; the
    replica's grant trusts the broker's real ticket key."""
    rel = Relationship(
        id="rel-1",
        vm_id=vm_id,
        vm_name="web01",
        primary_cloud="cloud-a",
        recovery_cloud="cloud-b",
        primary_server=pair.primary.host_id,
        replica_server=pair.replica.host_id,
        state=RelationshipState.PROTECTED,
        epoch=1,
        policy_json="{}",
        created_at=1.0,
        updated_at=1.0,
    )
    ctx = pair.broker.ctx
    pair.broker.loop.call(ctx.store.writing(lambda tx: tx.insert_relationship(rel)))
    key = tickets.public_key_bytes(ctx.ticket_key).hex()
    grant = pair.state.grant("rel-1")
    assert grant is not None
    pair.state.put_grant(dataclasses.replace(grant, ticket_public_key=key))


def ticket_source(
    pair: Pair, tmp_path: Path, identity: Callable[[], AgentIdentity]
) -> tuple[SourceRelationship, BrokerTickets, Callable[[], None]]:
    """A ticket-mode relationship whose tickets come from the broker, and a function that
    changes its VM's disks."""
    backend, rel, vm = setup_source(pair, tmp_path, auth="ticket", size=8 * MiB)
    broker_relationship(pair, vm)
    issuer = BrokerTickets(identity)
    rel.identity = identity
    rel.ticket_provider = lambda: issuer("rel-1")
    models = {"os": bytearray(8 * MiB), "data": bytearray(4 * MiB)}
    rng = random.Random(16)

    def write() -> None:
        write_random(backend, vm, models, rng, 5)

    return rel, issuer, write


def test_cycles_share_one_replica_connection_and_one_broker_channel(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Connections(pair.receiver.servicers["ticket"], monkeypatch)
    rel, issuer, write = ticket_source(pair, tmp_path, lambda: pair.primary)
    try:
        for _ in range(CYCLES):
            write()
            assert rel.run_cycle() is not None
        # Before: a new channel per cycle (CYCLES connections) and per ticket (one broker
        # handshake per call).
        assert seen.connections == 1
        assert issuer.channels_opened == 1
        # Each call carried its own ticket, issued by the broker (a ticket is single-use).
        assert issuer.issued == len(seen.calls) >= 2 * CYCLES
        assert rel.stats.cycles_succeeded == CYCLES
    finally:
        rel.stop()
        issuer.close()


def renew(pair: Pair, holder: IdentityHolder) -> None:
    renewed = asyncio.run(CertificateRenewer(pair.primary_home, holder, SYSTEM_CLOCK).renew_now())
    assert renewed.cert_pem != pair.primary.cert_pem


def test_a_renewed_certificate_opens_a_new_broker_channel(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = IdentityHolder(pair.primary)
    rel, issuer, write = ticket_source(pair, tmp_path, holder.get)
    try:
        for _ in range(2):
            write()
            rel.run_cycle()
        assert issuer.channels_opened == 1
        renew(pair, holder)
        for _ in range(2):
            write()
            rel.run_cycle()
        # The old channel presented the old certificate: a new one, kept again.
        assert issuer.channels_opened == 2
        assert rel.stats.cycles_succeeded == 4
    finally:
        rel.stop()
        issuer.close()


def test_a_renewed_certificate_opens_a_new_replica_connection(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In certificate mode the connection presents the certificate (in ticket mode it presents
    none, and gRPC may keep the TCP connection under the new channel)."""
    seen = Connections(pair.receiver.servicers["certificate"], monkeypatch)
    holder = IdentityHolder(pair.primary)
    backend, rel, vm = setup_source(pair, tmp_path, size=8 * MiB)
    rel.identity = holder.get
    models = {"os": bytearray(8 * MiB), "data": bytearray(4 * MiB)}
    rng = random.Random(17)
    try:
        for _ in range(2):
            write_random(backend, vm, models, rng, 5)
            rel.run_cycle()
        assert seen.connections == 1
        renew(pair, holder)
        for _ in range(2):
            write_random(backend, vm, models, rng, 5)
            rel.run_cycle()
        assert seen.connections == 2
        assert rel.stats.cycles_succeeded == 4
    finally:
        rel.stop()


def test_stop_closes_the_kept_connection(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Connections(pair.receiver.servicers["ticket"], monkeypatch)
    rel, issuer, write = ticket_source(pair, tmp_path, lambda: pair.primary)
    try:
        write()
        rel.run_cycle()
        rel.stop()
        write()
        rel.run_cycle()  # a stopped relationship's late cycle does not keep its connection
        write()
        rel.run_cycle()
        assert seen.connections == 3
    finally:
        rel.stop()
        issuer.close()


def test_kept_connection_still_refuses_a_reused_or_foreign_ticket(
    pair: Pair, tmp_path: Path
) -> None:
    """Keeping the connection changes nothing on the receiver: every call is checked."""
    rel, issuer, write = ticket_source(pair, tmp_path, lambda: pair.primary)
    try:
        write()
        rel.run_cycle()
        used = issuer("rel-1")
        rel.ticket_provider = lambda: used
        rel.close()  # a connection takes its ticket provider when it is made
        client = rel.client()
        assert client.get_state("rel-1").committed_sequence == 1
        with pytest.raises(Unauthenticated, match="already used"):
            client.get_state("rel-1")
        other = tickets.issue(
            pair.broker.ctx.ticket_key,
            source_host=pair.primary.host_id,
            replica_host=pair.replica.host_id,
            relationship="rel-2",
            vm="vm-other",
            epoch=1,
            now=SYSTEM_CLOCK.now(),
        )
        rel.ticket_provider = lambda: other
        rel.close()
        with pytest.raises(PermissionDenied, match="does not name this relationship"):
            rel.client().get_state("rel-1")
    finally:
        rel.stop()
        issuer.close()


def test_a_kept_connection_does_not_run_out_of_streams(pair: Pair, tmp_path: Path) -> None:
    """The receiver allows 16 streams per connection; ended calls must not count. (They did
    while the receiver's watchdog held their contexts for 10 s after they ended: the 16th call
    in a row was refused with RST_STREAM.)"""
    pair.grant("rel-1", "vm-1")
    with pair.client() as client:
        for _ in range(40):
            assert client.get_state("rel-1").committed_sequence == 0
