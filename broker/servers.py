"""Operations on registered servers, each run as a job: remove, ping, refresh inventory.

Command jobs (ping, refresh) survive a broker restart: the command is in the store and will be
delivered when the agent connects; at start-up :meth:`ServerOperations.resume` re-attaches a
waiter to each unfinished command job, so the job finishes when the agent answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.auth import BrokerAuthorizer
from broker.commands import CommandDispatcher
from broker.jobs import JobManager
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.models import Command, CommandState, Job, JobState, Server, StepState
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.servers")

COMMAND_JOB_KINDS = ("ping-server", "refresh-server")


class ServerOperations:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        jobs: JobManager,
        sessions: SessionRegistry,
        dispatcher: CommandDispatcher,
        authorizer: BrokerAuthorizer,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
    ) -> None:
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._authorizer = authorizer
        self._spawn = spawn
        for kind in COMMAND_JOB_KINDS:
            jobs.register_resumer(kind, self.resume)

    async def find(self, ref: str) -> Server:
        def read() -> Server:
            with self._store.read() as tx:
                return tx.find_server(ref)

        return await asyncio.to_thread(read)

    # -- remove -----------------------------------------------------------------------------
    async def remove(self, ref: str, *, by: str) -> Job:
        server = await self.find(ref)
        if server.removed_at is not None:
            raise FailedPrecondition(f"server {server.name} ({server.id}) is already removed")
        job = await self._jobs.create(
            "remove-server",
            f"server/{server.name}",
            [
                "deny-list the server's identity",
                "close its control stream",
                "cancel its open commands",
            ],
            created_by=by,
            params={"server": server.id},
        )
        now = self._clock.now()

        def mark() -> None:
            with self._store.write() as tx:
                tx.mark_server_removed(server.id, now)

        await self._jobs.step(job.id, 0, StepState.RUNNING)
        await asyncio.to_thread(mark)
        self._authorizer.deny_server(server.id)
        await self._jobs.step(job.id, 0, StepState.SUCCEEDED, message="refused from now on")
        closed = self._sessions.close(
            server.id,
            control_pb2.Goodbye(
                reason=control_pb2.Goodbye.REMOVED,
                message="this server was removed from the vault by an operator",
            ),
        )
        await self._jobs.step(
            job.id,
            1,
            StepState.SUCCEEDED,
            message="stream closed" if closed else "it was not connected",
        )
        cancelled = await self._dispatcher.cancel_for_server(server.id, "server removed")
        await self._jobs.step(
            job.id, 2, StepState.SUCCEEDED, message=f"{len(cancelled)} command(s) cancelled"
        )
        log.warning(
            "server removed", extra={"fields": {"server": server.id, "name": server.name, "by": by}}
        )
        await self._jobs.succeed(job.id, {"server": server.id})
        return await self._jobs.get(job.id)

    # -- command jobs -----------------------------------------------------------------------
    async def ping(self, ref: str, note: str, *, by: str) -> Job:
        return await self._command_job(
            "ping-server", ref, control_pb2.Command(ping=control_pb2.Ping(note=note)), by=by
        )

    async def refresh(self, ref: str, *, by: str) -> Job:
        return await self._command_job(
            "refresh-server",
            ref,
            control_pb2.Command(refresh_inventory=control_pb2.RefreshInventory()),
            by=by,
        )

    async def _command_job(self, kind: str, ref: str, body: control_pb2.Command, *, by: str) -> Job:
        server = await self.find(ref)
        if server.removed_at is not None:
            raise FailedPrecondition(f"server {server.name} ({server.id}) was removed")
        what = body.WhichOneof("body") or "command"
        job = await self._jobs.create(
            kind,
            f"server/{server.name}",
            [f"run {what.replace('_', ' ')} on {server.name}"],
            created_by=by,
            params={"server": server.id},
        )
        cmd = await self._dispatcher.submit(server.id, body, job_id=job.id, job_step=0)
        self._spawn(self._follow(job, cmd, server))
        return await self._jobs.get(job.id)

    async def _follow(self, job: Job, cmd: Command, server: Server) -> None:
        """Mirror a command's progress into its job until it has an outcome."""
        connected = self._sessions.get(server.id) is not None
        await self._jobs.step(
            job.id,
            0,
            StepState.RUNNING,
            message="delivered; waiting for the answer"
            if connected
            else f"queued; {server.name} is offline and gets it when it reconnects",
        )
        if not connected:
            await self._jobs.set_state(job.id, JobState.WAITING)
        done = await self._dispatcher.wait(cmd.id)
        if done.state == CommandState.SUCCEEDED:
            await self._jobs.step(job.id, 0, StepState.SUCCEEDED, message="done")
            result: dict[str, Any] = {}
            if done.result_json:
                try:
                    result = json.loads(done.result_json)
                except json.JSONDecodeError:
                    result = {"raw": done.result_json}
            await self._jobs.succeed(job.id, result)
        else:
            reason = done.error or done.state.value
            await self._jobs.step(job.id, 0, StepState.FAILED, message=reason)
            await self._jobs.fail(job.id, f"{server.name}: {reason}")

    async def resume(self, job: Job) -> bool:
        """Start-up: re-attach to a command job's command (see module docstring)."""

        def read() -> tuple[list[Command], Server | None]:
            with self._store.read() as tx:
                cmds = tx.commands_for_job(job.id)
                server = tx.get_server(cmds[0].server_id) if cmds else None
                return cmds, server

        cmds, server = await asyncio.to_thread(read)
        if not cmds or server is None:
            return False
        self._spawn(self._follow(job, cmds[0], server))
        return True
