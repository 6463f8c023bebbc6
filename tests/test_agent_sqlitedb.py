"""agent.sqlitedb: how the agent opens its SQLite files (the journal, the replication state)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from agent.journal import CommandJournal
from agent.replication.state import ReplicationState
from agent.sqlitedb import SqliteDb
from sitepair.errors import ConfigError

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY);"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_new_database_files_are_private(tmp_path: Path) -> None:
    for path, opener in (
        (tmp_path / "state" / "agent.db", CommandJournal),
        (tmp_path / "state" / "replication.db", ReplicationState),
    ):
        opener(path).close()
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_database_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    SqliteDb(path, schema=SCHEMA, version=1, what="test state").close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(ConfigError, match="schema version 7; this agent knows 1"):
        SqliteDb(path, schema=SCHEMA, version=1, what="test state")


def test_a_damaged_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "replication.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match=r"replication state .* cannot be opened"):
        ReplicationState(path)


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "x.db", schema=SCHEMA, version=1, what="test state")
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES ('a')")
        raise RuntimeError("boom")
    with db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES ('b')")
    assert db.db.execute("SELECT k FROM t").fetchall() == [("b",)]
    db.close()
