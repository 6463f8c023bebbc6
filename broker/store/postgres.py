"""The PostgreSQL store, for operators who run several brokers on one database.

Same surface as :class:`~broker.store.sqlite.SqliteStore` and the same repository
(:class:`~broker.store.repository.Tx`, the same SQL, dataclasses and errors)::

    store = PostgresStore.open("postgresql://sitepair@db.example/sitepair")
    with store.write() as tx:
        tx.insert_job(job)

The password never sits in the DSN or in ``broker.toml``: it comes from the
``SITEPAIR_DB_PASSWORD`` environment variable, or else libpq finds it (``~/.pgpass``,
``PGPASSFILE``). :attr:`PostgresStore.description` shows the DSN without a password.

Atomicity
    ``write()`` is ``BEGIN`` (READ COMMITTED) followed by a transaction-scoped advisory lock
    (``pg_advisory_xact_lock``) that every writer of this store takes, in every broker: write
    transactions run one at a time, exactly as SQLite's ``BEGIN IMMEDIATE`` makes them, and since
    each READ COMMITTED statement sees everything committed before it, a read-check-write inside
    one is atomic across brokers: a registration key use is consumed once, a command outcome is
    recorded once, a job never leaves a final state, a failover raises an epoch once. The lock
    key is derived from the database and schema, so two vaults in two schemas do not contend.
    Writers never conflict with each other, so they see no serialization failures or deadlocks;
    what can still go wrong transiently (a serialization failure or deadlock against some other
    client of the database, a connection dropped by a server restart or a fail-over of the
    database) is raised as :class:`~broker.store.base.RetryableError`. Starting a transaction
    (connecting, ``BEGIN``, taking the lock) is retried transparently, a bounded number of
    times; once the caller's code has run, only :meth:`~broker.store.base.Store.transact` can
    run it again, and it does so, bounded, for callers whose work is store-only. A connection
    lost while committing, with no answer from the server, is never retried: its outcome is
    unknown. ``read()`` is a REPEATABLE READ, READ ONLY snapshot and never waits for writers.
    Waiting for the write lock gives up after ``lock_timeout`` (30 s, as SQLite's busy
    timeout), and a session idle inside a transaction for a minute is ended by the server, so a
    stuck broker cannot hold every other one up.

Several brokers: leader election
    Each broker holds a lease row in ``brokers`` (:mod:`broker.store.leadership`), renewed every
    third of ``[store] leader_lease``; the live broker that joined first leads. Leases are
    timed by the database's clock, so broker clocks never decide who leads, and a leader stops
    acting as one when its own lease may have run out, before any other broker can take over.
    A broker that stops gives its lease up at once; one that dies loses it when it expires.
    Only the leader does the periodic work that must happen once for the whole vault:

    - the liveness monitor (:class:`broker.heartbeats.LivenessMonitor`): it marks every silent
      server disconnected, including servers whose broker died and can no longer do it; one
      sweep, not one per broker contending for the write lock and judging other brokers' agents;
    - the health evaluation loop (:meth:`broker.protection.ProtectionManager.run_health`): every
      relationship's health is computed and stored once, with one set of log lines on change;
    - job recovery (:meth:`broker.jobs.JobManager.recover`): at start-up and on every renewal,
      the leader takes over unfinished jobs whose broker is gone (their ``owner`` holds no live
      lease) and resumes them or fails them plainly. Jobs of live brokers are theirs: running a
      failover twice at once would be far worse than a short wait.

    Every other duty stays with every broker: serving enrollment, control streams and the admin
    API, batching heartbeats, delivering commands to its own agents, running its own jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from broker.store.base import (
    SCHEMA_MIGRATIONS_DDL,
    InFlight,
    RetryableError,
    Store,
    StoreError,
    backoff,
    migrations,
    newer_schema_error,
)
from broker.store.repository import Tx
from broker.store.session import POSTGRESQL, Conflict, Session

#: Where the broker finds the database password (never in broker.toml).
PASSWORD_ENV = "SITEPAIR_DB_PASSWORD"  # noqa: S105 - the variable's name, not a password

#: Connection settings applied to every session of the store.
_SESSION_SETTINGS = (
    "SET lock_timeout = '30s'; "
    "SET idle_in_transaction_session_timeout = '60s'; "
    "SET application_name = 'sitepair-broker'"
)

#: TCP keepalives so a dead database host is noticed in ~25 s, unless the DSN says otherwise.
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5"}

_RETRYABLE_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "57P01",  # admin_shutdown (server restarting)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (server starting)
}

log = logging.getLogger("sitepair.broker.store")


class _PgSession(Session):
    dialect = POSTGRESQL

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], cache: dict[str, str]) -> None:
        self._c = conn
        self._cache = cache

    def _q(self, sql: str) -> str:
        query = self._cache.get(sql)
        if query is None:
            query = self._cache[sql] = self.dialect.sql(sql)
        return query

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._c.execute(self._q(sql), _params(args)).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._c.cursor() as cur:
            cur.executemany(self._q(sql), [_params(r) for r in rows])

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self._c.execute(self._q(sql), _params(args)).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._c.execute(self._q(sql), _params(args)).fetchall()

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        # A failed statement aborts a PostgreSQL transaction; a savepoint keeps it usable, as a
        # failed statement leaves a SQLite transaction.
        self._c.execute("SAVEPOINT sitepair_guard")
        try:
            yield
        except psycopg.IntegrityError as exc:
            self._c.execute("ROLLBACK TO SAVEPOINT sitepair_guard")
            raise Conflict(str(exc)) from exc
        self._c.execute("RELEASE SAVEPOINT sitepair_guard")


def _params(args: Sequence[Any]) -> list[Any]:
    """Arguments as psycopg takes them; a NUL in text (which PostgreSQL refuses) becomes U+FFFD."""
    return [a.replace("\x00", "\ufffd") if isinstance(a, str) and "\x00" in a else a for a in args]


class PostgresStore(Store):
    dialect = POSTGRESQL
    shared = True

    def __init__(self, dsn: str, *, password: str | None = None) -> None:
        try:
            params: dict[str, Any] = dict(conninfo_to_dict(dsn))
        except psycopg.Error as exc:
            raise StoreError(f"not a valid PostgreSQL DSN: {exc}") from exc
        shown: dict[str, Any] = {k: v for k, v in params.items() if k != "password"}
        self._description = "postgresql:" + make_conninfo(**shown)
        if password is None:
            password = os.environ.get(PASSWORD_ENV) or None
        if password is not None:
            params["password"] = password
        for key, value in _KEEPALIVES.items():
            params.setdefault(key, value)
        params.setdefault("connect_timeout", "10")
        self._conninfo = make_conninfo("", **params)
        self._local = threading.local()
        self._all: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._inflight = InFlight()
        self._lock_key: int | None = None
        self._sql_cache: dict[str, str] = {}

    @classmethod
    def open(cls, dsn: str, *, password: str | None = None) -> PostgresStore:
        store = cls(dsn, password=password)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def description(self) -> str:
        return self._description

    # -- connections ------------------------------------------------------------------------
    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._closed:
            raise StoreError("store is closed")
        conn: psycopg.Connection[tuple[Any, ...]] | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            self._forget(conn)
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True)
            except psycopg.Error as exc:
                raise self._connect_error(exc) from exc
            try:
                conn.execute(_SESSION_SETTINGS)
                if self._lock_key is None:
                    row = conn.execute("SELECT current_database(), current_schema()").fetchone()
                    assert row is not None
                    self._lock_key = _lock_key(f"{row[0]}.{row[1]}")
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _forget(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        with contextlib.suppress(psycopg.Error):
            conn.close()
        with self._all_lock:
            if conn in self._all:
                self._all.remove(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _abort(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Roll back whatever is open; a connection that cannot is dropped."""
        try:
            if not conn.broken and not conn.closed:
                conn.execute("ROLLBACK")
                return
        except psycopg.Error:
            pass
        self._forget(conn)

    def _begin(self, write: bool) -> psycopg.Connection[tuple[Any, ...]]:
        """Start a transaction; transient failures (nothing of the caller's has run) are retried."""
        for attempt in range(1, self.attempts + 1):
            conn: psycopg.Connection[tuple[Any, ...]] | None = None
            try:
                conn = self._conn()
                if write:
                    conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_key])
                else:
                    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return conn
            except RetryableError:
                # Could not connect (the server is down or restarting).
                if attempt == self.attempts:
                    raise
                backoff(attempt)
            except psycopg.Error as exc:
                if conn is not None:
                    self._abort(conn)
                error = self._error(exc)
                if not isinstance(error, RetryableError) or attempt == self.attempts:
                    raise error from exc
                backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        with self._inflight.transaction(self._description):
            conn = self._begin(write)
            try:
                yield Tx(_PgSession(conn, self._sql_cache))
            except psycopg.Error as exc:
                self._abort(conn)
                raise self._error(exc) from exc
            except BaseException:
                self._abort(conn)
                raise
            try:
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                self._abort(conn)
                if exc.sqlstate:
                    # The server answered COMMIT with an error: it rolled the transaction back.
                    raise self._error(exc) from exc
                raise StoreError(
                    f"store {self._description}: committing failed, the outcome is unknown ({exc})",
                    hint="check the database; the operation may or may not have been recorded",
                ) from exc

    def write(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction, serialised with every writer of every broker on this store."""
        return self._transaction(write=True)

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """A consistent, read-only snapshot (REPEATABLE READ); never waits for writers."""
        return self._transaction(write=False)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new transactions, wait for those in progress, then close every connection
        (left open, with a warning, if some are still running after ``timeout``)."""
        running = self._inflight.close(timeout)
        self._closed = True
        if running:
            log.warning(
                "store closed with transactions still running; connections left open",
                extra={"fields": {"store": self._description, "running": running}},
            )
            return
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            self._all.clear()

    def _connect_error(self, exc: psycopg.Error) -> StoreError:
        """Why a connection could not be made; libpq gives no SQLSTATE, only its message."""
        where = f"store {self._description}"
        text = str(exc)
        if "authentication failed" in text or "no password supplied" in text:
            return StoreError(
                f"{where}: the database refused the login ({text})",
                hint=f"set {PASSWORD_ENV} in the broker's environment, or use ~/.pgpass",
            )
        if "FATAL:" in text and "starting up" not in text and "shutting down" not in text:
            return StoreError(f"{where}: {text}")  # no such database or role: retrying won't help
        # Refused, timed out, or a server starting or stopping: it may be back in a moment.
        return RetryableError(f"{where}: cannot connect ({text})")

    def _error(self, exc: psycopg.Error) -> StoreError:
        """What a driver error means for the broker (and whether running again may cure it)."""
        where = f"store {self._description}"
        state = exc.sqlstate or ""
        text = str(exc)
        if isinstance(exc, psycopg.OperationalError) and not state:
            return RetryableError(f"{where}: the connection was lost ({text})")
        if state in _RETRYABLE_SQLSTATES or state.startswith("08"):
            return RetryableError(f"{where}: {text}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StoreError(
                f"{where}: waited too long for the write lock",
                hint="another broker holds a transaction open; check the brokers and the database",
            )
        if isinstance(exc, psycopg.errors.DiskFull):
            return StoreError(f"{where}: the database server's disk is full")
        return StoreError(f"{where}: {exc}")

    # -- schema -----------------------------------------------------------------------------
    def schema_version(self) -> int:
        conn = self._begin(write=True)
        try:
            version = self._version(conn)
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._abort(conn)
            raise self._error(exc) from exc
        return version

    def _version(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        conn.execute(POSTGRESQL.ddl(SCHEMA_MIGRATIONS_DDL))
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row is not None else 0

    def migrate(self, to: int | None = None) -> int:
        """Apply every newer migration (up to version ``to``), each in its own transaction under
        the write lock.

        Brokers starting together take turns: each re-reads the version under the lock, so a
        migration is applied once, and writers of older brokers wait rather than see half a
        schema.
        """
        known = migrations(POSTGRESQL)
        target = len(known) if to is None else to
        while True:
            conn = self._begin(write=True)
            try:
                current = self._version(conn)
                if current > len(known):
                    raise newer_schema_error(self._description, current, len(known))
                if current >= target:
                    conn.execute("COMMIT")
                    return current
                version, name, sql = known[current]
                try:
                    conn.execute(sql)
                except psycopg.Error as exc:
                    raise StoreError(
                        f"migration {version} ({name}) failed on {self._description}: {exc}"
                    ) from exc
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                    [version, name, time.time()],
                )
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                self._abort(conn)
                raise self._error(exc) from exc
            except BaseException:
                self._abort(conn)
                raise


def _lock_key(scope: str) -> int:
    """The advisory lock every writer of one store (database and schema) takes: a signed int8."""
    digest = hashlib.blake2b(f"sitepair-store-write:{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
