"""Plumbing shared by the broker's orchestrations (protection, failover, recovery plans).

An orchestration is a job whose steps are coroutines; a step that needs an agent sends it a
command tied to the job step and waits for the outcome. Steps are written to be idempotent, and
:meth:`Orchestrator.send_and_wait` finds the command a step sent before a broker restart instead
of sending a second one, so an interrupted job is resumed by running it again from its first
unfinished step.

A command belongs to a job step, a server and what it acts on (:func:`command_target`): one
step may configure several relationships on one host, and each gets its own command. The key is
read back from the stored command itself, so it holds across broker restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from broker.commands import CommandDispatcher
from broker.jobs import JobManager
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.models import Command, CommandState, Job, Relationship, StepState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import SitepairError
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.orchestration")


class StepFailed(SitepairError):
    status = "FAILED_PRECONDITION"


class Orchestrator:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        jobs: JobManager,
        dispatcher: CommandDispatcher,
        sessions: SessionRegistry,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        command_timeout: float = 3600.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.spawn = spawn
        self.command_timeout = command_timeout

    async def read(self, fn: Callable[[Tx], Any]) -> Any:
        def run() -> Any:
            with self.store.read() as tx:
                return fn(tx)

        return await asyncio.to_thread(run)

    async def write(self, fn: Callable[[Tx], Any]) -> Any:
        def run() -> Any:
            with self.store.write() as tx:
                return fn(tx)

        return await asyncio.to_thread(run)

    async def submit_once(
        self, job: Job, step: int, server_id: str, body: control_pb2.Command
    ) -> Command:
        """The command this job step sent ``server_id`` for the same kind and target before
        (not failed), or a new one: a step resumed after a broker restart sends nothing twice,
        and a step that configures several relationships on one host sends each its own."""
        kind = body.WhichOneof("body")
        target = command_target(body)

        def existing(tx: Tx) -> list[Command]:
            return [
                c
                for c in tx.commands_for_job(job.id)
                if c.job_step == step
                and c.server_id == server_id
                and c.kind == kind
                and c.state != CommandState.FAILED
                and stored_target(c) == target
            ]

        found: list[Command] = await self.read(existing)
        if found:
            return found[-1]
        return await self.dispatcher.submit(
            server_id, body, epoch=body_epoch(body), job_id=job.id, job_step=step
        )

    async def send_and_wait(
        self, job: Job, step: int, server_id: str, body: control_pb2.Command
    ) -> dict[str, Any]:
        """Deliver a command for a job step (once, even across broker restarts) and wait."""
        server = await self.read(lambda tx: tx.get_server(server_id))
        if server is None or server.removed_at is not None:
            # Its commands would never be delivered: fail now rather than wait an hour.
            name = server.name if server is not None else server_id
            raise StepFailed(f"host {name} was removed from the vault")
        cmd = await self.submit_once(job, step, server_id, body)
        if self.sessions.get(server_id) is None and cmd.state.open:
            await self.jobs.step(job.id, step, message=f"waiting for {server.name} to connect")
        try:
            done = await asyncio.wait_for(
                self.dispatcher.wait(cmd.id), timeout=self.command_timeout
            )
        except TimeoutError as exc:
            raise StepFailed(
                f"the host did not answer within {int(self.command_timeout)} s"
            ) from exc
        if done.state != CommandState.SUCCEEDED:
            raise StepFailed(done.error or f"command {done.kind} {done.state.value}")
        return json.loads(done.result_json) if done.result_json else {}

    async def run_steps(
        self,
        job: Job,
        steps: list[Callable[[], Awaitable[str]]],
        start: int,
        *,
        on_failure: Callable[[int], Awaitable[str]] | None = None,
    ) -> bool:
        """Run ``steps`` from ``start``; on the first failure, ``on_failure(index)`` undoes what
        the job did (its message joins the job's error) and the job fails."""
        for i in range(start, len(steps)):
            await self.jobs.step(job.id, i, StepState.RUNNING)
            try:
                message = await steps[i]()
            except SitepairError as exc:
                await self.jobs.step(job.id, i, StepState.FAILED, message=exc.message)
                error = f"{job.steps[i].name}: {exc.message}" if i < len(job.steps) else exc.message
                await self.jobs.fail(job.id, await self._undo(job, i, on_failure, error))
                return False
            except Exception as exc:
                log.exception("job step crashed", extra={"fields": {"job": job.id, "step": i}})
                await self.jobs.step(job.id, i, StepState.FAILED, message=str(exc))
                await self.jobs.fail(
                    job.id, await self._undo(job, i, on_failure, f"internal error: {exc}")
                )
                return False
            await self.jobs.step(job.id, i, StepState.SUCCEEDED, message=message)
        current = await self.jobs.get(job.id)
        await self.jobs.succeed(
            job.id, json.loads(current.result_json) if current.result_json else None
        )
        return True

    async def _undo(
        self,
        job: Job,
        index: int,
        on_failure: Callable[[int], Awaitable[str]] | None,
        error: str,
    ) -> str:
        if on_failure is None:
            return error
        try:
            undone = await on_failure(index)
        except SitepairError as exc:
            undone = f"rolling back failed: {exc.message}"
        except Exception as exc:
            log.exception("job rollback crashed", extra={"fields": {"job": job.id}})
            undone = f"rolling back failed: internal error: {exc}"
        return f"{error}; {undone}" if undone else error

    async def wait_connected(
        self, job: Job, step: int, server_id: str, *, within: float = 60.0
    ) -> bool:
        """Give a host a moment to (re)connect (after a broker restart, agents come back within
        their reconnect backoff); False if it did not within ``within`` seconds."""
        deadline = self.clock.monotonic() + within
        announced = False
        if self.sessions.get(server_id) is None and await self.server_gone(server_id):
            return False  # removed from the vault: it never comes back
        while self.sessions.get(server_id) is None:
            if self.clock.monotonic() >= deadline:
                return False
            if not announced:
                server = await self.read(lambda tx: tx.get_server(server_id))
                await self.jobs.step(
                    job.id,
                    step,
                    message=f"waiting for {server.name if server else server_id} to connect",
                )
                announced = True
            await asyncio.sleep(0.5)
        return True

    async def relationship(self, rel_id: str) -> Relationship:
        rel = await self.read(lambda tx: tx.get_relationship(rel_id))
        if rel is None:
            raise StepFailed(f"relationship {rel_id} disappeared")
        return rel  # type: ignore[no-any-return]

    async def server_gone(self, server_id: str) -> bool:
        server = await self.read(lambda tx: tx.get_server(server_id))
        return server is None or server.removed_at is not None


def body_epoch(body: control_pb2.Command) -> int:
    kind = body.WhichOneof("body")
    inner = getattr(body, kind) if kind else None
    return int(getattr(inner, "epoch", 0)) if inner is not None else 0


def command_target(body: control_pb2.Command) -> str:
    """What a command acts on, besides the host it goes to: the relationship it configures or
    acts for, or the host it revokes; "" for commands about the receiving host as a whole."""
    kind = body.WhichOneof("body")
    if kind is None:
        return ""
    inner = getattr(body, kind)
    fields = inner.DESCRIPTOR.fields_by_name
    for name in ("relationship_id", "host_id"):
        if name in fields:
            return str(getattr(inner, name))
    return ""


def stored_target(cmd: Command) -> str:
    """:func:`command_target` of a stored command (read from the payload the host receives)."""
    message = control_pb2.Command()
    try:
        message.ParseFromString(cmd.payload)
    except DecodeError:
        return ""
    return command_target(message)
