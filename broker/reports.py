"""Replication reports and health: what hosts say about their relationships, and what it means.

Each host reports the status of its relationships about once a second. A status counts only from
the host that holds that role (:meth:`ReplicationReports.on_report`); it is stored cut to size,
its cycle counters join the recent history (:class:`broker.health.CycleHistory`), and whoever
waits for a relationship's progress (initial replication, the first cycle after reversing) is
woken. :meth:`ReplicationReports.evaluate_health` turns statuses, history and the hosts' liveness
into each relationship's health, every ``[health] interval`` on the leader broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math

from broker.documents import StoredStatus, progress_message, status_of
from broker.health import CycleHistory, HealthConfig, drill_reasons, evaluate
from broker.orchestration import StepFailed, StepRun
from broker.store.base import Store
from broker.store.leadership import Leader
from broker.store.models import Cycle, Relationship, RelationshipState
from broker.store.repository import RelationshipChanges
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import SitepairError
from sitepair.protoconv import seconds
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.reports")

#: Statuses looked at in one replication report (a host reports one per relationship and role;
#: more than this is not a host we would give that many relationships).
MAX_STATUSES_PER_REPORT = 4096
#: Longest text kept from a status, per field; longer text is cut.
STATUS_TEXT_LIMITS = {
    "relationship_id": 64,
    "vm_id": 128,
    "last_error": 2048,
    "app_consistent_error": 2048,
}

Role = control_pb2.Role
State = control_pb2.ReplicationState
#: The relationship state a primary's reported state moves the relationship to, from the states
#: it may move it from (a failover, a disable or the initial copy are the broker's own moves).
_PRIMARY_MOVES: dict[int, tuple[RelationshipState, tuple[RelationshipState, ...]]] = {
    State.STATE_RESYNC_REQUIRED: (
        RelationshipState.RESYNC_REQUIRED,
        (RelationshipState.PROTECTED,),
    ),
    State.STATE_RESYNCHRONIZING: (
        RelationshipState.RESYNCHRONIZING,
        (RelationshipState.PROTECTED, RelationshipState.RESYNC_REQUIRED),
    ),
    State.STATE_PROTECTED: (
        RelationshipState.PROTECTED,
        (RelationshipState.RESYNCHRONIZING, RelationshipState.RESYNC_REQUIRED),
    ),
}
#: Recovery points kept from a status (24 hourly points, the latest, and room for pinned ones).
MAX_STATUS_POINTS = 64
#: The largest value the store's 64-bit signed integers hold (a host reports unsigned ones).
MAX_STORED_INT = 2**63 - 1
#: Longest cycle duration kept in the cycle history (a week; a report beyond it is not a cycle).
MAX_CYCLE_SECONDS = 7 * 86400.0


def cycle_of(status: control_pb2.RelationshipStatus) -> Cycle | None:
    """The cycle a primary's status says it committed last, for the cycle history; None before
    the first one, or when the host's numbers are not a cycle (not finite, negative, or past what
    the store holds): a hostile or confused host cannot fail the report's transaction."""
    if not status.committed_sequence or not status.HasField("last_success_at"):
        return None
    finished = seconds(status.last_success_at)
    cut = seconds(status.last_cut_at) if status.HasField("last_cut_at") else finished
    took = status.last_cycle_seconds
    if (
        status.committed_sequence > MAX_STORED_INT
        or not all(math.isfinite(v) and v >= 0 for v in (finished, cut, took))
        or took > MAX_CYCLE_SECONDS
    ):
        return None
    return Cycle(
        relationship_id=status.relationship_id,
        sequence=status.committed_sequence,
        finished_at=finished,
        cut_at=cut,
        seconds=took,
        bytes=min(status.last_cycle_bytes, MAX_STORED_INT),
    )


class ReplicationReports:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        agent_lifetime: float,
        health: HealthConfig | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._agent_lifetime = agent_lifetime
        self._health_config = health or HealthConfig()
        #: Recent cycle counters of each relationship, from its primary's reports.
        self.history = CycleHistory()
        self._reported = asyncio.Condition()
        self._refused_count = 0
        self._refused_logged_at: float | None = None
        #: The sequence of each relationship's cycle last kept in the history, so a status
        #: repeated every second writes nothing more (after a restart: one write, ignored).
        self._cycle_kept: dict[str, int] = {}

    async def next_report(self, within: float) -> None:
        """Wait until a host's statuses were taken, or ``within`` seconds."""
        async with self._reported:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reported.wait(), timeout=within)

    async def wait_first_cycle(self, step: StepRun, rel_id: str) -> str:
        """Wait for the primary to report a committed cycle (after reverse replication)."""
        while True:
            rel = await self._store.reading(lambda tx: tx.get_relationship(rel_id))
            if rel is None:
                raise StepFailed(f"relationship {rel_id} disappeared")
            primary = status_of(rel.primary_status_json)
            if primary.state == State.STATE_PROTECTED and primary.cycles_succeeded >= 1:
                return f"replica at sequence {primary.committed_sequence}"
            await step.progress(
                progress_message(primary), done=primary.progress_done, total=primary.progress_total
            )
            await self.next_report(2.0)

    def forget(self, rel_id: str) -> None:
        """A relationship was disabled: its cycle history goes."""
        self.history.forget(rel_id)
        self._cycle_kept.pop(rel_id, None)

    async def on_report(self, server_id: str, report: control_pb2.ReplicationReport) -> None:
        """Take the statuses a host reports, for the relationships it is party to only.

        A status counts only from the host that holds that role in the relationship (primary
        status from the primary host, replica status from the replica host): another host's
        word about a relationship costs nothing (no history, no store write) and is logged at
        most once a minute. Free-form fields are cut to size before they are stored.
        """
        now = self._clock.now()
        mine: dict[str, Relationship] = await self._store.reading(
            lambda tx: {r.id: r for r in tx.relationships_of_server(server_id)}
        )
        statuses = report.relationships
        kept: dict[tuple[str, int], control_pb2.RelationshipStatus] = {}
        refused = max(0, len(statuses) - MAX_STATUSES_PER_REPORT)
        example = ""
        for status in statuses[:MAX_STATUSES_PER_REPORT]:
            rel = mine.get(status.relationship_id)
            if (
                rel is None
                or status.role == Role.ROLE_UNSPECIFIED
                or _role_of(rel, server_id) != status.role
            ):
                refused += 1
                example = example or status.relationship_id
                continue
            kept[(status.relationship_id, status.role)] = status  # the last one of each
        if refused:
            self._note_refused(server_id, refused, example)
        if not kept:
            return
        docs = [(st, _stored(st, now).encode()) for st in kept.values()]

        recorded: dict[str, int] = {}

        def update(tx: Tx) -> list[control_pb2.RelationshipStatus]:
            recorded.clear()  # a transaction retried from the start records again
            taken: list[control_pb2.RelationshipStatus] = []
            for st, doc in docs:
                rel = tx.get_relationship(st.relationship_id)  # again: it may have changed
                if (
                    rel is None
                    or rel.disabled_at is not None
                    or _role_of(rel, server_id) != st.role
                ):
                    continue
                fields: RelationshipChanges = {}
                if st.role == Role.ROLE_PRIMARY:
                    fields["primary_status_json"] = doc
                    cycle = cycle_of(st)
                    if cycle is not None and self._cycle_kept.get(rel.id) != cycle.sequence:
                        tx.record_cycle(cycle)
                        recorded[rel.id] = cycle.sequence
                    move = _PRIMARY_MOVES.get(st.state)
                    if move is not None and rel.state in move[1]:
                        fields["state"] = move[0]
                else:
                    fields["replica_status_json"] = doc
                tx.update_relationship(rel.id, now, **fields)
                taken.append(st)
            return taken

        taken: list[control_pb2.RelationshipStatus] = await self._store.writing(update)
        self._cycle_kept.update(recorded)
        for status in taken:
            if status.role == Role.ROLE_PRIMARY:
                self.history.add(
                    status.relationship_id,
                    now,
                    status.cycles_succeeded,
                    status.cycles_missed,
                    status.cycles_failed,
                )
        async with self._reported:
            self._reported.notify_all()

    def _note_refused(self, server_id: str, count: int, example: str) -> None:
        """One log line a minute at most for statuses refused (a confused or hostile host)."""
        self._refused_count += count
        at = self._clock.monotonic()
        if self._refused_logged_at is not None and at - self._refused_logged_at < 60.0:
            return
        log.warning(
            "replication statuses refused: the reporting host does not hold that role in "
            "those relationships (or sent too many)",
            extra={
                "fields": {
                    "server": server_id[:64],
                    "refused": self._refused_count,
                    "example": example[:64],
                }
            },
        )
        self._refused_logged_at = at
        self._refused_count = 0

    async def evaluate_health(self) -> list[tuple[str, str]]:
        """Recompute and store every active relationship's health; returns (id, health)."""
        now = self._clock.now()

        def run(tx: Tx) -> list[tuple[str, str]]:
            out = []
            drills = drill_reasons(tx.last_drills(), tx.list_plans())
            for rel in tx.list_relationships():
                health, reasons = evaluate(
                    rel,
                    primary=tx.get_server(rel.primary_server) if rel.primary_server else None,
                    replica=tx.get_server(rel.replica_server) if rel.replica_server else None,
                    now=now,
                    config=self._health_config,
                    history=self.history,
                    agent_lifetime=self._agent_lifetime,
                    drills=drills.get(rel.id, ()),
                )
                reasons_json = json.dumps([r.as_dict() for r in reasons], sort_keys=True)
                if health != rel.health or reasons_json != rel.health_reasons_json:
                    tx.update_relationship(
                        rel.id, now, health=health, health_reasons_json=reasons_json
                    )
                    if health != rel.health:
                        log.warning(
                            "replication health changed",
                            extra={
                                "fields": {
                                    "vm": rel.vm_name,
                                    "from": rel.health,
                                    "to": health,
                                    "reasons": [r.code for r in reasons],
                                }
                            },
                        )
                out.append((rel.id, health))
            return out

        out: list[tuple[str, str]] = await self._store.writing(run)
        # Relationships disabled or deleted since (by this broker or another) leave no samples.
        self.history.retain(rel_id for rel_id, _ in out)
        return out

    async def run_health(self, interval: float, *, leader: Leader | None = None) -> None:
        """Evaluate health every ``interval``; with several brokers, on the leader only."""
        while True:
            if leader is None or leader.is_leader:
                try:
                    await self.evaluate_health()
                except SitepairError:
                    log.exception("health evaluation failed")
            await asyncio.sleep(interval)


def _role_of(rel: Relationship, server_id: str) -> control_pb2.Role.ValueType:
    """The role ``server_id`` holds in ``rel`` (unspecified when it is neither side)."""
    if rel.primary_server == server_id:
        return Role.ROLE_PRIMARY
    if rel.replica_server == server_id:
        return Role.ROLE_REPLICA
    return Role.ROLE_UNSPECIFIED


def _stored(status: control_pb2.RelationshipStatus, now: float) -> StoredStatus:
    """A reported status as stored: free-form text cut to size, recovery points bounded."""
    st = control_pb2.RelationshipStatus()
    st.CopyFrom(status)
    for name, limit in STATUS_TEXT_LIMITS.items():
        value = getattr(st, name)
        if len(value) > limit:
            setattr(st, name, value[:limit])
    if len(st.points) > MAX_STATUS_POINTS:
        del st.points[: len(st.points) - MAX_STATUS_POINTS]  # keep the newest
    return StoredStatus(status=st, reported_at=now)
