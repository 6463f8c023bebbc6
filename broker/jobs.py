"""Jobs: every operation an operator starts is a persistent job with ordered steps.

A job is created with its steps up front (so ``jobs watch`` shows what is coming), moves through
``queued -> running [-> waiting] -> succeeded | failed | cancelled``, and each step records its
own state, message and progress. Everything is in the store, so a broker restart loses nothing;
:meth:`JobManager.recover` decides at start-up what happens to jobs that were in flight, so no
job stays "running" forever. Each job records the broker that runs it (``owner``); when several
brokers share a PostgreSQL store, only the leader recovers, and only jobs whose broker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from broker.store.base import Store
from broker.store.models import Job, JobState, JobStep, StepState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, NotFound

log = logging.getLogger("sitepair.broker.jobs")

#: Called at start-up for an unfinished job of its kind; returns True if it took the job over.
Resumer = Callable[[Job], Awaitable[bool]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class JobManager:
    def __init__(self, store: Store, clock: Clock, *, owner: str = "") -> None:
        self._store = store
        self._clock = clock
        #: The broker running the jobs this manager creates (see ``Job.owner``).
        self.owner = owner or new_id("broker")
        self._changed = asyncio.Condition()
        self._resumers: dict[str, Resumer] = {}
        self._cancel_hooks: dict[str, Callable[[], Awaitable[None]]] = {}

    # -- creation and updates ---------------------------------------------------------------
    async def create(
        self,
        kind: str,
        target: str,
        steps: list[str],
        *,
        created_by: str,
        params: dict[str, Any] | None = None,
        state: JobState = JobState.RUNNING,
    ) -> Job:
        now = self._clock.now()
        job_id = new_id("job")
        job = Job(
            id=job_id,
            kind=kind,
            target=target,
            state=state,
            created_at=now,
            updated_at=now,
            created_by=created_by,
            params_json=json.dumps(params or {}, sort_keys=True),
            owner=self.owner,
            steps=tuple(
                JobStep(job_id=job_id, index=i, name=name, state=StepState.PENDING)
                for i, name in enumerate(steps)
            ),
        )

        def insert(tx: Tx) -> None:
            tx.insert_job(job)

        await self._store.writing(insert)
        log.info(
            "job created",
            extra={"fields": {"job": job_id, "kind": kind, "target": target, "by": created_by}},
        )
        await self._notify()
        return job

    async def step(
        self,
        job_id: str,
        step: str | int,
        state: StepState | None = None,
        *,
        message: str | None = None,
        done: int | None = None,
        total: int | None = None,
    ) -> None:
        """Update the step named ``step`` (or at index ``step``) of a job; a name the job was
        not created with (a step declared since, by a newer broker) has no row and is skipped."""
        now = self._clock.now()

        def update(tx: Tx) -> None:
            if isinstance(step, str):
                job = tx.get_job(job_id)
                found = [s.index for s in job.steps if s.name == step] if job else []
                if not found:
                    return
                index = found[0]
            else:
                index = step
            tx.update_step(
                job_id,
                index,
                now=now,
                state=state,
                message=message,
                progress_done=done,
                progress_total=total,
            )

        await self._store.writing(update)
        await self._notify()

    async def set_state(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        now = self._clock.now()

        def update(tx: Tx) -> None:
            job = tx.get_job(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.state.final:
                return  # a final state is never left (a late ack cannot revive a job)
            tx.update_job(
                job_id,
                now=now,
                state=state,
                error=error,
                result_json=json.dumps(result, sort_keys=True) if result is not None else None,
            )
            if state.final:
                # Steps that never ran are marked so the job reads truthfully.
                for s in job.steps:
                    if s.state in (StepState.PENDING, StepState.RUNNING):
                        tx.update_step(
                            job_id,
                            s.index,
                            now=now,
                            state=StepState.CANCELLED
                            if state == JobState.CANCELLED or s.state == StepState.PENDING
                            else StepState.FAILED,
                        )

        await self._store.writing(update)
        if state.final:
            self._cancel_hooks.pop(job_id, None)
            log.info(
                "job finished",
                extra={"fields": {"job": job_id, "state": state.value, "error": error or ""}},
            )
        await self._notify()

    async def succeed(self, job_id: str, result: dict[str, Any] | None = None) -> None:
        await self.set_state(job_id, JobState.SUCCEEDED, result=result)

    async def fail(self, job_id: str, error: str) -> None:
        await self.set_state(job_id, JobState.FAILED, error=error)

    # -- reading and watching ---------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        def read(tx: Tx) -> Job | None:
            return tx.get_job(job_id)

        job = await self._store.reading(read)
        if job is None:
            raise NotFound(f"no job {job_id!r}", hint="see `sitepair-broker jobs list`")
        return job

    async def list(self, *, state: str = "", kind: str = "", limit: int = 100) -> list[Job]:
        def read(tx: Tx) -> list[Job]:
            return tx.list_jobs(state=state, kind=kind, limit=limit)

        return await self._store.reading(read)

    async def watch(self, job_id: str, *, poll: float = 1.0) -> AsyncIterator[Job]:
        """Yield the job now and after every change, until it is final."""
        last: Job | None = None
        while True:
            job = await self.get(job_id)
            if job != last:
                yield job
                last = job
            if job.state.final:
                return
            # Re-read after a change or a poll interval (another process may have changed it).
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=poll)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- cancellation and recovery ----------------------------------------------------------
    def on_cancel(self, job_id: str, hook: Callable[[], Awaitable[None]]) -> None:
        """Register what cancelling a running job must do (stop its runner, undo steps)."""
        self._cancel_hooks[job_id] = hook

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.state.final:
            raise FailedPrecondition(f"job {job_id} already {job.state.value}")
        hook = self._cancel_hooks.pop(job_id, None)
        if hook is None and job.state == JobState.RUNNING and job.kind in self._resumers:
            raise FailedPrecondition(
                f"job {job_id} ({job.kind}) cannot be cancelled at this step",
                hint="wait for it to finish, then undo its effect with the matching command",
            )
        if hook is not None:
            await hook()
        await self.set_state(job_id, JobState.CANCELLED, error="cancelled by an operator")
        return await self.get(job_id)

    def register_resumer(self, kind: str, resumer: Resumer) -> None:
        self._resumers[kind] = resumer

    async def recover(self) -> None:
        """Hand unfinished jobs to their kind's resumer, fail the rest plainly.

        At start-up, and on a shared store whenever the leader looks again: only jobs whose
        broker is gone (a previous run of this one, or a broker whose lease ran out) are taken
        over, and they become this broker's.
        """

        def read(tx: Tx) -> list[Job]:
            jobs = [tx.get_job(i) for i in tx.adopt_orphaned_jobs(self.owner)]
            return [j for j in jobs if j is not None]

        for job in await self._store.writing(read):
            resumer = self._resumers.get(job.kind)
            taken = False
            if resumer is not None:
                try:
                    taken = await resumer(job)
                except Exception:
                    log.exception("job resume failed", extra={"fields": {"job": job.id}})
            if not taken:
                await self.fail(
                    job.id,
                    "the broker restarted while this job was running and it cannot be resumed; "
                    "check the target's state and start the operation again",
                )
