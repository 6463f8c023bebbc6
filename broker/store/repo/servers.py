"""Servers (the hosts whose agents enrolled): registration, connection state, heartbeats."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from broker import bounds
from broker.store.models import HeartbeatRecord, Server
from broker.store.repo.core import Queries
from broker.store.session import Conflict
from sitepair.errors import AlreadyExists, FailedPrecondition, NotFound

_SERVER_COLS = (
    "id, name, site, registered_at, registration_key_id, cert_serial, cert_not_after, "
    "facts_json, agent_version, cloud, connected, connected_since, disconnected_at, "
    "last_heartbeat_at, last_heartbeat_sent_at, last_heartbeat_seq, metrics_json, removed_at"
)


def _server(row: tuple[Any, ...]) -> Server:
    values = list(row)
    values[10] = bool(values[10])
    return Server(*values)


class ServerQueries(Queries):
    def insert_server(self, s: Server) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    f"INSERT INTO servers ({_SERVER_COLS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.id,
                        s.name,
                        s.site,
                        s.registered_at,
                        s.registration_key_id,
                        s.cert_serial,
                        s.cert_not_after,
                        s.facts_json,
                        s.agent_version,
                        s.cloud,
                        int(s.connected),
                        s.connected_since,
                        s.disconnected_at,
                        s.last_heartbeat_at,
                        s.last_heartbeat_sent_at,
                        s.last_heartbeat_seq,
                        s.metrics_json,
                        s.removed_at,
                    ),
                )
        except Conflict as exc:
            raise AlreadyExists(
                f"a server named {s.name!r} is already registered at site {s.site!r}",
                hint="remove it first with `sitepair-broker servers remove`, or pick another name",
            ) from exc

    def get_server(self, server_id: str) -> Server | None:
        row = self._one(f"SELECT {_SERVER_COLS} FROM servers WHERE id = ?", (server_id,))
        return None if row is None else _server(row)

    def find_server(self, ref: str) -> Server:
        """By id, or by name among servers not removed (a name must then be unambiguous)."""
        server = self.get_server(ref)
        if server is not None:
            return server
        rows = self._all(
            f"SELECT {_SERVER_COLS} FROM servers WHERE name = ? AND removed_at IS NULL", (ref,)
        )
        if not rows:
            raise NotFound(f"no server with id or name {ref!r}", hint="see `servers list`")
        if len(rows) > 1:
            sites = ", ".join(sorted(r[2] for r in rows))
            raise FailedPrecondition(
                f"server name {ref!r} exists at several sites ({sites})", hint="use its id"
            )
        return _server(rows[0])

    def list_servers(self, *, site: str = "", include_removed: bool = False) -> list[Server]:
        sql = f"SELECT {_SERVER_COLS} FROM servers WHERE 1 = 1"
        args: list[Any] = []
        if site:
            sql += " AND site = ?"
            args.append(site)
        if not include_removed:
            sql += " AND removed_at IS NULL"
        return [_server(r) for r in self._all(sql + " ORDER BY site, name", args)]

    def server_page(
        self,
        *,
        site: str = "",
        include_removed: bool = False,
        after: tuple[str, str, str] | None,
        limit: int,
    ) -> list[Server]:
        """Servers by (site, name, id) after ``after``; facts and metrics over their caps are
        read as ``{}`` and named in ``Server.withheld``."""
        facts_over = "length(facts_json) > ?"
        metrics_over = "length(metrics_json) > ?"
        cols = _SERVER_COLS.replace(
            "facts_json", f"CASE WHEN {facts_over} THEN '{{}}' ELSE facts_json END"
        ).replace("metrics_json", f"CASE WHEN {metrics_over} THEN '{{}}' ELSE metrics_json END")
        sql = (
            f"SELECT {cols}, CASE WHEN {facts_over} THEN 1 ELSE 0 END, "
            f"CASE WHEN {metrics_over} THEN 1 ELSE 0 END FROM servers WHERE 1 = 1"
        )
        facts_cap, metrics_cap = bounds.MAX_STORED_FACTS, bounds.MAX_STORED_METRICS
        args: list[Any] = [facts_cap, metrics_cap, facts_cap, metrics_cap]
        if site:
            sql += " AND site = ?"
            args.append(site)
        if not include_removed:
            sql += " AND removed_at IS NULL"
        if after is not None:
            sql += " AND (site, name, id) > (?, ?, ?)"
            args += list(after)
        args.append(limit)
        out = []
        for row in self._all(sql + " ORDER BY site, name, id LIMIT ?", args):
            withheld = tuple(
                name for name, flag in (("facts", row[-2]), ("metrics", row[-1])) if flag
            )
            out.append(dataclasses.replace(_server(row[:-2]), withheld=withheld))
        return out

    def server_names(self, server_ids: Sequence[str]) -> dict[str, str]:
        """Names of the servers among ``server_ids`` (removed ones too)."""
        if not server_ids:
            return {}
        marks = ", ".join("?" for _ in server_ids)
        rows = self._all(f"SELECT id, name FROM servers WHERE id IN ({marks})", list(server_ids))
        return {r[0]: r[1] for r in rows}

    def removed_server_ids(self) -> set[str]:
        return {r[0] for r in self._all("SELECT id FROM servers WHERE removed_at IS NOT NULL")}

    def set_server_connected(
        self, server_id: str, *, now: float, facts_json: str, agent_version: str, cloud: str
    ) -> None:
        self._db.execute(
            "UPDATE servers SET connected = 1, connected_since = ?, facts_json = ?, "
            "agent_version = ?, cloud = CASE WHEN ? <> '' THEN ? ELSE cloud END, "
            "last_heartbeat_at = ? WHERE id = ?",
            (now, facts_json, agent_version, cloud, cloud, now, server_id),
        )

    def set_servers_disconnected(self, server_ids: Sequence[str], now: float) -> None:
        self._db.executemany(
            "UPDATE servers SET connected = 0, disconnected_at = ? WHERE id = ? AND connected = 1",
            [(now, sid) for sid in server_ids],
        )

    def disconnect_all_servers(self, now: float) -> int:
        """At broker start: nobody is connected to a broker that has just started."""
        return self._db.execute(
            "UPDATE servers SET connected = 0, disconnected_at = ? WHERE connected = 1", (now,)
        )

    def connected_servers_silent_since(self, cutoff: float) -> list[str]:
        rows = self._all(
            "SELECT id FROM servers WHERE connected = 1 AND removed_at IS NULL "
            "AND coalesce(last_heartbeat_at, 0) < ?",
            (cutoff,),
        )
        return [r[0] for r in rows]

    def mark_server_removed(self, server_id: str, now: float) -> None:
        self._db.execute(
            "UPDATE servers SET removed_at = ?, connected = 0 WHERE id = ? AND removed_at IS NULL",
            (now, server_id),
        )

    def update_server_certificate(self, server_id: str, serial: str, not_after: float) -> None:
        self._db.execute(
            "UPDATE servers SET cert_serial = ?, cert_not_after = ? WHERE id = ?",
            (serial, not_after, server_id),
        )

    # -- heartbeats ------------------------------------------------------------------------
    def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        self._db.executemany(
            "UPDATE servers SET last_heartbeat_at = ?, last_heartbeat_sent_at = ?, "
            "last_heartbeat_seq = ?, metrics_json = ? WHERE id = ? AND removed_at IS NULL",
            [(b.received_at, b.sent_at, b.seq, b.metrics_json, b.server_id) for b in beats],
        )
