"""Jobs and their steps, and which broker runs each job."""

from __future__ import annotations

from typing import Any

from broker.store.models import Job, JobState, JobStep, StepState
from broker.store.repo.core import Queries

_JOB_COLS = (
    "id, kind, target, state, created_at, updated_at, created_by, finished_at, error, "
    "params_json, result_json, owner"
)
_STEP_COLS = (
    "job_id, idx, name, state, started_at, finished_at, message, progress_done, progress_total"
)


def _step(row: tuple[Any, ...]) -> JobStep:
    values = list(row)
    values[3] = StepState(values[3])
    return JobStep(*values)


class JobQueries(Queries):
    def insert_job(self, job: Job) -> None:
        self._db.execute(
            f"INSERT INTO jobs ({_JOB_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.kind,
                job.target,
                job.state.value,
                job.created_at,
                job.updated_at,
                job.created_by,
                job.finished_at,
                job.error,
                job.params_json,
                job.result_json,
                job.owner,
            ),
        )
        self._db.executemany(
            f"INSERT INTO job_steps ({_STEP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    job.id,
                    s.index,
                    s.name,
                    s.state.value,
                    s.started_at,
                    s.finished_at,
                    s.message,
                    s.progress_done,
                    s.progress_total,
                )
                for s in job.steps
            ],
        )

    def get_job(self, job_id: str) -> Job | None:
        row = self._one(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            return None
        steps = tuple(
            _step(r)
            for r in self._all(
                f"SELECT {_STEP_COLS} FROM job_steps WHERE job_id = ? ORDER BY idx", (job_id,)
            )
        )
        (jid, kind, target, state, created, updated, by, finished, error, params, result, owner) = (
            row
        )
        return Job(
            id=jid,
            kind=kind,
            target=target,
            state=JobState(state),
            created_at=created,
            updated_at=updated,
            created_by=by,
            finished_at=finished,
            error=error,
            params_json=params,
            result_json=result,
            steps=steps,
            owner=owner,
        )

    def list_jobs(self, *, state: str = "", kind: str = "", limit: int = 100) -> list[Job]:
        sql = "SELECT id FROM jobs WHERE 1 = 1"
        args: list[Any] = []
        if state:
            sql += " AND state = ?"
            args.append(state)
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        jobs = [self.get_job(r[0]) for r in self._all(sql, args)]
        return [j for j in jobs if j is not None]

    def job_counts(self) -> dict[tuple[str, JobState], int]:
        """How many jobs there are of each (kind, state), for metrics."""
        rows = self._all("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
        return {(str(kind), JobState(state)): int(n) for kind, state, n in rows}

    def job_page(
        self, *, state: str = "", kind: str = "", after: tuple[float, str] | None, limit: int
    ) -> list[Job]:
        """Jobs newest first, by (created_at descending, id), after the job ``after``."""
        sql = "SELECT id FROM jobs WHERE 1 = 1"
        args: list[Any] = []
        if state:
            sql += " AND state = ?"
            args.append(state)
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if after is not None:
            sql += " AND (created_at < ? OR (created_at = ? AND id > ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        jobs = [self.get_job(r[0]) for r in self._all(sql, args)]
        return [j for j in jobs if j is not None]

    def adopt_orphaned_jobs(self, owner: str) -> list[str]:
        """Claim the unfinished jobs no live broker runs; returns their ids, oldest first.

        A job is orphaned when its owner is not ``owner`` and holds no live lease in ``brokers``
        (a broker that stopped or died). On a store only one broker uses, that is every
        unfinished job a previous run of the broker left behind.
        """
        now = self.store_now()
        rows = self._all(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running', 'waiting') AND owner <> ? "
            "AND owner NOT IN (SELECT id FROM brokers WHERE expires_at >= ?) "
            "ORDER BY created_at, id",
            (owner, now),
        )
        ids = [r[0] for r in rows]
        self._db.executemany("UPDATE jobs SET owner = ? WHERE id = ?", [(owner, i) for i in ids])
        return ids

    def update_job(
        self,
        job_id: str,
        *,
        now: float,
        state: JobState | None = None,
        error: str | None = None,
        result_json: str | None = None,
    ) -> None:
        sets = ["updated_at = ?"]
        args: list[Any] = [now]
        if state is not None:
            sets.append("state = ?")
            args.append(state.value)
            if state.final:
                sets.append("finished_at = ?")
                args.append(now)
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        if result_json is not None:
            sets.append("result_json = ?")
            args.append(result_json)
        args.append(job_id)
        self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", args)

    def update_step(
        self,
        job_id: str,
        index: int,
        *,
        now: float,
        state: StepState | None = None,
        message: str | None = None,
        progress_done: int | None = None,
        progress_total: int | None = None,
    ) -> None:
        sets: list[str] = []
        args: list[Any] = []
        if state is not None:
            sets.append("state = ?")
            args.append(state.value)
            if state == StepState.RUNNING:
                sets.append("started_at = coalesce(started_at, ?)")
                args.append(now)
            elif state != StepState.PENDING:
                sets.append("finished_at = ?")
                args.append(now)
        if message is not None:
            sets.append("message = ?")
            args.append(message)
        if progress_done is not None:
            sets.append("progress_done = ?")
            args.append(progress_done)
        if progress_total is not None:
            sets.append("progress_total = ?")
            args.append(progress_total)
        if not sets:
            return
        args += [job_id, index]
        self._db.execute(
            f"UPDATE job_steps SET {', '.join(sets)} WHERE job_id = ? AND idx = ?",
            args,
        )
        self._db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, job_id))
