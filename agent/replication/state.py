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
import sqlite3
import threading
from pathlib import Path
from typing import Any

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

    def disk(self, disk_id: str) -> DiskGrant | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)

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


class ReplicationState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"replication state {path} cannot be opened: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- epochs ------------------------------------------------------------------------------
    def epoch(self, relationship: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT epoch FROM epochs WHERE relationship = ?", (relationship,)
            ).fetchone()
        return int(row[0]) if row else 0

    def observe_epoch(self, relationship: str, epoch: int) -> None:
        """Record ``epoch`` if it is the highest seen; raise StaleEpoch if it is lower."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT epoch FROM epochs WHERE relationship = ?", (relationship,)
                ).fetchone()
                highest = int(row[0]) if row else 0
                if epoch < highest:
                    raise StaleEpoch(
                        f"relationship {relationship}: epoch {epoch} is older than {highest}, "
                        "the highest this host has seen; refused (fenced)"
                    )
                if epoch > highest:
                    self._db.execute(
                        "INSERT INTO epochs VALUES (?, ?) ON CONFLICT (relationship) "
                        "DO UPDATE SET epoch = excluded.epoch",
                        (relationship, epoch),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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

    def put_source(self, source: SourceConfig, extra: dict[str, Any] | None = None) -> None:
        self.observe_epoch(source.relationship, source.epoch)
        doc = dataclasses.asdict(source)
        doc["_extra"] = extra or {}
        self._put("sources", source.relationship, doc)

    def source(self, relationship: str) -> tuple[SourceConfig, dict[str, Any]] | None:
        doc = self._get("sources", relationship)
        if not doc:
            return None
        extra = doc.pop("_extra", {})
        return SourceConfig(**doc), extra

    def sources(self) -> list[tuple[SourceConfig, dict[str, Any]]]:
        out = []
        for doc in self._all("sources"):
            extra = doc.pop("_extra", {})
            out.append((SourceConfig(**doc), extra))
        return out

    def update_source_extra(self, relationship: str, **changes: Any) -> dict[str, Any]:
        found = self.source(relationship)
        if found is None:
            raise ConfigError(f"no source relationship {relationship}")
        source, extra = found
        extra.update(changes)
        doc = dataclasses.asdict(source)
        doc["_extra"] = extra
        self._put("sources", relationship, doc)
        return extra

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
