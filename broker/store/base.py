"""What every store backend shares: the error, the migrations, the dialects, the store's surface.

The broker's SQL is written once, in SQLite's spelling with ``?`` placeholders, and a
:class:`Dialect` says how a backend differs:

- placeholders (``?`` for SQLite, ``%s`` for psycopg);
- the column types of the migrations: SQLite's ``REAL``, ``BLOB`` and ``INTEGER`` are
  ``DOUBLE PRECISION``, ``BYTEA`` and ``BIGINT`` on PostgreSQL (PostgreSQL's own ``REAL`` would
  round timestamps to single precision and its ``INTEGER`` is 32 bits), and text compares and
  sorts byte-wise (``COLLATE "C"``) as SQLite's does, so every ``ORDER BY`` lists rows in the
  same order on both;
- how the store's own clock is read (leases are timed by the database, not by broker clocks).

Migrations are one numbered sequence of files, ``NNNN_name.sql``, applied in order on both
backends and recorded in ``schema_migrations``. They are written in the common subset of the
two SQL dialects; the type names above are the only words translated.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sitepair.errors import SitepairError

if TYPE_CHECKING:
    from broker.store.repository import Tx

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


class Conflict(Exception):
    """An insert broke a uniqueness (or other integrity) constraint; the transaction goes on."""


@dataclasses.dataclass(frozen=True)
class Dialect:
    """How one backend spells what the shared SQL needs."""

    name: str
    #: The placeholder the driver wants instead of ``?``.
    placeholder: str
    #: Column types of the migrations: SQLite's name -> this backend's.
    types: tuple[tuple[str, str], ...] = ()
    #: A SQL expression: the database server's clock, in seconds since the epoch.
    now: str = "((julianday('now') - 2440587.5) * 86400.0)"

    def sql(self, text: str) -> str:
        """A shared statement in this dialect (placeholders only; the SQL has no ``?`` else)."""
        if self.placeholder == "?":
            return text
        return text.replace("%", "%%").replace("?", self.placeholder)

    def ddl(self, script: str) -> str:
        """A migration script in this dialect: comments dropped, type names translated."""
        if not self.types:
            return script
        # Migrations keep ``--`` out of string literals, so this only strips comments.
        script = re.sub(r"--[^\n]*", "", script)
        table = dict(self.types)
        pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in table) + r")\b")
        return pattern.sub(lambda m: table[m.group(1)], script)


SQLITE = Dialect(name="sqlite", placeholder="?")

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    types=(
        ("REAL", "DOUBLE PRECISION"),
        ("BLOB", "BYTEA"),
        ("INTEGER", "BIGINT"),
        ("TEXT", 'TEXT COLLATE "C"'),
    ),
    now="extract(epoch FROM clock_timestamp())::double precision",
)

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


class Session(abc.ABC):
    """One connection inside one transaction, as the repository (:class:`Tx`) uses it."""

    dialect: Dialect

    @abc.abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abc.abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of arguments."""

    @abc.abstractmethod
    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""

    @abc.abstractmethod
    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""

    @abc.abstractmethod
    def guarded(self) -> contextlib.AbstractContextManager[None]:
        """Statements inside may break a constraint: :class:`Conflict` is raised and the
        transaction stays usable, as it does on SQLite (PostgreSQL needs a savepoint for that).
        """


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
    def migrate(self) -> int:
        """Apply every migration newer than the store's version; returns the version."""

    def transact(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``fn`` in a transaction, running it again after a :class:`RetryableError`.

        ``fn`` may run more than once, so it must do nothing but store work. Retries are
        bounded (:attr:`attempts`), with a short randomised back-off; the last failure is raised.
        """
        for attempt in range(1, self.attempts + 1):
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
