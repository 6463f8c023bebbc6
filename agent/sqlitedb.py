"""The agent's small SQLite databases (``<home>/state/*.db``), opened one way.

:class:`SqliteDb` opens a file in WAL mode with ``synchronous=FULL`` (a committed row survives a
power cut), a busy timeout, mode 0600 for a new file (SQLite gives its ``-wal`` and ``-shm``
files the same mode), and the schema applied and versioned with ``PRAGMA user_version``: a
database written by a newer agent (a higher version) is refused rather than misread, and one
written by an older agent is brought up to date by the ``migrations`` of the versions between. One
connection is shared by the threads of the process, one statement or transaction at a time
under :attr:`SqliteDb.lock`. Every call blocks: callers on an event loop run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from sitepair.errors import ConfigError

#: How long a statement waits for another connection's lock before failing (seconds).
BUSY_TIMEOUT = 5.0


class SqliteDb:
    """One database file: ``schema`` (``CREATE ... IF NOT EXISTS`` statements) at ``version``.
    ``what`` names the file in errors ("agent state", "replication state").

    ``migrations[n]`` is the script that turns a file at version ``n - 1`` into version ``n``;
    it runs, in one transaction with the others, only for a file an older agent wrote (a new
    file gets ``schema`` as it is now)."""

    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        version: int,
        what: str,
        migrations: Mapping[int, str] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if sys.platform != "win32" and not path.exists():
            # Created private from the start; never chmod'ed after rows were written.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            self.db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            found = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if found > version:
                self.db.close()
                raise ConfigError(
                    f"{what} {path} has schema version {found}; this agent knows {version}",
                    hint="run the agent version that wrote it",
                )
            if 0 < found < version and migrations:
                steps = [migrations[n] for n in range(found + 1, version + 1) if n in migrations]
                self.db.executescript("BEGIN IMMEDIATE;\n" + "\n".join(steps) + "\nCOMMIT;")
            self.db.executescript(schema)
            if found < version:
                self.db.execute(f"PRAGMA user_version = {int(version)}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{what} {path} cannot be opened: {exc}") from exc
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception), holding
        :attr:`lock` throughout."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
