"""The repository: every query the broker makes, written once for every backend.

:class:`Tx` runs inside one transaction of a :class:`~broker.store.base.Store` and speaks only
through a :class:`~broker.store.base.Session`, which adapts placeholders, unique-constraint
errors and row counts to the backend. Everything in here is the common subset of SQLite's and
PostgreSQL's SQL (``ON CONFLICT ... DO UPDATE``, ``coalesce``, ``CASE``, ``LIMIT``), so both
backends return the same dataclasses and raise the same errors for the same situations.

The admin API's lists read through the ``*_page`` queries: keyset paging (``after`` is the sort
key of the last row of the previous page; rows come in a total order, so a walk neither repeats
nor skips a row that exists throughout it), and values an agent controls that are over the
broker's caps (:mod:`broker.bounds`, stored by a broker older than those caps) are left out by
the query itself, so a page never even loads them; the row says which in ``withheld``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from broker import bounds
from broker.store.base import Conflict, Session
from broker.store.models import (
    BrokerMember,
    Cloud,
    CloudPair,
    Command,
    CommandState,
    HeartbeatRecord,
    HostStorage,
    InventoryVm,
    Job,
    JobState,
    JobStep,
    Mapping,
    Operator,
    RecoveryPlan,
    RegistrationKey,
    Relationship,
    RelationshipState,
    Server,
    StepState,
    StoredInventory,
)
from sitepair.errors import AlreadyExists, FailedPrecondition, NotFound


def _key(row: tuple[Any, ...]) -> RegistrationKey:
    return RegistrationKey(*row)


_SERVER_COLS = (
    "id, name, site, registered_at, registration_key_id, cert_serial, cert_not_after, "
    "facts_json, agent_version, cloud, connected, connected_since, disconnected_at, "
    "last_heartbeat_at, last_heartbeat_sent_at, last_heartbeat_seq, metrics_json, removed_at"
)


def _server(row: tuple[Any, ...]) -> Server:
    values = list(row)
    values[10] = bool(values[10])
    return Server(*values)


_JOB_COLS = (
    "id, kind, target, state, created_at, updated_at, created_by, finished_at, error, "
    "params_json, result_json, owner"
)
_STEP_COLS = (
    "job_id, idx, name, state, started_at, finished_at, message, progress_done, progress_total"
)
_COMMAND_COLS = (
    "id, server_id, kind, payload, state, created_at, delivered_at, deliveries, completed_at, "
    "result_json, error, job_id, job_step, job_step_name"
)


def _step(row: tuple[Any, ...]) -> JobStep:
    values = list(row)
    values[3] = StepState(values[3])
    return JobStep(*values)


def _command(row: tuple[Any, ...]) -> Command:
    values = list(row)
    values[4] = CommandState(values[4])
    return Command(*values)


class Tx:
    """The repository: every query the broker makes, inside one transaction."""

    def __init__(self, session: Session) -> None:
        self._db = session

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self._db.one(sql, args)

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.all(sql, args)

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def store_now(self) -> float:
        """The store's own clock (the database server's), in seconds since the epoch."""
        row = self._one(f"SELECT {self._db.dialect.now}")
        assert row is not None
        return float(row[0])

    # -- brokers sharing the store ----------------------------------------------------------
    def renew_broker(self, broker_id: str, description: str, lease: float) -> float:
        """Extend a broker's lease by ``lease`` seconds from now (store clock); returns now.

        Expired leases are deleted first, so a broker whose lease ran out joins again as the
        newest broker rather than taking the lead back from the one that took over.
        """
        now = self.store_now()
        self._db.execute("DELETE FROM brokers WHERE expires_at < ?", (now,))
        self._db.execute(
            "INSERT INTO brokers (id, description, started_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET description = excluded.description, "
            "expires_at = excluded.expires_at",
            (broker_id, description, now, now + lease),
        )
        return now

    def resign_broker(self, broker_id: str) -> None:
        """A broker that stops gives its lease up, so another can lead at once."""
        self._db.execute("DELETE FROM brokers WHERE id = ?", (broker_id,))

    def live_brokers(self) -> list[BrokerMember]:
        """Brokers whose lease has not run out, the leader first (the one that joined first)."""
        rows = self._all(
            "SELECT id, description, started_at, expires_at FROM brokers WHERE expires_at >= ? "
            "ORDER BY started_at, id",
            (self.store_now(),),
        )
        return [BrokerMember(*r) for r in rows]

    # -- registration keys ------------------------------------------------------------------
    def insert_key(self, key: RegistrationKey) -> None:
        self._db.execute(
            "INSERT INTO registration_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.id,
                key.site,
                key.secret_hash,
                key.created_at,
                key.expires_at,
                key.uses_total,
                key.uses_remaining,
                key.revoked_at,
                key.created_by,
            ),
        )

    def get_key(self, key_id: str) -> RegistrationKey | None:
        row = self._one("SELECT * FROM registration_keys WHERE id = ?", (key_id,))
        return None if row is None else _key(row)

    def list_keys(self) -> list[RegistrationKey]:
        return [_key(r) for r in self._all("SELECT * FROM registration_keys ORDER BY created_at")]

    def key_page(self, *, after: tuple[float, str] | None, limit: int) -> list[RegistrationKey]:
        """Keys oldest first, by (created_at, id), after the key ``after``."""
        sql = "SELECT * FROM registration_keys"
        args: list[Any] = []
        if after is not None:
            sql += " WHERE (created_at, id) > (?, ?)"
            args += list(after)
        args.append(limit)
        return [_key(r) for r in self._all(sql + " ORDER BY created_at, id LIMIT ?", args)]

    def consume_key_use(self, key_id: str) -> bool:
        """Take one use of a key atomically; False if none was left or it was revoked."""
        changed = self._db.execute(
            "UPDATE registration_keys SET uses_remaining = uses_remaining - 1 "
            "WHERE id = ? AND uses_remaining > 0 AND revoked_at IS NULL",
            (key_id,),
        )
        return changed == 1

    def revoke_key(self, key_id: str, now: float) -> RegistrationKey:
        changed = self._db.execute(
            "UPDATE registration_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now, key_id),
        )
        key = self.get_key(key_id)
        if key is None:
            raise NotFound(f"no registration key {key_id!r}")
        if changed == 0:
            raise FailedPrecondition(f"registration key {key_id} was already revoked")
        return key

    # -- servers ----------------------------------------------------------------------------
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

    def vm_counts(self, server_ids: Sequence[str]) -> dict[str, int]:
        """How many VMs the inventory tables hold for each of ``server_ids``."""
        if not server_ids:
            return {}
        marks = ", ".join("?" for _ in server_ids)
        rows = self._all(
            f"SELECT server_id, count(*) FROM vms WHERE server_id IN ({marks}) GROUP BY server_id",
            list(server_ids),
        )
        return {r[0]: int(r[1]) for r in rows}

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

    def record_heartbeats(self, beats: Sequence[HeartbeatRecord]) -> None:
        self._db.executemany(
            "UPDATE servers SET last_heartbeat_at = ?, last_heartbeat_sent_at = ?, "
            "last_heartbeat_seq = ?, metrics_json = ? WHERE id = ? AND removed_at IS NULL",
            [(b.received_at, b.sent_at, b.seq, b.metrics_json, b.server_id) for b in beats],
        )

    # -- inventory --------------------------------------------------------------------------
    def put_inventory(self, inv: StoredInventory) -> None:
        self._db.execute(
            "INSERT INTO server_inventory VALUES (?, ?, ?, ?, ?) ON CONFLICT (server_id) DO UPDATE "
            "SET digest = excluded.digest, collected_at = excluded.collected_at, "
            "received_at = excluded.received_at, payload = excluded.payload",
            (inv.server_id, inv.digest, inv.collected_at, inv.received_at, inv.payload),
        )

    def get_inventory(self, server_id: str) -> StoredInventory | None:
        row = self._one("SELECT * FROM server_inventory WHERE server_id = ?", (server_id,))
        return None if row is None else StoredInventory(*row)

    # -- operators --------------------------------------------------------------------------
    def insert_operator(self, op: Operator) -> None:
        self._db.execute(
            "INSERT INTO operators VALUES (?, ?, ?, ?, ?, ?)",
            (op.id, op.name, op.created_at, op.cert_serial, op.cert_not_after, op.removed_at),
        )

    def list_operators(self) -> list[Operator]:
        return [Operator(*r) for r in self._all("SELECT * FROM operators ORDER BY created_at")]

    # -- jobs -------------------------------------------------------------------------------
    def insert_job(self, job: Job) -> None:
        self._db.execute(
            f"INSERT INTO jobs ({_JOB_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.kind,
                job.target,
                job.state.value,
                job.created_at,
                job.updated_at,
                job.created_by,
                job.finished_at,
                job.error,
                job.params_json,
                job.result_json,
                job.owner,
            ),
        )
        self._db.executemany(
            f"INSERT INTO job_steps ({_STEP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    job.id,
                    s.index,
                    s.name,
                    s.state.value,
                    s.started_at,
                    s.finished_at,
                    s.message,
                    s.progress_done,
                    s.progress_total,
                )
                for s in job.steps
            ],
        )

    def get_job(self, job_id: str) -> Job | None:
        row = self._one(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            return None
        steps = tuple(
            _step(r)
            for r in self._all(
                f"SELECT {_STEP_COLS} FROM job_steps WHERE job_id = ? ORDER BY idx", (job_id,)
            )
        )
        (jid, kind, target, state, created, updated, by, finished, error, params, result, owner) = (
            row
        )
        return Job(
            id=jid,
            kind=kind,
            target=target,
            state=JobState(state),
            created_at=created,
            updated_at=updated,
            created_by=by,
            finished_at=finished,
            error=error,
            params_json=params,
            result_json=result,
            steps=steps,
            owner=owner,
        )

    def list_jobs(self, *, state: str = "", kind: str = "", limit: int = 100) -> list[Job]:
        sql = "SELECT id FROM jobs WHERE 1 = 1"
        args: list[Any] = []
        if state:
            sql += " AND state = ?"
            args.append(state)
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        jobs = [self.get_job(r[0]) for r in self._all(sql, args)]
        return [j for j in jobs if j is not None]

    def job_page(
        self, *, state: str = "", kind: str = "", after: tuple[float, str] | None, limit: int
    ) -> list[Job]:
        """Jobs newest first, by (created_at descending, id), after the job ``after``."""
        sql = "SELECT id FROM jobs WHERE 1 = 1"
        args: list[Any] = []
        if state:
            sql += " AND state = ?"
            args.append(state)
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if after is not None:
            sql += " AND (created_at < ? OR (created_at = ? AND id > ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        jobs = [self.get_job(r[0]) for r in self._all(sql, args)]
        return [j for j in jobs if j is not None]

    def adopt_orphaned_jobs(self, owner: str) -> list[str]:
        """Claim the unfinished jobs no live broker runs; returns their ids, oldest first.

        A job is orphaned when its owner is not ``owner`` and holds no live lease in ``brokers``
        (a broker that stopped or died). On a store only one broker uses, that is every
        unfinished job a previous run of the broker left behind.
        """
        now = self.store_now()
        rows = self._all(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running', 'waiting') AND owner <> ? "
            "AND owner NOT IN (SELECT id FROM brokers WHERE expires_at >= ?) "
            "ORDER BY created_at, id",
            (owner, now),
        )
        ids = [r[0] for r in rows]
        self._db.executemany("UPDATE jobs SET owner = ? WHERE id = ?", [(owner, i) for i in ids])
        return ids

    def unfinished_job_ids(self) -> list[str]:
        rows = self._all(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running', 'waiting') "
            "ORDER BY created_at"
        )
        return [r[0] for r in rows]

    def update_job(
        self,
        job_id: str,
        *,
        now: float,
        state: JobState | None = None,
        error: str | None = None,
        result_json: str | None = None,
    ) -> None:
        sets = ["updated_at = ?"]
        args: list[Any] = [now]
        if state is not None:
            sets.append("state = ?")
            args.append(state.value)
            if state.final:
                sets.append("finished_at = ?")
                args.append(now)
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        if result_json is not None:
            sets.append("result_json = ?")
            args.append(result_json)
        args.append(job_id)
        self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", args)

    def update_step(
        self,
        job_id: str,
        index: int,
        *,
        now: float,
        state: StepState | None = None,
        message: str | None = None,
        progress_done: int | None = None,
        progress_total: int | None = None,
    ) -> None:
        sets: list[str] = []
        args: list[Any] = []
        if state is not None:
            sets.append("state = ?")
            args.append(state.value)
            if state == StepState.RUNNING:
                sets.append("started_at = coalesce(started_at, ?)")
                args.append(now)
            elif state != StepState.PENDING:
                sets.append("finished_at = ?")
                args.append(now)
        if message is not None:
            sets.append("message = ?")
            args.append(message)
        if progress_done is not None:
            sets.append("progress_done = ?")
            args.append(progress_done)
        if progress_total is not None:
            sets.append("progress_total = ?")
            args.append(progress_total)
        if not sets:
            return
        args += [job_id, index]
        self._db.execute(
            f"UPDATE job_steps SET {', '.join(sets)} WHERE job_id = ? AND idx = ?",
            args,
        )
        self._db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (now, job_id))

    # -- commands ---------------------------------------------------------------------------
    def insert_command(self, cmd: Command) -> None:
        self._db.execute(
            f"INSERT INTO commands ({_COMMAND_COLS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cmd.id,
                cmd.server_id,
                cmd.kind,
                cmd.payload,
                cmd.state.value,
                cmd.created_at,
                cmd.delivered_at,
                cmd.deliveries,
                cmd.completed_at,
                cmd.result_json,
                cmd.error,
                cmd.job_id,
                cmd.job_step,
                cmd.job_step_name,
            ),
        )

    def get_command(self, command_id: str) -> Command | None:
        row = self._one(f"SELECT {_COMMAND_COLS} FROM commands WHERE id = ?", (command_id,))
        return None if row is None else _command(row)

    def open_commands(self, server_id: str) -> list[Command]:
        rows = self._all(
            f"SELECT {_COMMAND_COLS} FROM commands WHERE server_id = ? "
            "AND state IN ('pending', 'delivered') ORDER BY created_at, id",
            (server_id,),
        )
        return [_command(r) for r in rows]

    def mark_commands_delivered(self, command_ids: Sequence[str], now: float) -> None:
        self._db.executemany(
            "UPDATE commands SET state = 'delivered', delivered_at = ?, "
            "deliveries = deliveries + 1 WHERE id = ? AND state IN ('pending', 'delivered')",
            [(now, cid) for cid in command_ids],
        )

    def complete_command(
        self,
        command_id: str,
        *,
        server_id: str,
        state: CommandState,
        now: float,
        result_json: str = "",
        error: str = "",
    ) -> Command | None:
        """Record a command's outcome once; None if it is unknown, not this server's, or done."""
        changed = self._db.execute(
            "UPDATE commands SET state = ?, completed_at = ?, result_json = ?, error = ? "
            "WHERE id = ? AND server_id = ? AND state IN ('pending', 'delivered')",
            (state.value, now, result_json, error, command_id, server_id),
        )
        if changed != 1:
            return None
        return self.get_command(command_id)

    def cancel_open_commands(self, server_id: str, now: float, reason: str) -> list[Command]:
        cmds = self.open_commands(server_id)
        self._db.execute(
            "UPDATE commands SET state = 'cancelled', completed_at = ?, error = ? "
            "WHERE server_id = ? AND state IN ('pending', 'delivered')",
            (now, reason, server_id),
        )
        return cmds

    def commands_for_job(self, job_id: str) -> list[Command]:
        rows = self._all(
            f"SELECT {_COMMAND_COLS} FROM commands WHERE job_id = ? ORDER BY created_at, id",
            (job_id,),
        )
        return [_command(r) for r in rows]

    # -- inventory tables -------------------------------------------------------------------
    def replace_inventory(
        self,
        server_id: str,
        vms: Sequence[InventoryVm],
        networks: Sequence[tuple[str, str]],
        storage: Sequence[HostStorage],
    ) -> None:
        """Make the server's VMs, networks and storage classifications exactly these."""
        self._db.execute("DELETE FROM vms WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    v.server_id,
                    v.vm_id,
                    v.name,
                    v.generation,
                    v.cpu_count,
                    v.memory_mb,
                    v.state,
                    v.disks_json,
                    v.nics_json,
                    v.updated_at,
                )
                for v in vms
            ],
        )
        self._db.execute("DELETE FROM host_networks WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO host_networks VALUES (?, ?, ?)",
            [(server_id, name, subnets) for name, subnets in networks],
        )
        self._db.execute("DELETE FROM host_storage WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO host_storage VALUES (?, ?, ?, ?, ?)",
            [(s.server_id, s.name, s.path, s.total_bytes, s.free_bytes) for s in storage],
        )

    def list_vms(self, *, server_id: str = "") -> list[InventoryVm]:
        sql = "SELECT * FROM vms"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [InventoryVm(*r) for r in self._all(sql + " ORDER BY name, server_id", args)]

    def vm_page(
        self, *, server_id: str = "", after: tuple[str, str, str] | None, limit: int
    ) -> list[InventoryVm]:
        """VMs by (name, server_id, vm_id) after ``after``; disk and NIC lists over their cap
        are read as ``[]`` and named in ``InventoryVm.withheld``; rows whose name or id is over
        :data:`~broker.bounds.MAX_STORED_KEY` are not listed."""
        disks_over = "length(disks_json) > ?"
        nics_over = "length(nics_json) > ?"
        sql = (
            "SELECT server_id, vm_id, name, generation, cpu_count, memory_mb, state, "
            f"CASE WHEN {disks_over} THEN '[]' ELSE disks_json END, "
            f"CASE WHEN {nics_over} THEN '[]' ELSE nics_json END, updated_at, "
            f"CASE WHEN {disks_over} THEN 1 ELSE 0 END, CASE WHEN {nics_over} THEN 1 ELSE 0 END "
            "FROM vms WHERE length(name) <= ? AND length(vm_id) <= ?"
        )
        cap, key_cap = bounds.MAX_STORED_VM_JSON, bounds.MAX_STORED_KEY
        args: list[Any] = [cap, cap, cap, cap, key_cap, key_cap]
        if server_id:
            sql += " AND server_id = ?"
            args.append(server_id)
        if after is not None:
            sql += " AND (name, server_id, vm_id) > (?, ?, ?)"
            args += list(after)
        args.append(limit)
        out = []
        for row in self._all(sql + " ORDER BY name, server_id, vm_id LIMIT ?", args):
            withheld = tuple(name for name, flag in (("disks", row[-2]), ("nics", row[-1])) if flag)
            out.append(dataclasses.replace(InventoryVm(*row[:-2]), withheld=withheld))
        return out

    def find_vms(self, ref: str) -> list[InventoryVm]:
        rows = self._all(
            "SELECT * FROM vms WHERE vm_id = ? OR name = ? ORDER BY server_id", (ref, ref)
        )
        return [InventoryVm(*r) for r in rows]

    def host_networks(self, server_id: str = "") -> list[tuple[str, str, str]]:
        sql = "SELECT server_id, name, subnets_json FROM host_networks"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [(r[0], r[1], r[2]) for r in self._all(sql + " ORDER BY name", args)]

    def host_storage(self, server_id: str = "") -> list[HostStorage]:
        sql = "SELECT * FROM host_storage"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [HostStorage(*r) for r in self._all(sql + " ORDER BY name", args)]

    # -- clouds ------------------------------------------------------------------------------
    def insert_cloud(self, cloud: Cloud) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    "INSERT INTO clouds VALUES (?, ?, ?, ?)",
                    (cloud.name, cloud.site, cloud.description, cloud.created_at),
                )
        except Conflict as exc:
            raise AlreadyExists(f"a cloud named {cloud.name!r} already exists") from exc

    def get_cloud(self, name: str) -> Cloud | None:
        row = self._one("SELECT * FROM clouds WHERE name = ?", (name,))
        return None if row is None else Cloud(*row)

    def list_clouds(self) -> list[Cloud]:
        return [Cloud(*r) for r in self._all("SELECT * FROM clouds ORDER BY name")]

    def delete_cloud(self, name: str) -> None:
        self._db.execute("DELETE FROM cloud_hosts WHERE cloud = ?", (name,))
        self._db.execute("DELETE FROM clouds WHERE name = ?", (name,))

    def set_host_cloud(self, server_id: str, cloud: str | None, now: float) -> None:
        self._db.execute("DELETE FROM cloud_hosts WHERE server_id = ?", (server_id,))
        if cloud is not None:
            self._db.execute("INSERT INTO cloud_hosts VALUES (?, ?, ?)", (server_id, cloud, now))

    def cloud_of(self, server_id: str) -> str | None:
        row = self._one("SELECT cloud FROM cloud_hosts WHERE server_id = ?", (server_id,))
        return None if row is None else str(row[0])

    def cloud_hosts(self, cloud: str) -> list[str]:
        return [
            r[0]
            for r in self._all(
                "SELECT server_id FROM cloud_hosts WHERE cloud = ? ORDER BY server_id", (cloud,)
            )
        ]

    # -- cloud pairs -------------------------------------------------------------------------
    def insert_pair(self, pair: CloudPair) -> None:
        self._db.execute(
            "INSERT INTO cloud_pairs VALUES (?, ?, ?, ?, ?)",
            (
                pair.primary_cloud,
                pair.recovery_cloud,
                pair.policy_json,
                pair.created_at,
                pair.updated_at,
            ),
        )

    def pair_of(self, cloud: str) -> CloudPair | None:
        """The pair a cloud belongs to, as primary or as recovery."""
        row = self._one(
            "SELECT * FROM cloud_pairs WHERE primary_cloud = ? OR recovery_cloud = ?",
            (cloud, cloud),
        )
        return None if row is None else CloudPair(*row)

    def list_pairs(self) -> list[CloudPair]:
        return [
            CloudPair(*r) for r in self._all("SELECT * FROM cloud_pairs ORDER BY primary_cloud")
        ]

    def update_pair_policy(self, primary_cloud: str, policy_json: str, now: float) -> None:
        self._db.execute(
            "UPDATE cloud_pairs SET policy_json = ?, updated_at = ? WHERE primary_cloud = ?",
            (policy_json, now, primary_cloud),
        )

    def delete_pair(self, primary_cloud: str) -> None:
        self._db.execute("DELETE FROM cloud_pairs WHERE primary_cloud = ?", (primary_cloud,))

    # -- mappings ----------------------------------------------------------------------------
    def put_mapping(self, kind: str, source: str, target: str, now: float) -> None:
        table, col, target_col = _MAPPING_TABLES[kind]
        self._db.execute(
            f"INSERT INTO {table} VALUES (?, ?, ?) ON CONFLICT ({col}) "
            f"DO UPDATE SET {target_col} = excluded.{target_col}",
            (source, target, now),
        )

    def list_mappings(self, kind: str) -> list[Mapping]:
        table, col, _ = _MAPPING_TABLES[kind]
        return [Mapping(*r) for r in self._all(f"SELECT * FROM {table} ORDER BY {col}")]

    def delete_mapping(self, kind: str, source: str) -> bool:
        table, col, _ = _MAPPING_TABLES[kind]
        return self._db.execute(f"DELETE FROM {table} WHERE {col} = ?", (source,)) == 1

    # -- relationships -----------------------------------------------------------------------
    def insert_relationship(self, r: Relationship) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    f"INSERT INTO relationships ({_REL_COLS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.id,
                        r.vm_id,
                        r.vm_name,
                        r.primary_cloud,
                        r.recovery_cloud,
                        r.primary_server,
                        r.replica_server,
                        r.state.value,
                        r.epoch,
                        r.policy_json,
                        r.replica_folder,
                        r.replica_vm_json,
                        r.primary_status_json,
                        r.replica_status_json,
                        r.health,
                        r.health_reasons_json,
                        int(r.paused),
                        r.created_at,
                        r.updated_at,
                        r.disabled_at,
                        r.failover_json,
                        r.verify_json,
                    ),
                )
        except Conflict as exc:
            raise AlreadyExists(f"VM {r.vm_name} is already protected") from exc

    def get_relationship(self, rel_id: str) -> Relationship | None:
        row = self._one(f"SELECT {_REL_COLS} FROM relationships WHERE id = ?", (rel_id,))
        return None if row is None else _relationship(row)

    def find_relationship(self, ref: str) -> Relationship:
        """By id, or the active relationship of a VM (id or name)."""
        r = self.get_relationship(ref)
        if r is not None:
            return r
        rows = self._all(
            f"SELECT {_REL_COLS} FROM relationships WHERE (vm_id = ? OR vm_name = ?) "
            "AND disabled_at IS NULL",
            (ref, ref),
        )
        if not rows:
            raise NotFound(f"no protected VM or relationship {ref!r}", hint="see `vms list`")
        if len(rows) > 1:
            raise FailedPrecondition(
                f"{ref!r} names several protected VMs; use the relationship id"
            )
        return _relationship(rows[0])

    def list_relationships(self, *, include_disabled: bool = False) -> list[Relationship]:
        sql = f"SELECT {_REL_COLS} FROM relationships"
        if not include_disabled:
            sql += " WHERE disabled_at IS NULL"
        return [_relationship(r) for r in self._all(sql + " ORDER BY vm_name, id")]

    def relationship_page(
        self, *, include_disabled: bool = False, after: tuple[str, str] | None, limit: int
    ) -> list[Relationship]:
        """Relationships by (vm_name, id) after ``after``; one whose VM name is over
        :data:`~broker.bounds.MAX_STORED_KEY` is not listed (GetProtected by id still shows it)."""
        sql = f"SELECT {_REL_COLS} FROM relationships WHERE length(vm_name) <= ?"
        args: list[Any] = [bounds.MAX_STORED_KEY]
        if not include_disabled:
            sql += " AND disabled_at IS NULL"
        if after is not None:
            sql += " AND (vm_name, id) > (?, ?)"
            args += list(after)
        args.append(limit)
        return [_relationship(r) for r in self._all(sql + " ORDER BY vm_name, id LIMIT ?", args)]

    def update_relationship(self, rel_id: str, now: float, **fields: Any) -> None:
        allowed = set(_REL_COLS.replace(" ", "").split(",")) - {"id", "created_at"}
        sets = []
        args: list[Any] = []
        for key, value in fields.items():
            if key not in allowed:
                raise ValueError(f"not a relationship column: {key}")
            sets.append(f"{key} = ?")
            if isinstance(value, enum.Enum):
                args.append(value.value)
            elif isinstance(value, bool):
                args.append(int(value))
            else:
                args.append(value)
        sets.append("updated_at = ?")
        args += [now, rel_id]
        self._db.execute(f"UPDATE relationships SET {', '.join(sets)} WHERE id = ?", args)

    def relationships_of_server(self, server_id: str) -> list[Relationship]:
        rows = self._all(
            f"SELECT {_REL_COLS} FROM relationships WHERE disabled_at IS NULL "
            "AND (primary_server = ? OR replica_server = ?)",
            (server_id, server_id),
        )
        return [_relationship(r) for r in rows]

    # -- recovery plans ----------------------------------------------------------------------
    def insert_plan(self, plan: RecoveryPlan) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    "INSERT INTO recovery_plans VALUES (?, ?, ?, ?, ?)",
                    (plan.name, plan.description, plan.doc_json, plan.created_at, plan.updated_at),
                )
        except Conflict as exc:
            raise AlreadyExists(f"a recovery plan named {plan.name!r} already exists") from exc

    def get_plan(self, name: str) -> RecoveryPlan | None:
        row = self._one("SELECT * FROM recovery_plans WHERE name = ?", (name,))
        return None if row is None else RecoveryPlan(*row)

    def list_plans(self) -> list[RecoveryPlan]:
        return [RecoveryPlan(*r) for r in self._all("SELECT * FROM recovery_plans ORDER BY name")]

    def update_plan(self, name: str, doc_json: str, now: float) -> None:
        self._db.execute(
            "UPDATE recovery_plans SET doc_json = ?, updated_at = ? WHERE name = ?",
            (doc_json, now, name),
        )

    def delete_plan(self, name: str) -> bool:
        return self._db.execute("DELETE FROM recovery_plans WHERE name = ?", (name,)) == 1


_MAPPING_TABLES = {
    "network": ("network_mappings", "source_network", "target_network"),
    "storage": ("storage_mappings", "source_class", "target_class"),
}

_REL_COLS = (
    "id, vm_id, vm_name, primary_cloud, recovery_cloud, primary_server, replica_server, state, "
    "epoch, policy_json, replica_folder, replica_vm_json, primary_status_json, "
    "replica_status_json, health, health_reasons_json, paused, created_at, updated_at, "
    "disabled_at, failover_json, verify_json"
)


def _relationship(row: tuple[Any, ...]) -> Relationship:
    values = list(row)
    values[7] = RelationshipState(values[7])
    values[16] = bool(values[16])
    return Relationship(*values)
