"""The embedded store: SQLite in WAL mode, versioned migrations, dataclasses out.

Usage::

    store = SqliteStore.open(home / "broker.db")
    with store.write() as tx:          # BEGIN IMMEDIATE: one writer at a time, atomically
        tx.insert_job(job)
    with store.read() as tx:
        jobs = tx.list_jobs()

Every method is blocking; the broker calls the store from worker threads
(``asyncio.to_thread``), never on its event loop. Each thread gets its own connection.
``synchronous=FULL``: a committed registration, command or epoch survives power loss; the
heartbeat writer batches many heartbeats per transaction, so the fsync cost stays small.

The queries themselves live in :mod:`broker.store.repository`, shared with the PostgreSQL
store; this module only opens connections, runs transactions and migrations. A SQLite store
belongs to one broker (the file is in its home), so it is never :attr:`~Store.shared`.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from broker.store.base import (
    SCHEMA_MIGRATIONS_DDL,
    InFlight,
    Store,
    StoreError,
    migrations,
    newer_schema_error,
)
from broker.store.repository import Tx
from broker.store.session import SQLITE, Conflict, Session

# ``Tx`` is broker.store.repository's; it is importable from here too, where callers long found it.
__all__ = ["SqliteStore", "StoreError", "Tx", "migrations"]

log = logging.getLogger("sitepair.broker.store")


class _SqliteSession(Session):
    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._c.execute(sql, args).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._c.executemany(sql, rows)

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._c.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._c.execute(sql, args).fetchall())

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        # A failed statement leaves a SQLite transaction usable: nothing to undo.
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc


class SqliteStore(Store):
    dialect = SQLITE
    shared = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._inflight = InFlight()

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        store = cls(path)
        store.migrate()
        return store

    @property
    def description(self) -> str:
        return f"sqlite:{self.path}"

    # -- connections ------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open store {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[Tx]:
        with self._inflight.transaction(str(self.path)):
            conn = self._conn()
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise _store_error(self.path, exc) from exc
            try:
                yield Tx(_SqliteSession(conn))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise _store_error(self.path, exc) from exc

    def write(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock up front)."""
        return self._transaction("BEGIN IMMEDIATE")

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """A consistent read snapshot."""
        return self._transaction("BEGIN DEFERRED")

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new transactions, wait for those in progress, then close every connection.
        If some are still running after ``timeout``, the connections are left open (the
        process is ending): closing them under a running statement would crash it."""
        running = self._inflight.close(timeout)
        self._closed = True
        if running:
            log.warning(
                "store closed with transactions still running; connections left open",
                extra={"fields": {"store": str(self.path), "running": running}},
            )
            return
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()

    # -- schema -----------------------------------------------------------------------------
    def schema_version(self) -> int:
        conn = self._conn()
        conn.execute(SCHEMA_MIGRATIONS_DDL)
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self, to: int | None = None) -> int:
        """Apply every migration newer than the store's version (up to version ``to``), each in
        its own transaction."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            current = self.schema_version()
        except sqlite3.DatabaseError as exc:
            raise _store_error(self.path, exc) from exc
        known = migrations(SQLITE)
        if current > len(known):
            raise newer_schema_error(str(self.path), current, len(known))
        target = len(known) if to is None else to
        conn = self._conn()
        for version, name, sql in known[current:target]:
            script = (
                "BEGIN IMMEDIATE;\n"
                + sql
                + f"\nINSERT INTO schema_migrations VALUES ({version}, '{name}', {time.time()});"
                + "\nCOMMIT;"
            )
            try:
                conn.executescript(script)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise StoreError(
                    f"migration {version} ({name}) failed on {self.path}: {exc}"
                ) from exc
        return max(current, target)


def _store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if "disk is full" in text or "database or disk is full" in text:
        return StoreError(f"store {path}: the disk is full", hint="free space, then retry")
    if "not a database" in text or "malformed" in text:
        return StoreError(
            f"store {path} is damaged ({text})", hint="restore it from a backup of the broker home"
        )
    return StoreError(f"store {path}: {text}")
