"""Commands to agents: stored first, delivered over the control stream, acknowledged once.

A command is persisted as ``pending`` before anything is sent. It is written to the agent's stream
when the agent is connected (now, or when it next connects) and becomes ``delivered``; it is sent
again on every new stream until the agent acknowledges an outcome. The agent keeps a journal of
command ids, so a redelivered command is answered from the journal and never executed twice.
Outcomes are recorded at most once; an outcome for another server's command is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from broker import documents
from broker.store.base import Store
from broker.store.models import Command, CommandState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import NotFound
from sitepair.v1 import control_pb2

if TYPE_CHECKING:
    from broker.sessions import AgentSession, SessionRegistry

log = logging.getLogger("sitepair.broker.commands")


class CommandDispatcher:
    def __init__(self, store: Store, sessions: SessionRegistry, clock: Clock) -> None:
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._waiters: dict[str, list[asyncio.Future[Command]]] = {}

    async def submit(
        self,
        server_id: str,
        body: control_pb2.Command,
        *,
        epoch: int = 0,
        job_id: str | None = None,
        job_step: int | None = None,
        job_step_name: str = "",
    ) -> Command:
        """Store a command for ``server_id`` and deliver it now if the agent is connected."""
        now = self._clock.now()
        message = control_pb2.Command()
        message.CopyFrom(body)
        message.id = f"cmd-{uuid.uuid4().hex}"
        message.epoch = epoch
        message.created_at.FromNanoseconds(int(now * 1e9))
        kind = message.WhichOneof("body") or "unknown"
        cmd = Command(
            id=message.id,
            server_id=server_id,
            kind=kind,
            payload=message.SerializeToString(),
            state=CommandState.PENDING,
            created_at=now,
            job_id=job_id,
            job_step=job_step,
            job_step_name=job_step_name,
        )

        def insert(tx: Tx) -> None:
            if tx.get_server(server_id) is None:
                raise NotFound(f"no server {server_id}")
            tx.insert_command(cmd)

        await self._store.writing(insert)
        log.info(
            "command queued",
            extra={"fields": {"command": cmd.id, "kind": kind, "server": server_id}},
        )
        session = self._sessions.get(server_id)
        if session is not None:
            await self._deliver(session, [cmd])
        return cmd

    async def deliver_open(self, session: AgentSession) -> int:
        """Send every unacknowledged command of the session's server (on connect)."""

        def read(tx: Tx) -> list[Command]:
            return tx.open_commands(session.server_id)

        cmds = await self._store.reading(read)
        await self._deliver(session, cmds)
        return len(cmds)

    async def _deliver(self, session: AgentSession, cmds: list[Command]) -> None:
        sent = []
        for cmd in cmds:
            if cmd.id in session.sent_commands:
                continue
            message = control_pb2.Command()
            message.ParseFromString(cmd.payload)
            if session.send(control_pb2.BrokerMessage(command=message)):
                session.sent_commands.add(cmd.id)
                sent.append(cmd.id)
        if not sent:
            return
        now = self._clock.now()

        def mark(tx: Tx) -> None:
            tx.mark_commands_delivered(sent, now)

        await self._store.writing(mark)

    async def handle_ack(self, server_id: str, ack: control_pb2.CommandAck) -> Command | None:
        """Record an agent's acknowledgement; returns the completed command (None if ignored)."""
        if ack.state == control_pb2.CommandAck.RECEIVED:
            return None
        if ack.state not in (control_pb2.CommandAck.SUCCEEDED, control_pb2.CommandAck.FAILED):
            log.warning("ack with no outcome ignored", extra={"fields": {"server": server_id}})
            return None
        state = (
            CommandState.SUCCEEDED
            if ack.state == control_pb2.CommandAck.SUCCEEDED
            else CommandState.FAILED
        )
        now = self._clock.now()

        def complete(tx: Tx) -> Command | None:
            return tx.complete_command(
                ack.command_id,
                server_id=server_id,
                state=state,
                now=now,
                result_json=documents.encode_result(ack.result),
                error=ack.error[:4096],
            )

        cmd = await self._store.writing(complete)
        if cmd is None:
            log.info(
                "duplicate or foreign ack ignored",
                extra={"fields": {"server": server_id, "command": ack.command_id}},
            )
            return None
        log.info(
            "command completed",
            extra={"fields": {"command": cmd.id, "state": cmd.state.value, "error": cmd.error}},
        )
        for fut in self._waiters.pop(cmd.id, []):
            if not fut.done():
                fut.set_result(cmd)
        return cmd

    async def get(self, command_id: str) -> Command:
        def read(tx: Tx) -> Command | None:
            return tx.get_command(command_id)

        cmd = await self._store.reading(read)
        if cmd is None:
            raise NotFound(f"no command {command_id}")
        return cmd

    async def wait(self, command_id: str, *, poll: float = 5.0) -> Command:
        """Wait until the command has an outcome (or was cancelled)."""
        while True:
            cmd = await self.get(command_id)
            if not cmd.state.open:
                return cmd
            fut: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(command_id, []).append(fut)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=poll)
            except TimeoutError:
                continue  # re-read: it may have been cancelled or completed elsewhere
            finally:
                waiters = self._waiters.get(command_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[command_id]

    async def cancel_for_server(self, server_id: str, reason: str) -> list[Command]:
        now = self._clock.now()

        def cancel(tx: Tx) -> list[Command]:
            return tx.cancel_open_commands(server_id, now, reason)

        cmds = await self._store.writing(cancel)
        for cmd in cmds:
            for fut in self._waiters.pop(cmd.id, []):
                if not fut.done():
                    fut.set_result(await self.get(cmd.id))
        return cmds
