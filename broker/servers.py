"""Operations on registered servers, each run as a job: remove, ping, refresh inventory (of one
server or of every host of a cloud).

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
from sitepair.errors import FailedPrecondition, NotFound
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.servers")

COMMAND_JOB_KINDS = ("ping-server", "refresh-server", "refresh-cloud")


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

    async def refresh_cloud(self, cloud: str, *, by: str) -> Job:
        """Ask every host of ``cloud`` to resend its inventory: one step per host."""

        def read() -> list[Server]:
            with self._store.read() as tx:
                if tx.get_cloud(cloud) is None:
                    raise NotFound(f"no cloud named {cloud!r}; see `clouds list`")
                hosts = [tx.get_server(h) for h in tx.cloud_hosts(cloud)]
            live = [h for h in hosts if h is not None and h.removed_at is None]
            return sorted(live, key=lambda h: h.name)

        servers = await asyncio.to_thread(read)
        if not servers:
            raise FailedPrecondition(
                f"cloud {cloud} has no hosts to refresh; add one with `clouds add-host`"
            )
        body = control_pb2.Command(refresh_inventory=control_pb2.RefreshInventory())
        job = await self._jobs.create(
            "refresh-cloud",
            f"cloud/{cloud}",
            [f"refresh inventory on {s.name}" for s in servers],
            created_by=by,
            params={"cloud": cloud, "servers": [s.id for s in servers]},
        )
        cmds = [
            await self._dispatcher.submit(s.id, body, job_id=job.id, job_step=i)
            for i, s in enumerate(servers)
        ]
        self._spawn(self._follow(job, list(zip(cmds, servers, strict=True))))
        return await self._jobs.get(job.id)

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
        self._spawn(self._follow(job, [(cmd, server)]))
        return await self._jobs.get(job.id)

    async def _follow(self, job: Job, commands: list[tuple[Command, Server]]) -> None:
        """Mirror the progress of a job's commands (one per step) until each has an outcome.

        The job succeeds when every command did; otherwise it fails naming the hosts that failed.
        With one command the job's result is that command's result.
        """
        offline = False
        for step, (_, server) in enumerate(commands):
            connected = self._sessions.get(server.id) is not None
            offline = offline or not connected
            await self._jobs.step(
                job.id,
                step,
                StepState.RUNNING,
                message="delivered; waiting for the answer"
                if connected
                else f"queued; {server.name} is offline and gets it when it reconnects",
            )
        if offline:
            await self._jobs.set_state(job.id, JobState.WAITING)
        results: dict[str, Any] = {}
        failures: list[str] = []
        for step, (cmd, server) in enumerate(commands):
            done = await self._dispatcher.wait(cmd.id)
            if done.state == CommandState.SUCCEEDED:
                await self._jobs.step(job.id, step, StepState.SUCCEEDED, message="done")
                result: dict[str, Any] = {}
                if done.result_json:
                    try:
                        result = json.loads(done.result_json)
                    except json.JSONDecodeError:
                        result = {"raw": done.result_json}
                results[server.name] = result
            else:
                reason = done.error or done.state.value
                await self._jobs.step(job.id, step, StepState.FAILED, message=reason)
                failures.append(f"{server.name}: {reason}")
        if failures:
            await self._jobs.fail(job.id, "; ".join(failures))
        elif len(commands) == 1:
            await self._jobs.succeed(job.id, next(iter(results.values())))
        else:
            await self._jobs.succeed(job.id, {"servers": results})

    async def resume(self, job: Job) -> bool:
        """Start-up: re-attach to a command job's command (see module docstring)."""

        def read() -> list[tuple[Command, Server]]:
            with self._store.read() as tx:
                cmds = sorted(tx.commands_for_job(job.id), key=lambda c: c.job_step or 0)
                pairs = [(c, tx.get_server(c.server_id)) for c in cmds]
            return [(c, s) for c, s in pairs if s is not None]

        pairs = await asyncio.to_thread(read)
        if not pairs:
            return False
        self._spawn(self._follow(job, pairs))
        return True
