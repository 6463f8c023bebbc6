"""Recovery plans: named, ordered failovers of several protected VMs."""

from __future__ import annotations

from broker.store.models import RecoveryPlan
from broker.store.repo.core import Queries
from broker.store.session import Conflict
from sitepair.errors import AlreadyExists


class PlanQueries(Queries):
    def insert_plan(self, plan: RecoveryPlan) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    "INSERT INTO recovery_plans VALUES (?, ?, ?, ?, ?)",
                    (plan.name, plan.description, plan.doc_json, plan.created_at, plan.updated_at),
                )
        except Conflict as exc:
            raise AlreadyExists(f"a recovery plan named {plan.name!r} already exists") from exc

    def get_plan(self, name: str) -> RecoveryPlan | None:
        row = self._one("SELECT * FROM recovery_plans WHERE name = ?", (name,))
        return None if row is None else RecoveryPlan(*row)

    def list_plans(self) -> list[RecoveryPlan]:
        return [RecoveryPlan(*r) for r in self._all("SELECT * FROM recovery_plans ORDER BY name")]

    def update_plan(self, name: str, doc_json: str, now: float) -> None:
        self._db.execute(
            "UPDATE recovery_plans SET doc_json = ?, updated_at = ? WHERE name = ?",
            (doc_json, now, name),
        )

    def delete_plan(self, name: str) -> bool:
        return self._db.execute("DELETE FROM recovery_plans WHERE name = ?", (name,)) == 1
