#!/usr/bin/env python3
"""Ticket mode (port 8083): delta cycles with kept connections against a connection per use.

Everything is real and in one process: a broker (``BrokerThread``, its own event loop) that
issues the tickets over mutual TLS, two registered agents, the replica's ``ReceiverServer`` and
a ``SourceRelationship`` of a directory-backend VM (two disks of 32 MiB). Each run writes a
few KiB to the VM and sends ``--cycles`` delta cycles, every ticket from the broker.

Two peers, alternated run by run (``--runs`` each):

* ``kept`` - the code as it is: one broker channel (``BrokerTickets``), one replica connection
  kept across the cycles;
* ``per-use`` - what the code did before issue 16: the broker channel closed after each ticket
  and the replica connection after each cycle (the same classes, closed at those points).

It reports the median seconds per delta cycle of each peer and their ratio, and exact counts of
one run: tickets issued, broker channels opened, replica connections (distinct caller ports the
receiver saw) and calls. ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MiB, load_average, machine_facts, table, write_json


class Setup:
    """The broker, the two agents, the receiver and one ticket-mode relationship."""

    def __init__(self, folder: Path) -> None:
        from agent.hosts.directory import DirectoryBackend
        from agent.replication.receiver import ReceiverServer, ReplicaRegistry
        from agent.replication.state import Grant, ReplicationState, SenderState, SourceConfig
        from broker.store.models import Relationship, RelationshipState
        from sitepair import tickets
        from sitepair.clock import SYSTEM_CLOCK
        from tests.support.agents import register_agent
        from tests.support.brokers import BrokerThread, create_key, make_home

        self.folder = folder
        self.broker = BrokerThread(make_home(folder / "broker", log_file=folder / "broker.log"))
        idents = {}
        for name, site in (("primary", "site-a"), ("replica", "site-b")):
            creds = folder / f"{name}.json"
            with self.broker.admin() as admin:
                create_key(admin, creds, site=site)
            idents[name] = register_agent(creds, folder / name, name=f"hv-{name}")
        self.primary, self.replica = idents["primary"], idents["replica"]
        self.state = ReplicationState(folder / "replica" / "state" / "replication.db")
        self.receiver = ReceiverServer(
            registry=ReplicaRegistry(self.state, SYSTEM_CLOCK), identity=lambda: self.replica
        )
        ports = self.receiver.start(host="127.0.0.1", certificate_port=0, ticket_port=0)
        self.backend = DirectoryBackend(folder / "primary" / "vms")
        spec = self.backend.create_vm("web01", disks=[("os", "vhdx", 32 * MiB)])
        self.vm = spec.id
        ctx = self.broker.ctx
        rel = Relationship(
            id="rel-1",
            vm_id=self.vm,
            vm_name="web01",
            primary_cloud="cloud-a",
            recovery_cloud="cloud-b",
            primary_server=self.primary.host_id,
            replica_server=self.replica.host_id,
            state=RelationshipState.PROTECTED,
            epoch=1,
            policy_json="{}",
            created_at=1.0,
            updated_at=1.0,
        )
        self.broker.loop.call(ctx.store.writing(lambda tx: tx.insert_relationship(rel)))
        self.state.put_grant(
            Grant(
                relationship="rel-1",
                vm_id=self.vm,
                vm_name="web01",
                source_host=self.primary.host_id,
                epoch=1,
                folder=str(folder / "replica" / "replicas" / "rel-1"),
                auth="ticket",
                ticket_public_key=tickets.public_key_bytes(ctx.ticket_key).hex(),
            )
        )
        self.config = SourceConfig(
            relationship="rel-1",
            vm_id=self.vm,
            replica_host=self.replica.host_id,
            address=f"127.0.0.1:{ports['ticket']}",
            epoch=1,
            auth="ticket",
        )
        self.source_state = ReplicationState(folder / "primary" / "state" / "replication.db")
        self.source_state.put_source(self.config, SenderState())
        self.rng = random.Random(16)
        self.peers: list[str] = []
        servicer = self.receiver.servicers["ticket"]
        admit = servicer._call

        def counting(context: Any) -> Any:
            self.peers.append(context.peer())
            return admit(context)

        servicer._call = counting  # type: ignore[method-assign]

    def write(self) -> None:
        with self.backend.open_writer(self.vm) as w:
            for _ in range(4):
                w.write("os", self.rng.randrange(0, 31 * MiB), self.rng.randbytes(4096))

    def relationship(self, per_use: bool) -> tuple[Any, Any]:
        from agent.replication.engine import SourceRelationship
        from agent.replication.service import BrokerTickets
        from sitepair.clock import SYSTEM_CLOCK

        issuer = BrokerTickets(lambda: self.primary)

        def ticket() -> str:
            text = issuer("rel-1")
            if per_use:
                issuer.close()  # before issue 16: a new channel for every ticket
            return text

        rel = SourceRelationship(
            self.config,
            backend=self.backend,
            state=self.source_state,
            identity=lambda: self.primary,
            clock=SYSTEM_CLOCK,
            work_dir=self.folder / "work",
            ticket_provider=ticket,
        )
        return rel, issuer

    def close(self) -> None:
        self.receiver.stop(1)
        self.state.close()
        self.source_state.close()
        self.broker.stop()


def run(setup: Setup, *, per_use: bool, cycles: int) -> dict[str, Any]:
    rel, issuer = setup.relationship(per_use)
    setup.peers.clear()
    seconds = []
    try:
        for _ in range(cycles):
            setup.write()
            t0 = time.perf_counter()
            result = rel.run_cycle()
            seconds.append(time.perf_counter() - t0)
            assert result is not None and result.kind == 2  # DELTA
            if per_use:
                rel.close()  # before issue 16: a new replica connection for every cycle
    finally:
        rel.stop()
        issuer.close()
    return {
        "seconds_per_cycle": statistics.median(seconds),
        "tickets": issuer.issued,
        "broker_channels": issuer.channels_opened,
        "replica_connections": len(set(setup.peers)),
        "calls": len(setup.peers),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each peer (alternated)")
    parser.add_argument("--cycles", type=int, default=10, help="delta cycles per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tickets-") as tmp:
        setup = Setup(Path(tmp))
        try:
            setup.write()
            first, issuer = setup.relationship(False)
            first.run_cycle()  # the initial copy, not measured
            first.stop()
            issuer.close()
            runs: dict[str, list[dict[str, Any]]] = {"per-use": [], "kept": []}
            for i in range(args.runs):
                order = ("per-use", "kept") if i % 2 == 0 else ("kept", "per-use")
                for peer in order:
                    runs[peer].append(run(setup, per_use=peer == "per-use", cycles=args.cycles))
        finally:
            setup.close()
    medians = {p: statistics.median(r["seconds_per_cycle"] for r in rs) for p, rs in runs.items()}
    rows = []
    for peer, rs in runs.items():
        last = rs[-1]
        rows.append(
            [
                peer,
                f"{medians[peer] * 1000:.1f}",
                " ".join(f"{r['seconds_per_cycle'] * 1000:.0f}" for r in rs),
                str(last["tickets"]),
                str(last["broker_channels"]),
                str(last["replica_connections"]),
                str(last["calls"]),
            ]
        )
    print(
        f"{args.runs} runs per peer, {args.cycles} delta cycles per run; load {load_average():.2f}"
    )
    print(
        table(
            ["peer", "median ms/cycle", "run medians", "tickets", "broker channels",
             "replica connections", "calls"],
            rows,
        )
    )  # fmt: skip
    print(f"kept / per-use: {medians['kept'] / medians['per-use']:.2f}")
    if args.json:
        write_json(args.json, {"machine": machine_facts(), "runs": runs, "medians": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
