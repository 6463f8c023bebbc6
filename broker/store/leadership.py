"""Who leads: the broker that runs the periodic work only one broker of a vault should do.

A SQLite store belongs to one broker, which always leads (:class:`SoleLeadership`). Brokers
sharing a PostgreSQL store elect a leader through it (:class:`LeaseLeadership`): each holds a
lease row in ``brokers`` and renews it every third of the lease; the live broker that joined
first leads. What the leader alone does, and why, is written in :mod:`broker.store.postgres`.

Safety: the store's clock times leases. A broker starts renewal at local monotonic time ``t0``;
the database stamps the lease ``now + lease`` at some moment after ``t0``, so no other broker
can see it expired before ``t0 + lease``. The leader acts as one only until
``t0 + lease * SAFETY`` (by its own monotonic clock), so two brokers never both act as leader,
even when the leader is cut off from the database and cannot learn that it lost the lead.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.store.base import Store
from broker.store.models import BrokerMember
from broker.store.repository import Tx
from sitepair.errors import SitepairError

log = logging.getLogger("sitepair.broker.leadership")

#: The part of a lease a leader uses before it stops acting as leader without a renewal.
SAFETY = 0.9


class Leader(Protocol):
    """What periodic work asks before it runs: is this broker the leader right now?"""

    @property
    def is_leader(self) -> bool: ...


class Leadership(abc.ABC):
    """This broker's place among the brokers of its store."""

    def __init__(self, broker_id: str) -> None:
        #: This broker process's id (the owner of the jobs it creates).
        self.broker_id = broker_id

    @property
    @abc.abstractmethod
    def is_leader(self) -> bool:
        """Whether this broker may do the leader's work right now."""

    @abc.abstractmethod
    async def join(self) -> None:
        """Take part before the broker starts its periodic work (so ``is_leader`` is known)."""

    @abc.abstractmethod
    async def run(self, on_lead: Callable[[], Awaitable[None]]) -> None:
        """Keep taking part until :meth:`shutdown`; ``on_lead`` runs on each turn as leader."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop taking part (idempotent)."""


class SoleLeadership(Leadership):
    """The only broker of its store (SQLite): always the leader, nothing to renew."""

    def __init__(self, broker_id: str) -> None:
        super().__init__(broker_id)
        self._stop = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return True

    async def join(self) -> None:
        return  # nobody to agree with

    async def run(self, on_lead: Callable[[], Awaitable[None]]) -> None:
        # Start-up recovery already ran; a sole broker has nobody's work to take over later.
        await self._stop.wait()

    async def shutdown(self) -> None:
        self._stop.set()


class LeaseLeadership(Leadership):
    """One of several brokers on a shared store: leads while the oldest live lease is its own."""

    def __init__(
        self,
        store: Store,
        broker_id: str,
        *,
        lease: float = 15.0,
        description: str = "",
    ) -> None:
        super().__init__(broker_id)
        if lease <= 0:
            raise ValueError("the leader lease must be positive")
        self._store = store
        self.lease = lease
        self.description = description
        self._leading_until = 0.0  # local monotonic time
        self._stop = asyncio.Event()
        self._stopped = False

    @property
    def is_leader(self) -> bool:
        return not self._stopped and time.monotonic() < self._leading_until

    @property
    def renew_interval(self) -> float:
        return self.lease / 3

    async def renew(self) -> bool:
        """Renew this broker's lease and learn who leads; returns ``is_leader``."""
        started = time.monotonic()

        def renew(tx: Tx) -> list[BrokerMember]:
            tx.renew_broker(self.broker_id, self.description, self.lease)
            return tx.live_brokers()

        was = self.is_leader
        members = await self._store.writing(renew)
        if self._stopped:
            return False
        leading = bool(members) and members[0].id == self.broker_id
        self._leading_until = started + self.lease * SAFETY if leading else 0.0
        if leading != was:
            log.info(
                "leadership changed",
                extra={
                    "fields": {
                        "broker": self.broker_id,
                        "leader": leading,
                        "brokers": [m.id for m in members],
                    }
                },
            )
        return leading

    async def join(self) -> None:
        await self.renew()

    async def run(self, on_lead: Callable[[], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.renew_interval)
            if self._stop.is_set():
                return
            try:
                leading = await self.renew()
            except SitepairError as exc:
                # The store is unreachable: the lead lapses by itself; keep trying.
                log.warning(
                    "leader lease renewal failed",
                    extra={"fields": {"broker": self.broker_id, "error": exc.message}},
                )
                continue
            if leading:
                try:
                    await on_lead()
                except Exception:
                    log.exception("leader work failed")

    async def shutdown(self) -> None:
        """Stop renewing and give the lease up, so another broker leads at once."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()

        def resign() -> None:
            with self._store.write() as tx:
                tx.resign_broker(self.broker_id)

        try:
            await asyncio.to_thread(resign)
        except SitepairError as exc:
            log.warning(
                "could not give the leader lease up; it expires by itself",
                extra={"fields": {"broker": self.broker_id, "error": exc.message}},
            )
