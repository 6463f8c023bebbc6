"""What every part of the repository stands on: the transaction's session and the store clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.store.session import Session


class Queries:
    """Queries over one transaction's session; each aggregate's queries are a subclass, and
    :class:`~broker.store.repository.Tx` inherits them all."""

    def __init__(self, session: Session) -> None:
        self._db = session

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self._db.one(sql, args)

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.all(sql, args)

    def store_now(self) -> float:
        """The store's own clock (the database server's), in seconds since the epoch."""
        row = self._one(f"SELECT {self._db.dialect.now}")
        assert row is not None
        return float(row[0])
