"""A replica host's receiver as its own process, and the identities that attack it.

Shared by the attack tests and the receiver fuzzer (tests/security).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import psutil

from agent.identity import AgentIdentity
from agent.replication.replica import ReplicaStore
from agent.replication.sender import ReplicaClient
from agent.replication.state import DiskGrant, Grant, ReplicationState
from sitepair import pki, tickets, vdisk
from sitepair.clock import SYSTEM_CLOCK
from sitepair.rpc import REPLICATION_MAX_MESSAGE, channel_options
from sitepair.v1 import replication_pb2
from tests.replication.test_cycles import header, plan_for
from tests.replication.test_kills import ReceiverProcess, free_port
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key

MiB = 1 << 20
#: Small limits so that the caps are reached with a few calls, and a short first-message window.
LIMITS = {
    "workers": 8,
    "per_host": 4,
    "unauthenticated": 4,
    "per_address": 3,
    "first_message_timeout": 2.0,
    "idle_timeout": 5.0,
}


class Site:
    """A replica host's receiver process, and the identities that talk to it."""

    def __init__(self, broker: BrokerThread, tmp: Path) -> None:
        self.idents: dict[str, AgentIdentity] = {}
        self.homes: dict[str, Path] = {}
        for name, site in (("primary", "a"), ("other", "a"), ("replica", "b")):
            creds = tmp / f"{name}.json"
            with broker.admin() as admin:
                create_key(admin, creds, site=f"site-{site}")
            self.homes[name] = tmp / name
            self.idents[name] = register_agent(creds, self.homes[name], name=f"hv-{name}")
        self.state = ReplicationState(self.homes["replica"] / "state" / "replication.db")
        self.ticket_key = tickets.generate_signing_key()
        os.environ["SITEPAIR_TEST_LIMITS"] = json.dumps(LIMITS)
        try:
            self.receiver = ReceiverProcess(self.homes["replica"], free_port())
            self.receiver.start()
        finally:
            del os.environ["SITEPAIR_TEST_LIMITS"]
        port_file = self.homes["replica"] / "receiver.port.json"
        self.ports: dict[str, int] = json.loads(port_file.read_text())
        self.replicas = self.homes["replica"] / "replicas"

    def close(self) -> None:
        self.receiver.stop()
        self.state.close()

    def grant(self, rel: str, vm: str, *, disks: tuple[str, ...] = ("os",), **kw: Any) -> Grant:
        g = Grant(
            relationship=rel,
            vm_id=vm,
            vm_name=vm,
            source_host=kw.pop("source", self.idents["primary"].host_id),
            epoch=kw.pop("epoch", 1),
            folder=str(self.replicas / rel),
            ticket_public_key=tickets.public_key_bytes(self.ticket_key).hex(),  # type: ignore[arg-type]
            disks=tuple(DiskGrant(d, 0) for d in disks),
            **kw,
        )
        self.state.put_grant(g)
        return g

    def ticket(self, rel: str, vm: str, epoch: int = 1) -> str:
        return tickets.issue(
            self.ticket_key,  # type: ignore[arg-type]
            source_host=self.idents["primary"].host_id,
            replica_host=self.idents["replica"].host_id,
            relationship=rel,
            vm=vm,
            epoch=epoch,
            now=SYSTEM_CLOCK.now(),
        )

    def client(
        self, auth: str = "certificate", *, who: str = "primary", **kw: Any
    ) -> ReplicaClient:
        return ReplicaClient(
            identity=self.idents[who],
            replica_host=self.idents["replica"].host_id,
            address=f"127.0.0.1:{self.ports[auth]}",
            auth=auth,
            **kw,
        )

    def channel(self, auth: str = "certificate") -> grpc.Channel:
        """A raw channel to one port, as the primary (certificate) or as nobody (ticket)."""
        ident = self.idents["primary"]
        creds = (
            ident.channel_credentials()
            if auth == "certificate"
            else grpc.ssl_channel_credentials(root_certificates=ident.ca_pem)
        )
        return grpc.secure_channel(
            f"127.0.0.1:{self.ports[auth]}",
            creds,
            options=channel_options(
                target_name=pki.agent_dns_name(self.idents["replica"].host_id),
                max_message_bytes=REPLICATION_MAX_MESSAGE,
            ),
        )

    def send_initial(self, rel: str, vm: str, src: Path, disk_id: str = "os") -> None:
        with self.client() as c:
            c.send_cycle(
                header(rel, vm, 1, replication_pb2.INITIAL),
                plan_for(src, disk_id, replication_pb2.INITIAL),
                compress=True,
            )

    def replica_bytes(self, rel: str, disk_id: str = "os") -> bytes:
        store = ReplicaStore.open(self.replicas / rel)
        with vdisk.open_disk(store.latest_chain(disk_id), read_only=True) as d:
            return d.read(0, d.virtual_size)

    def peak_rss(self) -> int:
        """The receiver process's peak resident size so far (VmHWM): a buffer allocated and
        freed within one call still shows."""
        assert self.receiver.proc is not None
        status = Path(f"/proc/{self.receiver.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return int(psutil.Process(self.receiver.proc.pid).memory_info().rss)
