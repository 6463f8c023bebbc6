"""Two registered hosts (primary and replica) and a running receiver on the replica."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.identity import AgentIdentity
from agent.replication.receiver import ReceiverServer, ReplicaRegistry
from agent.replication.sender import ReplicaClient
from agent.replication.state import Grant, ReplicationState
from sitepair import tickets
from sitepair.clock import SYSTEM_CLOCK
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key


@dataclasses.dataclass
class Pair:
    broker: BrokerThread
    primary: AgentIdentity
    replica: AgentIdentity
    primary_home: Path
    replica_home: Path
    state: ReplicationState
    registry: ReplicaRegistry
    receiver: ReceiverServer
    ticket_key: object

    @property
    def cert_address(self) -> str:
        return f"127.0.0.1:{self.receiver.ports['certificate']}"

    @property
    def ticket_address(self) -> str:
        return f"127.0.0.1:{self.receiver.ports['ticket']}"

    def client(
        self,
        auth: str = "certificate",
        *,
        address: str | None = None,
        ticket: Callable[[], str] | None = None,
    ) -> ReplicaClient:
        """A sender's connection as the primary host: to this pair's receiver port for ``auth``
        unless ``address`` says otherwise (a proxy); ``ticket`` provides tickets on 8083."""
        if address is None:
            address = self.cert_address if auth == "certificate" else self.ticket_address
        return ReplicaClient(
            identity=self.primary,
            replica_host=self.replica.host_id,
            address=address,
            auth=auth,
            ticket_provider=ticket,
        )

    def grant(
        self,
        relationship: str,
        vm_id: str,
        *,
        auth: str = "certificate",
        epoch: int = 1,
        recovery_points: int = 0,
        point_interval: float = 3600.0,
        source: str | None = None,
    ) -> Grant:
        g = Grant(
            relationship=relationship,
            vm_id=vm_id,
            vm_name=vm_id,
            source_host=source or self.primary.host_id,
            epoch=epoch,
            folder=str(self.replica_home / "replicas" / relationship),
            auth=auth,
            ticket_public_key=tickets.public_key_bytes(self.ticket_key).hex(),  # type: ignore[arg-type]
            recovery_points=recovery_points,
            point_interval=point_interval,
        )
        self.state.put_grant(g)
        return g

    def ticket(self, relationship: str, vm_id: str, epoch: int = 1, **kw: object) -> str:
        return tickets.issue(
            self.ticket_key,  # type: ignore[arg-type]
            source_host=kw.get("source_host", self.primary.host_id),  # type: ignore[arg-type]
            replica_host=kw.get("replica_host", self.replica.host_id),  # type: ignore[arg-type]
            relationship=relationship,
            vm=vm_id,
            epoch=epoch,
            now=kw.get("now", SYSTEM_CLOCK.now()),  # type: ignore[arg-type]
        )


@pytest.fixture
def pair(broker: BrokerThread, tmp_path: Path) -> Iterator[Pair]:
    homes = {}
    idents = {}
    for name, site in (("primary", "site-a"), ("replica", "site-b")):
        creds = tmp_path / f"{name}.json"
        with broker.admin() as admin:
            create_key(admin, creds, site=site)
        home = tmp_path / name
        idents[name] = register_agent(creds, home, name=f"hv-{name}")
        homes[name] = home
    state = ReplicationState(homes["replica"] / "state" / "replication.db")
    registry = ReplicaRegistry(state, SYSTEM_CLOCK)
    receiver = ReceiverServer(registry=registry, identity=lambda: idents["replica"])
    receiver.start(host="127.0.0.1", certificate_port=0, ticket_port=0)
    try:
        yield Pair(
            broker=broker,
            primary=idents["primary"],
            replica=idents["replica"],
            primary_home=homes["primary"],
            replica_home=homes["replica"],
            state=state,
            registry=registry,
            receiver=receiver,
            ticket_key=tickets.generate_signing_key(),
        )
    finally:
        receiver.stop(1)
        state.close()
