"""Brokers sharing the store: their lease rows, timed by the store's clock
(:mod:`broker.store.leadership` elects the leader from them)."""

from __future__ import annotations

from broker.store.models import BrokerMember
from broker.store.repo.core import Queries


class BrokerQueries(Queries):
    def renew_broker(self, broker_id: str, description: str, lease: float) -> float:
        """Extend a broker's lease by ``lease`` seconds from now (store clock); returns now.

        Expired leases are deleted first, so a broker whose lease ran out joins again as the
        newest broker rather than taking the lead back from the one that took over.
        """
        now = self.store_now()
        self._db.execute("DELETE FROM brokers WHERE expires_at < ?", (now,))
        self._db.execute(
            "INSERT INTO brokers (id, description, started_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET description = excluded.description, "
            "expires_at = excluded.expires_at",
            (broker_id, description, now, now + lease),
        )
        return now

    def resign_broker(self, broker_id: str) -> None:
        """A broker that stops gives its lease up, so another can lead at once."""
        self._db.execute("DELETE FROM brokers WHERE id = ?", (broker_id,))

    def live_brokers(self) -> list[BrokerMember]:
        """Brokers whose lease has not run out, the leader first (the one that joined first)."""
        rows = self._all(
            "SELECT id, description, started_at, expires_at FROM brokers WHERE expires_at >= ? "
            "ORDER BY started_at, id",
            (self.store_now(),),
        )
        return [BrokerMember(*r) for r in rows]
