"""Scheduled verification: every protected replica compared with its source, block by block.

Replication proves each cycle it sends (digests travel with the blocks), but not what happens to
a replica afterwards: a disk that rots, a tool that writes the replica folder, a bug of ours. A
verification (`vms verify`, see docs/replication.md) catches all three; this module runs one
for every protected VM once per ``[verify] interval``, like a RAID scrub, so that a failover
finds a replica that was proven identical recently. Its outcome is kept on the relationship and
turns health Warning (repaired) or Critical (not repaired).

A verification reads every allocated block on both hosts, so at most ``concurrent`` run at once
across the vault, the most overdue first, and only on the leader broker. A verification that
fails (a host went away) is tried again after ``retry``, not at every tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from broker.documents import Verification
from broker.jobs import JobManager
from broker.protection import ProtectionManager
from broker.store.base import Store
from broker.store.leadership import Leader
from broker.store.models import JobState, Relationship, RelationshipState
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import SitepairError

log = logging.getLogger("sitepair.broker.verify")

#: The operator name scheduled verification jobs carry.
SCHEDULER = "scheduler"


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    #: Verify every protected VM this often (seconds); 0 turns scheduled verification off.
    interval: float = 7 * 86400.0
    #: Send mismatching blocks again (like `vms verify`); false only reports them.
    repair: bool = True
    #: Verifications running at once in the vault (each reads whole disks on two hosts).
    concurrent: int = 1
    #: After a verification failed, wait this long before trying that VM again.
    retry: float = 3600.0
    #: How often the schedule is looked at.
    check_every: float = 60.0


class VerifyScheduler:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        jobs: JobManager,
        protection: ProtectionManager,
        config: VerifyConfig,
    ) -> None:
        self._store = store
        self._clock = clock
        self._jobs = jobs
        self._protection = protection
        self.config = config

    async def run(self, *, leader: Leader | None = None) -> None:
        if self.config.interval <= 0:
            log.info("scheduled verification is off ([verify] interval = 0)")
            return
        while True:
            await asyncio.sleep(self.config.check_every)
            if leader is None or leader.is_leader:
                try:
                    await self.tick()
                except SitepairError:
                    log.exception("scheduled verification could not start")

    async def tick(self) -> list[str]:
        """Start the verifications that are due, up to the limit; returns their job ids."""
        if self.config.interval <= 0:
            return []
        running = await self._running()
        free = self.config.concurrent - len(running)
        if free <= 0:
            return []
        now = self._clock.now()

        def read(tx: Tx) -> list[Relationship]:
            rels = tx.list_relationships()
            connected = {s.id for s in tx.list_servers() if s.connected}
            return [
                r
                for r in rels
                if r.state == RelationshipState.PROTECTED
                and not r.paused
                and r.primary_server in connected
                and r.replica_server in connected
                and r.id not in running
            ]

        due = sorted(
            ((self._due_at(r), r) for r in await self._store.reading(read)),
            key=lambda pair: pair[0],
        )
        started: list[str] = []
        for at, rel in due:
            if at > now or len(started) >= free:
                break
            await self._mark_attempt(rel.id, now)
            try:
                job = await self._protection.action(
                    rel.id, "verify", by=SCHEDULER, repair=self.config.repair
                )
            except SitepairError as exc:
                log.warning(
                    "scheduled verification refused",
                    extra={"fields": {"vm": rel.vm_name, "error": str(exc)}},
                )
                continue
            log.info(
                "scheduled verification started",
                extra={"fields": {"vm": rel.vm_name, "job": job.id, "overdue_s": int(now - at)}},
            )
            started.append(job.id)
        return started

    def _due_at(self, rel: Relationship) -> float:
        last = Verification.decode(rel.verify_json)
        due = (last.at or rel.created_at) + self.config.interval
        attempted = last.attempted_at
        if attempted > last.at:
            # The last attempt did not finish with a result: wait before the next one.
            due = max(due, attempted + self.config.retry)
        return due

    async def _mark_attempt(self, rel_id: str, now: float) -> None:
        def update(tx: Tx) -> None:
            rel = tx.get_relationship(rel_id)
            if rel is None:
                return
            last = Verification.decode(rel.verify_json)
            attempt = dataclasses.replace(last, attempted_at=now)
            tx.update_relationship(rel_id, now, verify_json=attempt.encode())

        await self._store.writing(update)

    async def _running(self) -> set[str]:
        """Relationships with a verification job still going (whoever started it)."""
        busy: set[str] = set()
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.WAITING):
            for job in await self._jobs.list(state=state.value, kind="replication-action"):
                params = json.loads(job.params_json or "{}")
                if params.get("action") == "verify":
                    busy.add(str(params.get("relationship", "")))
        return busy
