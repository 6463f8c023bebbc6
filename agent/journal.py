"""The agent's command journal: the record that makes every command run at most once.

Before executing a command the agent records it as ``running`` (durably); afterwards it records
the outcome. When the broker redelivers a command (its acknowledgement was lost, or the agent
restarted), the journal answers:

* ``succeeded`` / ``failed``: acknowledge again with the stored outcome, do not run it again;
* ``running`` found at start-up (the agent died while running it): report it as failed, "
  interrupted", and do not run it again; the broker's job decides whether to retry with a new
  command (which has a new id).

A finished command's result is kept as the serialized ``sitepair.v1.CommandResult`` it was
acknowledged with (schema version 2). Journals from before (version 1) kept the result as JSON
text in ``result_json``; version 2 adds the ``result`` column empty, so a command finished
before the upgrade is re-acknowledged with an empty result (its outcome and error stay right;
the broker already holds the result of all but a lost acknowledgement).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.sqlitedb import SqliteDb
from sitepair.v1 import control_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,          -- running, succeeded, failed
    received_at REAL NOT NULL,
    finished_at REAL,
    result_json TEXT NOT NULL DEFAULT '',  -- version 1: the result as JSON; no longer written
    error TEXT NOT NULL DEFAULT '',
    result BLOB NOT NULL DEFAULT x''       -- the serialized sitepair.v1.CommandResult
);
"""

_MIGRATIONS = {2: "ALTER TABLE commands ADD COLUMN result BLOB NOT NULL DEFAULT x'';"}


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    id: str
    kind: str
    state: str
    received_at: float
    finished_at: float | None
    result: bytes  # a serialized sitepair.v1.CommandResult; empty for none
    error: str

    def command_result(self) -> control_pb2.CommandResult:
        """The typed result this command was acknowledged with."""
        return control_pb2.CommandResult.FromString(self.result)


class CommandJournal:
    def __init__(self, path: Path) -> None:
        self._file = SqliteDb(
            path, schema=_SCHEMA, version=2, what="agent state", migrations=_MIGRATIONS
        )
        self._db = self._file.db
        self._lock = self._file.lock

    def close(self) -> None:
        self._file.close()

    def get(self, command_id: str) -> JournalEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, state, received_at, finished_at, result, error "
                "FROM commands WHERE id = ?",
                (command_id,),
            ).fetchone()
        return None if row is None else JournalEntry(*row)

    def begin(self, command_id: str, kind: str, now: float) -> JournalEntry | None:
        """Record a command as running. Returns the existing entry if it was seen before (then
        the caller must not run it), or None if this is its first delivery."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO commands (id, kind, state, received_at) "
                "VALUES (?, ?, 'running', ?)",
                (command_id, kind, now),
            )
            if cur.rowcount == 1:
                return None
        return self.get(command_id)

    def finish(
        self,
        command_id: str,
        *,
        ok: bool,
        now: float,
        result: control_pb2.CommandResult | None = None,
        error: str = "",
    ) -> None:
        data = result.SerializeToString(deterministic=True) if result is not None else b""
        with self._lock:
            self._db.execute(
                "UPDATE commands SET state = ?, finished_at = ?, result = ?, error = ? "
                "WHERE id = ?",
                ("succeeded" if ok else "failed", now, data, error, command_id),
            )

    def interrupted(self, now: float) -> list[str]:
        """At start-up: commands left 'running' by a previous process; marked failed."""
        with self._lock:
            ids = [
                r[0] for r in self._db.execute("SELECT id FROM commands WHERE state = 'running'")
            ]
            self._db.execute(
                "UPDATE commands SET state = 'failed', finished_at = ?, "
                "error = 'the agent stopped while running this command; it was not run again' "
                "WHERE state = 'running'",
                (now,),
            )
        return ids
