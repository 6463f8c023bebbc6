"""Plumbing shared by the broker's orchestrations (protection, failover, recovery plans).

An orchestration is a job declared once as an ordered list of named steps (:class:`Step`), each
bound to the coroutine that runs it; the job is created with those names, and
:meth:`Orchestrator.run_steps` runs the steps that have not succeeded yet, by name. A step that
needs an agent sends it a command through its :class:`StepRun` and waits for the outcome.

Steps are written to be idempotent, and a command belongs to (job, step name, server, target):
:meth:`Orchestrator.submit_once` finds the command a step sent before a broker restart instead of
sending a second one, so an interrupted job is resumed by running it again, and a newer broker
whose declaration of that job has a step more (or fewer) still finds each step's commands. The
key is read back from the stored command itself (``job_step_name`` and the payload's target,
:func:`command_target`), so it holds across broker restarts; the step's index is stored too, for
display and order only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from broker.commands import CommandDispatcher
from broker.documents import decode_result
from broker.jobs import JobManager
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.models import Command, CommandState, Job, JobState, Relationship, StepState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import SitepairError
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.orchestration")

T = TypeVar("T")


class StepFailed(SitepairError):
    status = "FAILED_PRECONDITION"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a job: its name (shown, and the key of what it sent) and what it does."""

    name: str
    run: Callable[[StepRun], Awaitable[str]]


#: Builds a job's steps from its target and parameters (see :meth:`Orchestrator.declare`).
Declaration = Callable[[str, dict[str, Any]], list[Step]]


def step_names(steps: Iterable[Step]) -> list[str]:
    """The names a job is created with; a name is a key, so it must be unique in its job."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"a job's step names must differ: {names}")
    return names


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` made unique by numbering the repeats ("x", "x (2)"), for steps whose names come
    from an operator (recovery-plan actions may share a name)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


@dataclasses.dataclass(frozen=True)
class StepRun:
    """A step of a job being run: what it sends and the progress it shows belong to it."""

    orchestrator: Orchestrator
    job: Job
    name: str
    index: int

    async def send(self, server_id: str, body: control_pb2.Command) -> control_pb2.CommandResult:
        """Deliver a command for this step (once, even across broker restarts) and wait."""
        return await self.orchestrator.send_and_wait(self, server_id, body)

    async def submit(self, server_id: str, body: control_pb2.Command) -> Command:
        """The command this step sent ``server_id`` for the same target before, or a new one."""
        return await self.orchestrator.submit_once(self.job, self.name, server_id, body, self.index)

    async def progress(
        self, message: str | None = None, *, done: int | None = None, total: int | None = None
    ) -> None:
        await self.orchestrator.jobs.step(
            self.job.id, self.name, message=message, done=done, total=total
        )

    async def wait_connected(self, server_id: str, *, within: float = 60.0) -> bool:
        return await self.orchestrator.wait_connected(self, server_id, within=within)


@dataclasses.dataclass(frozen=True)
class Orchestration:
    """What running jobs of agent commands takes; built once, shared by the orchestrators."""

    store: Store
    clock: Clock
    jobs: JobManager
    dispatcher: CommandDispatcher
    sessions: SessionRegistry
    #: Runs a coroutine as a task the broker cancels when it shuts down.
    spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]]
    #: How long a step waits for a host's answer to a command.
    command_timeout: float = 3600.0


class Orchestrator:
    """The base of the managers whose operations are jobs of agent commands: declares their
    kinds of job, runs their steps, sends their commands."""

    def __init__(self, orchestration: Orchestration) -> None:
        o = orchestration
        self.orchestration = o
        self.store = o.store
        self.clock = o.clock
        self.jobs = o.jobs
        self.dispatcher = o.dispatcher
        self.sessions = o.sessions
        self.spawn = o.spawn
        self.command_timeout = o.command_timeout
        self._declared: dict[
            str, tuple[Declaration, Callable[[StepRun], Awaitable[str]] | None]
        ] = {}

    # -- declared jobs ----------------------------------------------------------------------
    def declare(
        self,
        kind: str,
        build: Declaration,
        *,
        on_failure: Callable[[StepRun], Awaitable[str]] | None = None,
    ) -> None:
        """Declare a kind of job once: ``build(target, params)`` gives its steps, in order, for a
        job being created and for one resumed after a restart (see :meth:`run`)."""
        self._declared[kind] = (build, on_failure)
        self.jobs.register_resumer(kind, self.resume)

    def steps_of(self, kind: str, target: str, params: dict[str, Any]) -> list[Step]:
        return self._declared[kind][0](target, params)

    async def job_result(self, job: Job) -> dict[str, Any]:
        """The result a running job has gathered so far (its steps add to it)."""
        current = await self.jobs.get(job.id)
        return json.loads(current.result_json) if current.result_json else {}

    async def remember(self, job: Job, key: str, value: Any) -> None:
        """Add ``key`` to a running job's result (a job ended and resumed runs again)."""
        result = await self.job_result(job)
        result[key] = value
        current = await self.jobs.get(job.id)
        state = current.state if not current.state.final else JobState.RUNNING
        await self.jobs.set_state(job.id, state, result=result)

    async def create_job(self, kind: str, target: str, params: dict[str, Any], *, by: str) -> Job:
        """A job of a declared kind, created with its steps' names (not started)."""
        return await self.jobs.create(
            kind,
            target,
            step_names(self.steps_of(kind, target, params)),
            created_by=by,
            params=params,
        )

    async def start_job(self, kind: str, target: str, params: dict[str, Any], *, by: str) -> Job:
        """Create a job of a declared kind and run it in the background."""
        job = await self.create_job(kind, target, params, by=by)
        self.spawn(self.run(job))
        return job

    async def run(self, job: Job) -> bool:
        """Run a job of a declared kind from its first unfinished step."""
        build, on_failure = self._declared[job.kind]
        steps = build(job.target, json.loads(job.params_json))
        return await self.run_steps(job, steps, on_failure=on_failure)

    async def resume(self, job: Job) -> bool:
        """Start-up: carry on with an unfinished job of a declared kind."""
        self.spawn(self.run(job))
        return True

    async def read(self, fn: Callable[[Tx], T]) -> T:
        return await self.store.reading(fn)

    async def write(self, fn: Callable[[Tx], T]) -> T:
        return await self.store.writing(fn)

    async def submit_once(
        self,
        job: Job,
        step: str,
        server_id: str,
        body: control_pb2.Command,
        index: int | None = None,
    ) -> Command:
        """The command the job step named ``step`` sent ``server_id`` for the same kind and
        target before (not failed), or a new one: a step resumed after a broker restart sends
        nothing twice, and a step that configures several relationships on one host sends each
        its own. ``index`` is stored with a new command, for display and order only."""
        kind = body.WhichOneof("body")
        target = command_target(body)

        def existing(tx: Tx) -> list[Command]:
            return [
                c
                for c in tx.commands_for_job(job.id)
                if c.job_step_name == step
                and c.server_id == server_id
                and c.kind == kind
                and c.state != CommandState.FAILED
                and stored_target(c) == target
            ]

        found = await self.read(existing)
        if found:
            return found[-1]
        if index is None:
            index = next((s.index for s in job.steps if s.name == step), None)
        return await self.dispatcher.submit(
            server_id,
            body,
            epoch=body_epoch(body),
            job_id=job.id,
            job_step=index,
            job_step_name=step,
        )

    async def send_and_wait(
        self, step: StepRun, server_id: str, body: control_pb2.Command
    ) -> control_pb2.CommandResult:
        """Deliver a command for a job step (once, even across broker restarts) and wait;
        returns what the host says the command did."""
        server = await self.read(lambda tx: tx.get_server(server_id))
        if server is None or server.removed_at is not None:
            # Its commands would never be delivered: fail now rather than wait an hour.
            name = server.name if server is not None else server_id
            raise StepFailed(f"host {name} was removed from the vault")
        cmd = await step.submit(server_id, body)
        if self.sessions.get(server_id) is None and cmd.state.open:
            await step.progress(f"waiting for {server.name} to connect")
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
        return decode_result(done.kind, done.result_json)

    async def unfinished(self, job: Job, steps: list[Step]) -> tuple[Job, list[StepRun]]:
        """The job as stored now, and its declared steps that have not succeeded, in order.

        Steps are matched with the job's stored steps by name: a step declared since the job
        was created runs (it has no row to show it), and one a previous broker finished does
        not, wherever either stands in the declaration."""
        step_names(steps)
        current = await self.jobs.get(job.id)
        done = {s.name for s in current.steps if s.state == StepState.SUCCEEDED}
        return current, [
            StepRun(self, current, s.name, i) for i, s in enumerate(steps) if s.name not in done
        ]

    async def run_steps(
        self,
        job: Job,
        steps: list[Step],
        *,
        on_failure: Callable[[StepRun], Awaitable[str]] | None = None,
    ) -> bool:
        """Run the steps of ``job`` that have not succeeded yet; on the first failure,
        ``on_failure(step)`` undoes what the job did (its message joins the job's error) and
        the job fails."""
        job, todo = await self.unfinished(job, steps)
        bodies = {s.name: s.run for s in steps}
        for run in todo:
            await self.jobs.step(job.id, run.name, StepState.RUNNING)
            try:
                message = await bodies[run.name](run)
            except SitepairError as exc:
                await self.jobs.step(job.id, run.name, StepState.FAILED, message=exc.message)
                error = f"{run.name}: {exc.message}"
                await self.jobs.fail(job.id, await self.undo(run, on_failure, error))
                return False
            except Exception as exc:
                log.exception(
                    "job step crashed", extra={"fields": {"job": job.id, "step": run.name}}
                )
                await self.jobs.step(job.id, run.name, StepState.FAILED, message=str(exc))
                await self.jobs.fail(
                    job.id, await self.undo(run, on_failure, f"internal error: {exc}")
                )
                return False
            await self.jobs.step(job.id, run.name, StepState.SUCCEEDED, message=message)
        current = await self.jobs.get(job.id)
        await self.jobs.succeed(
            job.id, json.loads(current.result_json) if current.result_json else None
        )
        return True

    async def undo(
        self,
        step: StepRun,
        on_failure: Callable[[StepRun], Awaitable[str]] | None,
        error: str,
    ) -> str:
        """``error`` followed by what ``on_failure`` undid after ``step`` failed."""
        if on_failure is None:
            return error
        try:
            undone = await on_failure(step)
        except SitepairError as exc:
            undone = f"rolling back failed: {exc.message}"
        except Exception as exc:
            log.exception("job rollback crashed", extra={"fields": {"job": step.job.id}})
            undone = f"rolling back failed: internal error: {exc}"
        return f"{error}; {undone}" if undone else error

    async def wait_connected(self, step: StepRun, server_id: str, *, within: float = 60.0) -> bool:
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
                await step.progress(
                    f"waiting for {server.name if server else server_id} to connect"
                )
                announced = True
            await asyncio.sleep(0.5)
        return True

    async def relationship(self, rel_id: str) -> Relationship:
        rel = await self.read(lambda tx: tx.get_relationship(rel_id))
        if rel is None:
            raise StepFailed(f"relationship {rel_id} disappeared")
        return rel

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
