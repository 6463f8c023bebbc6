"""The control stream and certificate renewal (port 8443, mutual TLS, role ``agent``).

The stream's server is whoever the verified certificate names; no request field can change that,
so one agent cannot act as another. The conversation:

    agent: Hello                      broker: Welcome, then every unacknowledged command
    agent: Inventory (when changed)   broker: Command ... (whenever one is submitted)
    agent: Heartbeat (every interval) broker: Goodbye (removed, replaced, shutting down)
    agent: CommandAck ...

Everything the agent sends is bounded on arrival (:mod:`broker.bounds`,
:func:`broker.inventory.accept_inventory`): a Hello whose facts are too big or break a rule the
broker acts on ends the stream with INVALID_ARGUMENT before anything is stored; a heartbeat's
metrics are cut (the heartbeat still counts); an inventory that is too big is refused whole and
one with bad entries is stored without them; an oversized message or an ack with an oversized
command id is dropped. Each kind of problem is logged once per stream (values cut short), and the
agent is never told more than the rule it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc.aio

from broker import bounds
from broker.agent_commands import replication_endpoint
from broker.ca_rotation import record_issuer
from broker.inventory import accept_inventory, join_declared_cloud, sync_inventory
from broker.sessions import AgentSession
from broker.store.models import HeartbeatRecord, Relationship, Server, StoredInventory
from broker.store.sqlite import Tx
from sitepair import PROTOCOL_VERSION, pki, tickets
from sitepair.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from sitepair.logsafe import shown
from sitepair.protoconv import seconds, timestamp
from sitepair.rpc import rpc
from sitepair.v1 import common_pb2, control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    from broker.services.context import BrokerContext

log = logging.getLogger("sitepair.broker.control")

#: The oldest agent protocol this broker understands (protocol 2 typed the wire's statuses and
#: command results on new field numbers).
MIN_AGENT_PROTOCOL = 2

#: How long a new stream may take to say Hello.
HELLO_TIMEOUT = 30.0


class _OncePerStream:
    """Warnings about what one agent sent, each kind logged once per stream (the agent may
    repeat it every heartbeat); how many were held back is logged when the stream ends."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.seen: set[str] = set()
        self.held_back = 0

    def warn(self, problem: str, event: str, **fields: object) -> None:
        if problem in self.seen:
            self.held_back += 1
            return
        self.seen.add(problem)
        log.warning(event, extra={"fields": {"server": self.server_id, **fields}})

    def close(self) -> None:
        if self.held_back:
            log.warning(
                "more messages from this agent were refused or cut; only the first of each "
                "kind was logged",
                extra={"fields": {"server": self.server_id, "count": self.held_back}},
            )


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self.authorizer = ctx.authorizer

    async def _server(self, identity: pki.Identity) -> Server:
        def read(tx: Tx) -> Server | None:
            return tx.get_server(identity.id)

        server = await self.ctx.store.reading(read)
        if server is None:
            raise PermissionDenied(f"no server {identity.id} is registered in this vault")
        if server.removed_at is not None:
            self.authorizer.deny_server(server.id)
            raise PermissionDenied(
                f"server {server.name} ({server.id}) was removed from the vault",
                hint="register the host again with a new registration key",
            )
        return server

    @rpc(roles=[pki.Role.AGENT])
    async def Connect(
        self,
        request_iterator: AsyncIterator[control_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> AsyncIterator[control_pb2.BrokerMessage]:
        ctx = self.ctx
        server = await self._server(identity)
        try:
            first = await asyncio.wait_for(anext(request_iterator), timeout=HELLO_TIMEOUT)
        except (TimeoutError, StopAsyncIteration) as exc:
            raise InvalidArgument("the control stream must start with Hello") from exc
        if first.WhichOneof("body") != "hello":
            raise InvalidArgument("the control stream must start with Hello")
        hello = first.hello
        if hello.protocol_version and hello.protocol_version > PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"agent speaks protocol {hello.protocol_version}, this broker {PROTOCOL_VERSION}",
                hint="upgrade the broker before its agents",
            )
        if hello.protocol_version and hello.protocol_version < MIN_AGENT_PROTOCOL:
            raise FailedPrecondition(
                f"agent speaks protocol {hello.protocol_version}, this broker needs "
                f"{MIN_AGENT_PROTOCOL} or newer (its statuses and command results would be "
                "misread)",
                hint="upgrade the agent (sitepair-agent) to this broker's version",
            )
        try:
            facts = bounds.accept_facts(hello.facts)
        except InvalidArgument as exc:
            log.warning(
                "agent Hello refused",
                extra={"fields": {"server": server.id, "why": shown(exc.message, 200)}},
            )
            raise
        agent_version = bounds.cut(hello.agent_version, bounds.MAX_SHORT)
        del first, hello  # the facts as received may be megabytes; keep only what was accepted
        now = ctx.clock.now()
        session = AgentSession(
            server_id=server.id, name=server.name, site=server.site, connected_at=now
        )
        ctx.sessions.open(session)
        facts_json = bounds.to_json(facts)

        def connected(tx: Tx) -> bool:
            """Record the connection; True when the host's replication address changed."""
            before = tx.get_server(server.id)
            tx.set_server_connected(
                server.id,
                now=now,
                facts_json=facts_json,
                agent_version=agent_version,
                cloud=facts.cloud,
            )
            join_declared_cloud(tx, server, facts.cloud, now)
            return (
                before is not None
                and before.facts_json not in ("", "{}")
                and replication_endpoint(before.facts_json) != replication_endpoint(facts_json)
            )

        moved = await ctx.store.writing(connected)
        log.info(
            "agent connected",
            extra={"fields": {"server": server.id, "name": server.name, "peer": context.peer()}},
        )
        yield control_pb2.BrokerMessage(
            welcome=control_pb2.Welcome(
                host_id=server.id,
                name=server.name,
                site=server.site,
                heartbeat_interval_ms=int(ctx.config.heartbeat.interval * 1000),
                server_time=timestamp(ctx.clock.now()),
                protocol_version=PROTOCOL_VERSION,
            )
        )
        reader = asyncio.create_task(self._read(request_iterator, session))
        await ctx.failover.on_server_connected(server.id)
        await ctx.ca_rotation.on_connected(server.id)
        if moved:
            log.warning(
                "replication address of a host changed; updating the primaries replicating to it",
                extra={"fields": {"server": server.id, "name": server.name}},
            )
            await ctx.protection.on_replica_address_changed(server.id)
        try:
            await ctx.dispatcher.deliver_open(session)
            while True:
                message = await session.outbound.get()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if ctx.sessions.release(session):
                gone = ctx.clock.now()
                await ctx.store.writing(lambda tx: tx.set_servers_disconnected([server.id], gone))
                log.info("agent disconnected", extra={"fields": {"server": server.id}})

    async def _read(
        self, request_iterator: AsyncIterator[control_pb2.AgentMessage], session: AgentSession
    ) -> None:
        """Handle what the agent sends until its side of the stream ends."""
        ctx = self.ctx
        warnings = _OncePerStream(session.server_id)
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("body")
                size = message.ByteSize()
                if size > bounds.MAX_AGENT_MESSAGE:
                    warnings.warn(
                        f"size:{kind}",
                        "oversized message from agent dropped",
                        kind=kind or "",
                        bytes=size,
                        cap=bounds.MAX_AGENT_MESSAGE,
                    )
                elif kind == "heartbeat":
                    hb = message.heartbeat
                    metrics, note = bounds.accept_metrics(hb.metrics)
                    if note:
                        warnings.warn("metrics", "heartbeat metrics cut", why=note)
                    ctx.heartbeats.submit(
                        HeartbeatRecord(
                            server_id=session.server_id,
                            seq=min(hb.seq, bounds.MAX_STORED_INT),
                            sent_at=seconds(hb.sent_at),
                            received_at=ctx.clock.now(),
                            metrics_json=bounds.to_json(metrics),
                        )
                    )
                elif kind == "inventory":
                    await self._store_inventory(session, message.inventory, warnings)
                elif kind == "ack":
                    if len(message.ack.command_id) > bounds.MAX_ID:
                        warnings.warn(
                            "ack",
                            "acknowledgement with an oversized command id dropped",
                            command=shown(message.ack.command_id),
                        )
                        continue
                    done = await ctx.dispatcher.handle_ack(session.server_id, message.ack)
                    if done is not None and done.kind == "trust_bundle":
                        await ctx.ca_rotation.on_ack(session.server_id, message.ack)
                elif kind == "replication":
                    await ctx.reports.on_report(session.server_id, message.replication)
                else:
                    log.warning(
                        "unexpected message on control stream",
                        extra={"fields": {"server": session.server_id, "kind": kind}},
                    )
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            log.info(
                "control stream read ended",
                extra={"fields": {"server": session.server_id, "code": exc.code().name}},
            )
        except Exception:
            log.exception(
                "control stream reader failed", extra={"fields": {"server": session.server_id}}
            )
        finally:
            warnings.close()
            session.close()

    async def _store_inventory(
        self, session: AgentSession, inv: common_pb2.Inventory, warnings: _OncePerStream
    ) -> None:
        """Store what :func:`~broker.inventory.accept_inventory` accepts of ``inv``: the
        payload kept for GetServer and the inventory tables are both the accepted entries."""
        try:
            accepted = await asyncio.to_thread(accept_inventory, inv)
        except InvalidArgument as exc:
            warnings.warn(
                "inventory",
                "inventory refused; the previous one stays",
                why=shown(exc.message, 200),
            )
            return
        if accepted.left_out:
            warnings.warn(
                "inventory-entries",
                "inventory entries left out",
                count=accepted.left_out,
                reasons=list(accepted.reasons),
            )
        clean = accepted.message
        now = self.ctx.clock.now()
        record = StoredInventory(
            server_id=session.server_id,
            digest=clean.digest,
            collected_at=seconds(clean.collected_at) or now,
            received_at=now,
            payload=clean.SerializeToString(),
        )

        def put(tx: Tx) -> None:
            tx.put_inventory(record)
            server = tx.get_server(session.server_id)
            if server is not None:
                sync_inventory(tx, server, accepted, now)

        await self.ctx.store.writing(put)
        session.inventory_digest = clean.digest
        log.info(
            "inventory received",
            extra={
                "fields": {
                    "server": session.server_id,
                    "vms": len(clean.vms),
                    "left_out": accepted.left_out,
                }
            },
        )

    @rpc(roles=[pki.Role.AGENT])
    async def IssueTicket(
        self,
        request: control_pb2.TicketRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> control_pb2.TicketResponse:
        ctx = self.ctx
        await self._server(identity)

        def read(tx: Tx) -> Relationship:
            return tx.find_relationship(request.relationship_id)

        rel = await ctx.store.reading(read)
        if rel.id != request.relationship_id or rel.disabled_at is not None:
            raise PermissionDenied(f"relationship {request.relationship_id} is not active")
        if rel.primary_server != identity.id:
            raise PermissionDenied(
                f"only the primary host of {rel.id} may ask for its replication tickets"
            )
        now = ctx.clock.now()
        ticket = tickets.issue(
            ctx.ticket_key,
            source_host=rel.primary_server,
            replica_host=rel.replica_server,
            relationship=rel.id,
            vm=rel.vm_id,
            epoch=rel.epoch,
            now=now,
        )
        return control_pb2.TicketResponse(
            ticket=ticket, expires_at=timestamp(now + tickets.DEFAULT_LIFETIME)
        )

    @rpc(roles=[pki.Role.AGENT])
    async def Renew(
        self,
        request: control_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> control_pb2.RenewResponse:
        ctx = self.ctx
        server = await self._server(identity)
        public_key = pki.public_key_from_csr(request.csr_der)
        now = ctx.clock.now()
        cert = ctx.ca.issue_agent(
            public_key,
            host_id=server.id,
            name=server.name,
            site=server.site,
            now=now,
            lifetime=ctx.config.certificates.agent_lifetime,
        )

        def record(tx: Tx) -> None:
            tx.update_server_certificate(
                server.id, format(cert.serial_number, "x"), pki.not_after(cert)
            )
            record_issuer(tx, server.id, cert)

        await ctx.store.writing(record)
        log.info(
            "agent certificate renewed",
            extra={"fields": {"server": server.id, "serial": format(cert.serial_number, "x")}},
        )
        return control_pb2.RenewResponse(
            certificate_pem=pki.cert_to_pem(cert),
            ca_pem=ctx.ca.pem,
            not_after=timestamp(pki.not_after(cert)),
        )
