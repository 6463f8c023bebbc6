"""Disaster-recovery drills of recovery plans, and the plans' drill schedules."""

from __future__ import annotations

from typing import Any

from broker.store.models import Drill, DrillSchedule, DrillState
from broker.store.repo.core import Queries
from broker.store.session import Conflict
from sitepair.errors import FailedPrecondition

_DRILL = (
    "SELECT id, plan, job_id, state, reason, started_by, started_at, finished_at, evidence_json "
    "FROM drills"
)


def _drill(row: tuple[Any, ...]) -> Drill:
    return Drill(
        id=row[0],
        plan=row[1],
        job_id=row[2],
        state=DrillState(row[3]),
        reason=row[4],
        started_by=row[5],
        started_at=float(row[6]),
        finished_at=None if row[7] is None else float(row[7]),
        evidence_json=row[8],
    )


class DrillQueries(Queries):
    def insert_drill(self, drill: Drill) -> None:
        """Record a drill; a running one only when no other drill of its plan runs (one
        transaction: two brokers or two operators never start two drills of one plan)."""
        busy = FailedPrecondition(
            f"a drill of recovery plan {drill.plan} is running",
            hint=f"wait for it (see `plans drills {drill.plan}`)",
        )
        if drill.state == DrillState.RUNNING and self.running_drill(drill.plan) is not None:
            raise busy
        try:
            with self._db.guarded():
                self._db.execute(
                    "INSERT INTO drills VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        drill.id,
                        drill.plan,
                        drill.job_id,
                        drill.state.value,
                        drill.reason,
                        drill.started_by,
                        drill.started_at,
                        drill.finished_at,
                        drill.evidence_json,
                    ),
                )
        except Conflict as exc:  # another broker's drill of the plan, in the same instant
            raise busy from exc

    def running_drill(self, plan: str) -> Drill | None:
        row = self._one(f"{_DRILL} WHERE plan = ? AND state = 'running' LIMIT 1", (plan,))
        return None if row is None else _drill(row)

    def get_drill(self, drill_id: str) -> Drill | None:
        row = self._one(f"{_DRILL} WHERE id = ?", (drill_id,))
        return None if row is None else _drill(row)

    def update_drill(
        self,
        drill_id: str,
        *,
        job_id: str | None = None,
        state: DrillState | None = None,
        reason: str | None = None,
        finished_at: float | None = None,
        evidence_json: str | None = None,
    ) -> None:
        sets: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("job_id", job_id),
            ("state", state.value if state is not None else None),
            ("reason", reason),
            ("finished_at", finished_at),
            ("evidence_json", evidence_json),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if sets:
            self._db.execute(f"UPDATE drills SET {', '.join(sets)} WHERE id = ?", [*args, drill_id])

    def drill_page(self, *, plan: str, after: tuple[float, str] | None, limit: int) -> list[Drill]:
        """Drills newest first, by (started_at descending, id), after the drill ``after``."""
        sql = f"{_DRILL} WHERE 1 = 1"
        args: list[Any] = []
        if plan:
            sql += " AND plan = ?"
            args.append(plan)
        if after is not None:
            sql += " AND (started_at < ? OR (started_at = ? AND id > ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY started_at DESC, id LIMIT ?"
        args.append(limit)
        return [_drill(r) for r in self._all(sql, args)]

    def last_drills(self) -> dict[str, tuple[Drill, float]]:
        """Each plan's latest drill that ran to an outcome (passed or failed; skipped ones did
        not run), with when its latest passing drill started (0 = never)."""
        out: dict[str, tuple[Drill, float]] = {}
        rows = self._all(
            f"{_DRILL} WHERE state IN ('passed', 'failed') ORDER BY plan, started_at DESC, id"
        )
        passed: dict[str, float] = {}
        for row in rows:
            d = _drill(row)
            if d.state == DrillState.PASSED and d.plan not in passed:
                passed[d.plan] = d.started_at
            if d.plan not in out:
                out[d.plan] = (d, 0.0)
        return {plan: (d, passed.get(plan, 0.0)) for plan, (d, _) in out.items()}

    # -- schedules --------------------------------------------------------------------------
    def set_drill_schedule(self, schedule: DrillSchedule) -> None:
        self._db.execute(
            "INSERT INTO drill_schedules VALUES (?, ?, ?, ?, ?) ON CONFLICT (plan) DO UPDATE SET "
            "every_seconds = excluded.every_seconds, next_at = excluded.next_at, "
            "set_by = excluded.set_by, updated_at = excluded.updated_at",
            (
                schedule.plan,
                schedule.every_seconds,
                schedule.next_at,
                schedule.set_by,
                schedule.updated_at,
            ),
        )

    def delete_drill_schedule(self, plan: str) -> bool:
        return self._db.execute("DELETE FROM drill_schedules WHERE plan = ?", (plan,)) == 1

    def get_drill_schedule(self, plan: str) -> DrillSchedule | None:
        row = self._one("SELECT * FROM drill_schedules WHERE plan = ?", (plan,))
        return None if row is None else DrillSchedule(*row)

    def list_drill_schedules(self) -> list[DrillSchedule]:
        return [DrillSchedule(*r) for r in self._all("SELECT * FROM drill_schedules ORDER BY plan")]

    def move_drill_schedule(self, plan: str, *, seen_next_at: float, next_at: float) -> bool:
        """Move a schedule's next drill on, if nobody moved it since it was read at
        ``seen_next_at`` (the one broker whose move succeeds starts the drill)."""
        return (
            self._db.execute(
                "UPDATE drill_schedules SET next_at = ? WHERE plan = ? AND next_at = ?",
                (next_at, plan, seen_next_at),
            )
            == 1
        )
