"""Scheduled drills: each plan's ``--every``, started on the leader broker when due."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from broker.drills import SCHEDULER, DrillManager
from broker.store.base import Store
from broker.store.leadership import Leader
from broker.store.models import DrillSchedule
from broker.store.sqlite import Tx
from sitepair.clock import Clock
from sitepair.errors import NotFound, SitepairError

log = logging.getLogger("sitepair.broker.drills")


@dataclasses.dataclass(frozen=True)
class Due:
    """A scheduled drill that came due: started (its job) or skipped (why)."""

    plan: str
    drill: str
    job: str = ""
    skipped: str = ""


class DrillScheduler:
    """Starts the drills that are due, on the leader broker only. A schedule's next time is
    moved on before its drill starts, in one conditional update, so a drill runs once even
    when brokers change leadership in between; a broker that was down does not make up for
    the drills it missed: one drill runs, and the next is one interval later."""

    def __init__(
        self, *, store: Store, clock: Clock, drills: DrillManager, check_every: float = 60.0
    ) -> None:
        self._store = store
        self._clock = clock
        self._drills = drills
        self.check_every = check_every

    async def run(self, *, leader: Leader | None = None) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            if leader is None or leader.is_leader:
                try:
                    await self.tick()
                except SitepairError:
                    log.exception("scheduled drills could not start")

    async def tick(self) -> list[Due]:
        """Start (or record as skipped) every drill that is due now."""
        now = self._clock.now()
        schedules = await self._store.reading(lambda tx: tx.list_drill_schedules())
        out: list[Due] = []
        for s in schedules:
            if s.next_at > now:
                continue
            following = s.next_at + s.every_seconds
            if following <= now:
                following = now + s.every_seconds
            if not await self._move(s, following):
                continue  # another broker took this one
            try:
                job = await self._drills.start(s.plan, by=SCHEDULER)
            except SitepairError as exc:
                if isinstance(exc, NotFound):  # the plan was deleted: its schedule goes
                    await self._drills.set_schedule(s.plan, 0, by=SCHEDULER, known=False)
                skipped = await self._drills.record_skipped(s.plan, exc.message, by=SCHEDULER)
                out.append(Due(s.plan, skipped.id, skipped=exc.message))
                continue
            drill = json.loads(job.params_json)["drill"]
            out.append(Due(s.plan, drill, job=job.id))
        return out

    async def _move(self, schedule: DrillSchedule, next_at: float) -> bool:
        def move(tx: Tx) -> bool:
            return tx.move_drill_schedule(
                schedule.plan, seen_next_at=schedule.next_at, next_at=next_at
            )

        return await self._store.writing(move)
