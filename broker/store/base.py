"""What every store backend shares: the errors, the migrations, the store's surface.

How the backends' SQL differs is :mod:`broker.store.session`'s; the queries are the
repository's (:class:`~broker.store.repository.Tx`), which a transaction yields.

Migrations are one numbered sequence of files, ``NNNN_name.sql``, applied in order on both
backends and recorded in ``schema_migrations``. They are written in the common subset of the
two SQL dialects; the type names above are the only words translated.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.resources
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from broker.store.repository import Tx
from broker.store.session import SQLITE, Dialect
from sitepair.errors import SitepairError

log = logging.getLogger("sitepair.broker.store")

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

T = TypeVar("T")


class StoreError(SitepairError):
    """The store cannot be opened or used (a newer schema, a damaged file, a full disk)."""

    status = "UNAVAILABLE"


class RetryableError(StoreError):
    """A transaction failed for a reason that running it again can cure.

    Serialization failures, deadlocks, and a connection lost before the commit was sent: the
    transaction was rolled back as a whole, so :meth:`Store.transact` runs it again.
    """


#: The table that records which migrations a store has applied (same columns on both).
SCHEMA_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
)


def migrations(dialect: Dialect = SQLITE) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped with this code, in order."""
    found = []
    for entry in importlib.resources.files("broker.store.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            sql = dialect.ddl(entry.read_text(encoding="utf-8"))
            found.append((int(m.group(1)), m.group(2), sql))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


def newer_schema_error(where: str, current: int, known: int) -> StoreError:
    return StoreError(
        f"store {where} has schema version {current}, newer than this broker knows ({known})",
        hint="run the newer sitepair version that wrote it",
    )


class InFlight:
    """Transactions in progress, so that a store's close() can wait for them: closing a
    connection another thread is using crashes the process (SQLite) or the driver (libpq), and a
    worker thread of a cancelled task can still be inside a transaction when the broker shuts
    down."""

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def transaction(self, description: str) -> Iterator[None]:
        with self._idle:
            if self._closed:
                raise StoreError(f"store {description} is closed")
            self._count += 1
        try:
            yield
        finally:
            with self._idle:
                self._count -= 1
                self._idle.notify_all()

    def close(self, timeout: float) -> int:
        """Refuse new transactions and wait up to ``timeout`` for the running ones; returns how
        many are still running (0: the connections may be closed)."""
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._count == 0, timeout=timeout)
            return self._count


class Store(abc.ABC):
    """The broker's store: transactions that yield the repository, plus schema management.

    ``write()`` transactions run one at a time, across every broker using the store, so a
    read-check-write inside one is atomic (taking a registration key use, recording a command
    outcome once, never leaving a job's final state). ``read()`` is a consistent snapshot.
    """

    #: The SQL dialect of this backend.
    dialect: Dialect
    #: Whether several brokers may use this store at once (leader election is then needed).
    shared: bool = False
    #: Attempts :meth:`transact` makes before it gives up on a retryable failure.
    attempts: int = 5
    #: Told ("read" or "write", seconds) after each attempt of :meth:`transact` (the broker's
    #: metrics, :mod:`broker.metrics`); None = nobody listens.
    on_transaction: Callable[[str, float], None] | None = None

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the store is, for logs and ``info`` (never a password)."""

    @abc.abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction: serialised with every other writer, committed at the end."""

    @abc.abstractmethod
    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """A read-only, consistent snapshot."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; the store cannot be used afterwards."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The newest migration applied to the store (0 for an empty one)."""

    @abc.abstractmethod
    def migrate(self, to: int | None = None) -> int:
        """Apply every migration newer than the store's version, up to version ``to`` (all of
        them by default; tests stop early to write a store as an older broker did); returns
        the version."""

    def transact(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``fn`` in a transaction, running it again after a :class:`RetryableError`.

        ``fn`` may run more than once, so it must do nothing but store work. Retries are
        bounded (:attr:`attempts`), with a short randomised back-off; the last failure is raised.
        """
        for attempt in range(1, self.attempts + 1):
            started = time.perf_counter()
            try:
                with self.write() if write else self.read() as tx:
                    return fn(tx)
            except RetryableError as exc:
                if attempt == self.attempts:
                    raise
                log.info(
                    "store transaction retried",
                    extra={"fields": {"attempt": attempt, "why": exc.message}},
                )
            finally:
                if self.on_transaction is not None:
                    self.on_transaction("write" if write else "read", time.perf_counter() - started)
            backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def reading(self, fn: Callable[[Tx], T]) -> T:
        """:meth:`transact` ``fn`` in a read snapshot, off the event loop."""
        return await asyncio.to_thread(self.transact, fn, write=False)

    async def writing(self, fn: Callable[[Tx], T]) -> T:
        """:meth:`transact` ``fn`` in a write transaction, off the event loop (``fn`` may run
        more than once after a retryable failure, so it does nothing but store work)."""
        return await asyncio.to_thread(self.transact, fn, write=True)


def backoff(attempt: int) -> None:
    """Sleep before retry number ``attempt``: 20 ms doubling, randomised, at most ~0.6 s."""
    time.sleep(min(0.02 * 2 ** (attempt - 1), 0.5) * (0.5 + random.random()))  # noqa: S311
