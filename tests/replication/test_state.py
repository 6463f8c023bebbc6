"""The agent's replication state database: the sender's crash-recovery state and its codec."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from agent.replication.state import PendingCycle, ReplicationState, SenderState, SourceConfig
from sitepair.errors import ConfigError


def config(rel: str = "rel-1") -> SourceConfig:
    return SourceConfig(
        relationship=rel, vm_id="vm-1", replica_host="h2", address="127.0.0.1:1", epoch=1
    )


def raw_sender_doc(path: Path, rel: str) -> object:
    db = sqlite3.connect(path)
    try:
        (doc,) = db.execute("SELECT doc FROM sources WHERE relationship = ?", (rel,)).fetchone()
    finally:
        db.close()
    return json.loads(doc)["_extra"]


def test_sender_state_survives_a_reopen_with_its_pending_cycle(tmp_path: Path) -> None:
    path = tmp_path / "replication.db"
    state = ReplicationState(path)
    sender = SenderState(
        tracker="scan",
        initial_method="OFFLINE",
        export_path="/mnt/drive",
        cycle=PendingCycle(sequence=4, cut_id="cut-9", kind=2),
    )
    state.put_source(config(), sender)
    state.close()
    reopened = ReplicationState(path)
    assert reopened.source("rel-1") == (config(), sender)
    assert reopened.sources() == [(config(), sender)]
    assert raw_sender_doc(path, "rel-1")["version"] == 1  # type: ignore[index]
    reopened.close()


def test_sender_state_written_by_an_older_agent_is_read(tmp_path: Path) -> None:
    """Agents before the typed state stored a bare dict with any subset of the keys."""
    path = tmp_path / "replication.db"
    state = ReplicationState(path)
    doc = dataclasses.asdict(config())
    doc["_extra"] = {
        "tracker": "changelog",
        "paused": True,
        "initial_at": 0.0,
        "cycle": {"sequence": 2, "cut_id": "c", "kind": 1},
    }
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO sources VALUES (?, ?)", ("rel-1", json.dumps(doc)))
    db.close()
    assert state.sender("rel-1") == SenderState(
        paused=True, cycle=PendingCycle(sequence=2, cut_id="c", kind=1)
    )
    state.close()


def test_sender_state_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="newer than this agent"):
        SenderState.from_doc({"version": 2, "tracker": "scan"}, where="source rel-1")
    with pytest.raises(ConfigError, match="damaged"):
        SenderState.from_doc({"cycle": {"sequence": 1}}, where="source rel-1")


def test_update_sender_changes_one_field_and_keeps_the_config(tmp_path: Path) -> None:
    state = ReplicationState(tmp_path / "replication.db")
    state.put_source(config(), SenderState(tracker="scan", needs_resync=True))
    new = state.update_sender("rel-1", lambda s: dataclasses.replace(s, paused=True))
    assert new == SenderState(tracker="scan", needs_resync=True, paused=True)
    assert state.source("rel-1") == (config(), new)
    with pytest.raises(ConfigError, match="no source relationship rel-2"):
        state.update_sender("rel-2", lambda s: s)
    state.close()
