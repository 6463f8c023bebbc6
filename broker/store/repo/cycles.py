"""Replication cycles as the broker saw them commit: each relationship's recent history."""

from __future__ import annotations

from broker.store.models import Cycle
from broker.store.repo.core import Queries

#: Cycles kept per relationship: a day at the shortest copy frequency (30 s) is 2,880.
CYCLES_KEPT = 3000


class CycleQueries(Queries):
    def record_cycle(self, cycle: Cycle, *, keep: int = CYCLES_KEPT) -> bool:
        """Keep a committed cycle (once: a repeated report of it changes nothing) and drop the
        relationship's cycles beyond the newest ``keep``. True if it was new."""
        added = self._db.execute(
            "INSERT INTO cycles VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (relationship_id, sequence) DO NOTHING",
            (
                cycle.relationship_id,
                cycle.sequence,
                cycle.finished_at,
                cycle.cut_at,
                cycle.seconds,
                cycle.bytes,
            ),
        )
        if added:
            self._db.execute(
                "DELETE FROM cycles WHERE relationship_id = ? AND sequence <= ("
                "SELECT sequence FROM cycles WHERE relationship_id = ? "
                "ORDER BY sequence DESC LIMIT 1 OFFSET ?)",
                (cycle.relationship_id, cycle.relationship_id, keep),
            )
        return bool(added)

    def recent_cycles(self, relationship_id: str, limit: int) -> list[Cycle]:
        """The relationship's newest ``limit`` cycles, newest first."""
        rows = self._db.all(
            "SELECT relationship_id, sequence, finished_at, cut_at, seconds, bytes FROM cycles "
            "WHERE relationship_id = ? ORDER BY sequence DESC LIMIT ?",
            (relationship_id, limit),
        )
        return [
            Cycle(
                relationship_id=r[0],
                sequence=int(r[1]),
                finished_at=float(r[2]),
                cut_at=float(r[3]),
                seconds=float(r[4]),
                bytes=int(r[5]),
            )
            for r in rows
        ]
