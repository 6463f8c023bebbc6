"""What the agent remembers about its replication relationships (``<home>/state/replication.db``).

* **grants** (this host is the replica): which source host may send which relationship, with
  which authentication, at which epoch, into which folder; the broker's ticket key.
* **sources** (this host is the primary): where the replica is, the policy, the epoch, the
  outstanding cycle, and the statistics reported to the broker.
* **epochs**: the highest epoch this host has seen per relationship. Commands and cycles with a
  lower epoch are refused everywhere (fencing); the value only ever goes up.
* **nonces**: ticket nonces seen, until they expire (the replay cache survives restarts).
* **revoked hosts**: servers the broker removed from the vault (``RevokeHost``). Both replication
  ports refuse them from then on, whatever certificate or ticket they still hold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.sqlitedb import SqliteDb
from sitepair.errors import ConfigError, StaleEpoch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    relationship TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    relationship TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    relationship TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_hosts (
    host_id TEXT PRIMARY KEY,
    revoked_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class DiskGrant:
    disk_id: str
    virtual_size: int
    format: str = "vhdx"


@dataclasses.dataclass(frozen=True)
class Grant:
    """Permission for ``source_host`` to replicate ``relationship`` into ``folder`` on this host."""

    relationship: str
    vm_id: str
    vm_name: str
    source_host: str
    epoch: int
    folder: str  # replica root (the relationship's own folder)
    auth: str = "certificate"  # or "ticket"
    ticket_public_key: str = ""  # hex, for auth == "ticket"
    recovery_points: int = 0
    point_interval: float = 3600.0
    adopt: bool = False
    #: The only disk ids a cycle may name (from the broker's inventory, never from the sender).
    #: Empty for grants stored by an agent older than this field: the replica then accepts
    #: only the disks it already holds, and an initial cycle's ids that pass the name rule.
    disks: tuple[DiskGrant, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Grant:
        doc = dict(doc)
        doc["disks"] = tuple(DiskGrant(**d) for d in doc.get("disks", ()))
        return cls(**doc)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """This host replicates ``vm_id`` to ``replica_host`` at ``address``."""

    relationship: str
    vm_id: str
    replica_host: str
    address: str  # host:port of the replica's receiver
    epoch: int
    auth: str = "certificate"
    compression: bool = True
    copy_frequency: float = 300.0
    app_consistent_interval: float = 0.0  # 0 = never
    bandwidth_limit: float = 0.0  # bytes per second, 0 = unlimited
    paused: bool = False


@dataclasses.dataclass(frozen=True)
class PendingCycle:
    """The cycle a source started and has not seen committed: after a crash the same cut is
    sent again (the replica resumes it), or, if the replica committed it meanwhile, the cut
    is released."""

    sequence: int
    cut_id: str
    #: A ``replication_pb2.CycleKind`` value.
    kind: int


#: Version of the :class:`SenderState` document; 0 is the untagged dict of older agents (the
#: same keys, each optional).
SENDER_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SenderState:
    """What the sender of one relationship remembers across restarts, besides its
    :class:`SourceConfig`: how the initial copy is made, the outstanding cycle, whether a
    resync is owed, whether the operator paused it. Stored with the source as versioned JSON
    (:meth:`to_doc`, :meth:`from_doc`); changed with :meth:`ReplicationState.update_sender`."""

    #: How changes are found: "changelog" (the backend's change tracking) or "scan".
    tracker: str = "changelog"
    #: ``InitialReplication.Method`` name: NETWORK, SCHEDULED or OFFLINE.
    initial_method: str = "NETWORK"
    #: For SCHEDULED: when the initial cycle may start (Unix seconds, 0 = now).
    initial_at: float = 0.0
    #: For OFFLINE: the folder the initial copy is exported to.
    export_path: str = ""
    #: For OFFLINE: the initial copy was exported; the replica is to import it.
    exported: bool = False
    #: The operator paused replication (ReplicationAction PAUSE).
    paused: bool = False
    #: The next cycle must be a resync (change tracking was lost, or the replica is older).
    needs_resync: bool = False
    resync_reason: str = ""
    cycle: PendingCycle | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["version"] = SENDER_STATE_VERSION
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any], *, where: str) -> SenderState:
        doc = dict(doc)
        version = doc.pop("version", 0)
        if version not in (0, SENDER_STATE_VERSION):
            raise ConfigError(
                f"{where}: sender state version {version!r} is newer than this agent knows",
                hint="run the agent version that wrote it, or remove and re-add the source",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in doc.items() if k in known}
        try:
            cycle = fields.pop("cycle", None)
            return cls(
                **fields,
                cycle=PendingCycle(
                    sequence=int(cycle["sequence"]),
                    cut_id=str(cycle["cut_id"]),
                    kind=int(cycle["kind"]),
                )
                if cycle
                else None,
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{where}: the sender state is damaged: {exc}") from exc


class ReplicationState:
    """The database. Every method blocks on SQLite: call them from threads, not the loop."""

    def __init__(self, path: Path) -> None:
        self._file = SqliteDb(path, schema=_SCHEMA, version=1, what="replication state")
        self._db = self._file.db
        self._lock = self._file.lock

    def close(self) -> None:
        self._file.close()

    # -- epochs ------------------------------------------------------------------------------
    def epoch(self, relationship: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT epoch FROM epochs WHERE relationship = ?", (relationship,)
            ).fetchone()
        return int(row[0]) if row else 0

    def observe_epoch(self, relationship: str, epoch: int) -> None:
        """Record ``epoch`` if it is the highest seen; raise StaleEpoch if it is lower."""
        with self._file.transaction() as db:
            row = db.execute(
                "SELECT epoch FROM epochs WHERE relationship = ?", (relationship,)
            ).fetchone()
            highest = int(row[0]) if row else 0
            if epoch < highest:
                raise StaleEpoch(
                    f"relationship {relationship}: epoch {epoch} is older than {highest}, "
                    "the highest this host has seen; refused (fenced)"
                )
            if epoch > highest:
                db.execute(
                    "INSERT INTO epochs VALUES (?, ?) ON CONFLICT (relationship) "
                    "DO UPDATE SET epoch = excluded.epoch",
                    (relationship, epoch),
                )

    # -- grants and sources -----------------------------------------------------------------
    def put_grant(self, grant: Grant) -> None:
        self.observe_epoch(grant.relationship, grant.epoch)
        self._put("grants", grant.relationship, grant.to_doc())

    def grant(self, relationship: str) -> Grant | None:
        doc = self._get("grants", relationship)
        return Grant.from_doc(doc) if doc else None

    def grants(self) -> list[Grant]:
        return [Grant.from_doc(d) for d in self._all("grants")]

    def remove_grant(self, relationship: str) -> None:
        self._delete("grants", relationship)

    def put_source(self, source: SourceConfig, sender: SenderState | None = None) -> None:
        self.observe_epoch(source.relationship, source.epoch)
        self._put("sources", source.relationship, _source_doc(source, sender or SenderState()))

    def source(self, relationship: str) -> tuple[SourceConfig, SenderState] | None:
        doc = self._get("sources", relationship)
        return _source_from_doc(doc) if doc else None

    def sources(self) -> list[tuple[SourceConfig, SenderState]]:
        return [_source_from_doc(doc) for doc in self._all("sources")]

    def sender(self, relationship: str) -> SenderState:
        """The sender state of a source this host has (ConfigError if it has none)."""
        found = self.source(relationship)
        if found is None:
            raise ConfigError(f"no source relationship {relationship}")
        return found[1]

    def update_sender(
        self, relationship: str, change: Callable[[SenderState], SenderState]
    ) -> SenderState:
        """Replace the sender state of ``relationship`` with ``change(current)`` in one
        transaction (ConfigError if there is no such source); returns the new state. Call it
        like ``update_sender(rel, lambda s: dataclasses.replace(s, paused=True))``."""
        with self._file.transaction() as db:
            row = db.execute(
                "SELECT doc FROM sources WHERE relationship = ?", (relationship,)
            ).fetchone()
            if row is None:
                raise ConfigError(f"no source relationship {relationship}")
            source, current = _source_from_doc(json.loads(row[0]))
            new = change(current)
            db.execute(
                "UPDATE sources SET doc = ? WHERE relationship = ?",
                (json.dumps(_source_doc(source, new), sort_keys=True), relationship),
            )
        return new

    def remove_source(self, relationship: str) -> None:
        self._delete("sources", relationship)

    # -- revoked hosts ----------------------------------------------------------------------
    def revoke_host(self, host_id: str, *, reason: str, now: float) -> bool:
        """Refuse ``host_id`` on both ports from now on; False if it was already revoked."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO revoked_hosts VALUES (?, ?, ?)", (host_id, now, reason)
            )
            return cur.rowcount == 1

    def is_revoked(self, host_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM revoked_hosts WHERE host_id = ?", (host_id,)
            ).fetchone()
        return row is not None

    def revoked_hosts(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT host_id FROM revoked_hosts ORDER BY host_id").fetchall()
        return [str(r[0]) for r in rows]

    # -- ticket replay cache ----------------------------------------------------------------
    def remember_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Record a ticket nonce; False if it was seen before (a replay)."""
        with self._lock:
            self._db.execute("DELETE FROM nonces WHERE expires_at < ?", (now,))
            cur = self._db.execute(
                "INSERT OR IGNORE INTO nonces VALUES (?, ?)", (nonce, expires_at)
            )
            return cur.rowcount == 1

    # -- helpers ----------------------------------------------------------------------------
    def _put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO {table} VALUES (?, ?) ON CONFLICT (relationship) "  # noqa: S608 - fixed table names
                "DO UPDATE SET doc = excluded.doc",
                (key, json.dumps(doc, sort_keys=True)),
            )

    def _get(self, table: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT doc FROM {table} WHERE relationship = ?",  # noqa: S608
                (key,),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def _all(self, table: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(f"SELECT doc FROM {table} ORDER BY relationship").fetchall()  # noqa: S608
        return [json.loads(r[0]) for r in rows]

    def _delete(self, table: str, key: str) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {table} WHERE relationship = ?", (key,))  # noqa: S608


def _source_doc(source: SourceConfig, sender: SenderState) -> dict[str, Any]:
    doc = dataclasses.asdict(source)
    doc["_extra"] = sender.to_doc()
    return doc


def _source_from_doc(doc: dict[str, Any]) -> tuple[SourceConfig, SenderState]:
    doc = dict(doc)
    sender = SenderState.from_doc(
        doc.pop("_extra", None) or {}, where=f"source {doc.get('relationship')}"
    )
    return SourceConfig(**doc), sender
