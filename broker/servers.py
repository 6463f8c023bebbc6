"""Operations on registered servers, each run as a job: remove, ping, refresh inventory (of one
server or of every host of a cloud).

Removing a server deny-lists it at the broker and tells every other host of the vault to refuse
it on the replication ports (``RevokeHost``): its certificate is still valid for up to a day,
and a replica host would otherwise go on accepting its cycles.

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

from broker import documents
from broker.auth import BrokerAuthorizer
from broker.commands import CommandDispatcher
from broker.jobs import JobManager
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.models import Command, CommandState, Job, JobState, Server, StepState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, NotFound
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.servers")

COMMAND_JOB_KINDS = ("ping-server", "refresh-server", "refresh-cloud")
#: The steps of a remove-server job, in order (a step is found again by its name).
DENY = "deny-list the server's identity"
CLOSE = "close its control stream"
CANCEL = "cancel its open commands"
REVOKE = "tell the other hosts to refuse it on their replication ports"
REMOVE_STEPS = (DENY, CLOSE, CANCEL, REVOKE)


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
        revoke_wait: float = 10.0,
        revoke_timeout: float = 120.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._authorizer = authorizer
        self._spawn = spawn
        #: How long `servers remove` waits for the other hosts' answers before it returns...
        self._revoke_wait = revoke_wait
        #: ...and how long its job waits for a connected host's answer before counting it
        #: among those that get the command later.
        self._revoke_timeout = revoke_timeout
        for kind in COMMAND_JOB_KINDS:
            jobs.register_resumer(kind, self.resume)
        jobs.register_resumer("remove-server", self._resume_remove)

    async def find(self, ref: str) -> Server:
        def read(tx: Tx) -> Server:
            return tx.find_server(ref)

        return await self._store.reading(read)

    # -- remove -----------------------------------------------------------------------------
    async def remove(self, ref: str, *, by: str) -> Job:
        """Deny-list a server at once, then tell every other host of the vault to refuse it on
        its replication ports (its certificate would otherwise pass there until it expires).

        The job returns when the connected hosts have answered, or after ``revoke_wait``
        seconds; hosts that are offline get the command when they reconnect (it is stored),
        and the job says how many confirmed and which ones will get it later.
        """
        server = await self.find(ref)
        if server.removed_at is not None:
            raise FailedPrecondition(f"server {server.name} ({server.id}) is already removed")
        job = await self._jobs.create(
            "remove-server",
            f"server/{server.name}",
            list(REMOVE_STEPS),
            created_by=by,
            params={"server": server.id},
        )
        follow = await self._run_remove(job)
        if follow is not None:
            await asyncio.wait({follow}, timeout=self._revoke_wait)
        return await self._jobs.get(job.id)

    async def _run_remove(self, job: Job) -> asyncio.Task[None] | None:
        """The steps of a remove-server job that have not succeeded (each idempotent, so a job
        interrupted by a broker restart is run again from its first unfinished step); returns
        the task that follows the hosts' answers to the revocation, if there is one."""
        server_id: str = json.loads(job.params_json)["server"]
        server = await self.find(server_id)
        done = {s.name for s in job.steps if s.state == StepState.SUCCEEDED}
        if DENY not in done:
            now = self._clock.now()

            def mark(tx: Tx) -> None:
                tx.mark_server_removed(server.id, now)

            await self._jobs.step(job.id, DENY, StepState.RUNNING)
            await self._store.writing(mark)
            self._authorizer.deny_server(server.id)
            await self._jobs.step(job.id, DENY, StepState.SUCCEEDED, message="refused from now on")
            log.warning(
                "server removed",
                extra={"fields": {"server": server.id, "name": server.name, "by": job.created_by}},
            )
        if CLOSE not in done:
            closed = self._sessions.close(
                server.id,
                control_pb2.Goodbye(
                    reason=control_pb2.Goodbye.REMOVED,
                    message="this server was removed from the vault by an operator",
                ),
            )
            await self._jobs.step(
                job.id,
                CLOSE,
                StepState.SUCCEEDED,
                message="stream closed" if closed else "it was not connected",
            )
        if CANCEL not in done:
            cancelled = await self._dispatcher.cancel_for_server(server.id, "server removed")
            await self._jobs.step(
                job.id,
                CANCEL,
                StepState.SUCCEEDED,
                message=f"{len(cancelled)} command(s) cancelled",
            )
        await self._jobs.step(job.id, REVOKE, StepState.RUNNING)
        revocations = await self._revoke_everywhere(job, server)
        if not revocations:
            await self._jobs.step(
                job.id, REVOKE, StepState.SUCCEEDED, message="no other host in the vault"
            )
            await self._jobs.succeed(job.id, {"server": server.id})
            return None
        return self._spawn(self._follow_revocations(job, server, revocations))

    async def _revoke_everywhere(self, job: Job, removed: Server) -> list[tuple[Command, Server]]:
        """A RevokeHost command, stored, for every other host not removed (once per host, even
        when the job is run again)."""

        def read(tx: Tx) -> tuple[list[Server], dict[str, Command]]:
            hosts = [s for s in tx.list_servers() if s.id != removed.id]
            sent = {
                c.server_id: c
                for c in tx.commands_for_job(job.id)
                if c.kind == "revoke_host" and c.state != CommandState.FAILED
            }
            return hosts, sent

        hosts, sent = await self._store.reading(read)
        body = control_pb2.Command(
            revoke_host=control_pb2.RevokeHost(
                host_id=removed.id,
                reason=f"server {removed.name} was removed from the vault by an operator",
            )
        )
        out = []
        for host in hosts:
            cmd = sent.get(host.id)
            if cmd is None:
                cmd = await self._dispatcher.submit(
                    host.id,
                    body,
                    job_id=job.id,
                    job_step=REMOVE_STEPS.index(REVOKE),
                    job_step_name=REVOKE,
                )
            out.append((cmd, host))
        return out

    async def _follow_revocations(
        self, job: Job, removed: Server, revocations: list[tuple[Command, Server]]
    ) -> None:
        """Wait (a bounded time) for the connected hosts' answers, then finish the job: the
        ones offline, or not answering in time, get the command when they reconnect."""
        connected = [(c, s) for c, s in revocations if self._sessions.get(s.id) is not None]
        offline = [s.name for c, s in revocations if self._sessions.get(s.id) is None]
        await self._jobs.step(
            job.id,
            REVOKE,
            message=f"RevokeHost sent to {len(revocations)} host(s); waiting for "
            f"{len(connected)} connected one(s) to confirm",
        )

        async def outcome(cmd: Command) -> Command | None:
            try:
                return await asyncio.wait_for(
                    self._dispatcher.wait(cmd.id), timeout=self._revoke_timeout
                )
            except TimeoutError:
                return None

        answers = await asyncio.gather(*(outcome(c) for c, _ in connected))
        confirmed, failures, later = [], [], list(offline)
        for (_, host), done in zip(connected, answers, strict=True):
            if done is None or done.state.open:
                later.append(host.name)
            elif done.state == CommandState.SUCCEEDED:
                confirmed.append(host.name)
            else:
                failures.append(f"{host.name}: {done.error or done.state.value}")
        message = f"{len(confirmed)} of {len(revocations)} host(s) refuse {removed.name} now"
        if later:
            message += (
                f"; {len(later)} offline or not answering yet ({', '.join(sorted(later)[:20])}) "
                "get the command when they reconnect"
            )
        result = {
            "server": removed.id,
            "revoked_on": sorted(confirmed),
            "pending_on": sorted(later),
            "failed_on": sorted(failures),
        }
        if failures:
            await self._jobs.step(
                job.id,
                REVOKE,
                StepState.FAILED,
                message=message + "; failed: " + "; ".join(failures),
            )
            await self._jobs.set_state(
                job.id,
                JobState.FAILED,
                error=f"{removed.name} is refused by the broker, but {len(failures)} host(s) "
                "could not revoke it on their replication ports: " + "; ".join(failures),
                result=result,
            )
            return
        await self._jobs.step(job.id, REVOKE, StepState.SUCCEEDED, message=message)
        await self._jobs.succeed(job.id, result)

    async def _resume_remove(self, job: Job) -> bool:
        self._spawn(self._run_remove(job))
        return True

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

        def read(tx: Tx) -> list[Server]:
            if tx.get_cloud(cloud) is None:
                raise NotFound(f"no cloud named {cloud!r}; see `clouds list`")
            hosts = [tx.get_server(h) for h in tx.cloud_hosts(cloud)]
            live = [h for h in hosts if h is not None and h.removed_at is None]
            return sorted(live, key=lambda h: h.name)

        servers = await self._store.reading(read)
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
            await self._dispatcher.submit(
                s.id, body, job_id=job.id, job_step=step.index, job_step_name=step.name
            )
            for step, s in zip(job.steps, servers, strict=True)
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
        cmd = await self._dispatcher.submit(
            server.id, body, job_id=job.id, job_step=0, job_step_name=job.steps[0].name
        )
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
                results[server.name] = documents.result_fields(
                    documents.decode_result(done.kind, done.result_json)
                )
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

        def read(tx: Tx) -> list[tuple[Command, Server]]:
            cmds = sorted(tx.commands_for_job(job.id), key=lambda c: c.job_step or 0)
            pairs = [(c, tx.get_server(c.server_id)) for c in cmds]
            return [(c, s) for c, s in pairs if s is not None]

        pairs = await self._store.reading(read)
        if not pairs:
            return False
        self._spawn(self._follow(job, pairs))
        return True
