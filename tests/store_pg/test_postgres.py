"""The PostgreSQL store on a real server: schema, races across connections, retries, leases."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.jobs import JobManager
from broker.store.base import RetryableError, StoreError, migrations
from broker.store.leadership import LeaseLeadership
from broker.store.models import Command, CommandState, JobState, RegistrationKey, Server
from broker.store.postgres import PostgresStore
from broker.store.repository import Tx
from broker.store.sqlite import SqliteStore
from sitepair.clock import ManualClock
from tests.store_pg.conftest import PASSWORD, PostgresCluster


@pytest.fixture
def stores(pg_dsn: str) -> Iterator[list[PostgresStore]]:
    """Stores opened by a test (each has its own connections, as separate brokers would)."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def _open(stores: list[PostgresStore], dsn: str) -> PostgresStore:
    store = PostgresStore.open(dsn)
    stores.append(store)
    return store


def _dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def _admin(cluster: PostgresCluster, dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(cluster.admin_dsn(_dbname(dsn)), autocommit=True)


def _key(uses: int) -> RegistrationKey:
    return RegistrationKey("key-1", "s", b"h" * 32, 1.0, 2e9, uses, uses, None, "t")


def _server(sid: str) -> Server:
    return Server(sid, f"hv-{sid}", "s", 1.0, "key-1", "ab", 2e9)


# -- schema and migrations ----------------------------------------------------------------------


def test_same_schema_as_sqlite(stores: list[PostgresStore], pg_dsn: str, tmp_path: Path) -> None:
    _open(stores, pg_dsn)
    SqliteStore.open(tmp_path / "b.db").close()
    types = {"REAL": "double precision", "BLOB": "bytea", "INTEGER": "bigint", "TEXT": "text"}
    with sqlite3.connect(tmp_path / "b.db") as db:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            ).fetchall()
        ]
        lite = {
            t: [
                (name, types[kind], bool(notnull) or bool(pk))
                for _, name, kind, notnull, _, pk in db.execute(f"PRAGMA table_info({t})")
            ]
            for t in tables
        }
        lite_indexes = {
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ).fetchall()
        }
    with psycopg.connect(pg_dsn, password=PASSWORD) as conn:
        pg: dict[str, list[tuple[str, str, bool]]] = {}
        for table, column, kind, nullable, collation in conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, collation_name "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "ORDER BY table_name, ordinal_position"
        ):
            pg.setdefault(table, []).append((column, kind, nullable == "NO"))
            if kind == "text":
                assert collation == "C", (table, column)
        pg_indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                "AND indexname NOT LIKE '%%_pkey' AND indexname NOT LIKE '%%_key'"
            )
        }
    assert pg == lite
    assert pg_indexes == lite_indexes


def test_migrations_are_idempotent_and_a_newer_schema_is_refused(
    stores: list[PostgresStore], pg_dsn: str, pg_cluster: PostgresCluster
) -> None:
    known = len(migrations())
    store = _open(stores, pg_dsn)
    assert store.migrate() == known
    assert _open(stores, pg_dsn).schema_version() == known
    with _admin(pg_cluster, pg_dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == list(range(1, known + 1))
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    with pytest.raises(StoreError, match="newer than this broker knows") as info:
        PostgresStore.open(pg_dsn)
    assert PASSWORD not in str(info.value)


def test_brokers_starting_together_migrate_once(pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.create_database()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        opened = list(pool.map(lambda _: PostgresStore.open(dsn, password=PASSWORD), range(4)))
    try:
        assert {s.schema_version() for s in opened} == {len(migrations())}
        with _admin(pg_cluster, dsn) as conn:
            count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert count == (len(migrations()),)
    finally:
        for s in opened:
            s.close()


def test_password_comes_from_the_environment_or_pgpass_and_is_never_shown(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore.open(pg_dsn)  # SITEPAIR_DB_PASSWORD, set by the fixture
    assert store.description.startswith("postgresql:") and "sitepair" in store.description
    store.close()
    shown = PostgresStore(pg_dsn.replace("sitepair@", f"sitepair:{PASSWORD}@"))
    assert PASSWORD not in shown.description
    shown.close()

    monkeypatch.delenv("SITEPAIR_DB_PASSWORD")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(StoreError, match="refused the login") as info:
        PostgresStore.open(pg_dsn)
    assert "SITEPAIR_DB_PASSWORD" in (info.value.hint or "")

    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:*:sitepair:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    store = PostgresStore.open(pg_dsn)
    with store.read() as tx:
        assert tx.get_meta("vault") is None
    store.close()


def test_text_with_nul_characters_is_stored(stores: list[PostgresStore], pg_dsn: str) -> None:
    store = _open(stores, pg_dsn)
    with store.write() as tx:
        tx.set_meta("agent-error", "bad\x00byte")
    with store.read() as tx:
        assert tx.get_meta("agent-error") == "bad\ufffdbyte"


# -- atomicity across connections (as across brokers) -----------------------------------------


def test_key_uses_are_consumed_once_across_brokers(
    stores: list[PostgresStore], pg_dsn: str
) -> None:
    a, b = _open(stores, pg_dsn), _open(stores, pg_dsn)
    with a.write() as tx:
        tx.insert_key(_key(uses=40))
    start = threading.Barrier(8)

    def take(store: PostgresStore) -> int:
        start.wait()
        taken = 0
        for _ in range(15):
            with store.write() as tx:
                # Read, check, then write: atomic only because writers are serialised.
                key = tx.get_key("key-1")
                assert key is not None
                if key.uses_remaining > 0 and tx.consume_key_use("key-1"):
                    taken += 1
        return taken

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        taken = sum(pool.map(take, [a, b] * 4))
    assert taken == 40
    with b.read() as tx:
        assert tx.get_key("key-1").uses_remaining == 0  # type: ignore[union-attr]


def test_a_command_outcome_is_recorded_once_across_brokers(
    stores: list[PostgresStore], pg_dsn: str
) -> None:
    a, b = _open(stores, pg_dsn), _open(stores, pg_dsn)
    with a.write() as tx:
        tx.insert_server(_server("host-1"))
        for i in range(20):
            tx.insert_command(
                Command(f"c{i}", "host-1", "ping", b"", CommandState.DELIVERED, created_at=1)
            )

    def complete(args: tuple[PostgresStore, str, CommandState]) -> bool:
        store, cid, state = args
        with store.write() as tx:
            return (
                tx.complete_command(cid, server_id="host-1", state=state, now=time.time())
                is not None
            )

    work = [
        (store, f"c{i}", state)
        for i in range(20)
        for store, state in ((a, CommandState.SUCCEEDED), (b, CommandState.FAILED))
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        recorded = list(pool.map(complete, work))
    assert sum(recorded) == 20  # exactly one outcome per command


def test_a_final_job_state_is_never_left_across_brokers(
    stores: list[PostgresStore], pg_dsn: str
) -> None:
    a, b = _open(stores, pg_dsn), _open(stores, pg_dsn)
    clock = ManualClock()

    async def scenario() -> None:
        ja, jb = JobManager(a, clock), JobManager(b, clock)
        jobs = [await ja.create("k", f"t{i}", ["s"], created_by="t") for i in range(15)]
        await asyncio.gather(
            *(ja.succeed(j.id) for j in jobs), *(jb.fail(j.id, "late") for j in jobs)
        )
        for j in jobs:
            final = await jb.get(j.id)
            assert final.state in (JobState.SUCCEEDED, JobState.FAILED)
            # Whichever won, the job reads consistently: error only if it failed.
            assert (final.error == "late") == (final.state == JobState.FAILED)
            await ja.set_state(j.id, JobState.RUNNING)
            assert (await jb.get(j.id)).state == final.state

    asyncio.run(scenario())


# -- retries ------------------------------------------------------------------------------------


def _raise_serialization_failure(tx: Tx) -> None:
    """Have the server itself raise SQLSTATE 40001 inside the transaction."""
    # The test reaches into the session to make the server itself fail.
    tx._db.execute(
        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
    )


def test_serialization_failures_are_retried_a_bounded_number_of_times(
    stores: list[PostgresStore], pg_dsn: str
) -> None:
    store = _open(stores, pg_dsn)
    with store.write() as tx:
        tx.insert_key(_key(uses=5))
    calls = 0

    def flaky(tx: Tx) -> bool:
        nonlocal calls
        calls += 1
        taken = tx.consume_key_use("key-1")
        if calls < 3:
            _raise_serialization_failure(tx)
        return taken

    assert store.transact(flaky) is True
    assert calls == 3
    with store.read() as tx:  # the two failed attempts were rolled back whole
        assert tx.get_key("key-1").uses_remaining == 4  # type: ignore[union-attr]

    # In a write() block the caller's code cannot be run again: the error says it may retry.
    with pytest.raises(RetryableError), store.write() as tx:
        _raise_serialization_failure(tx)

    attempts = 0

    def always(tx: Tx) -> None:
        nonlocal attempts
        attempts += 1
        _raise_serialization_failure(tx)

    with pytest.raises(RetryableError, match="conflict"):
        store.transact(always)
    assert attempts == store.attempts


def test_a_deadlock_with_another_client_is_retried(
    stores: list[PostgresStore], pg_dsn: str, pg_cluster: PostgresCluster
) -> None:
    store = _open(stores, pg_dsn)
    with store.write() as tx:
        tx.set_meta("a", "0")
        tx.set_meta("b", "0")
    other = _admin(pg_cluster, pg_dsn)
    other.execute("SET deadlock_timeout = '30s'")  # so the broker's session is the victim
    other.execute("BEGIN")
    other.execute("UPDATE meta SET value = 'other' WHERE key = 'b'")
    waiting = threading.Event()

    def other_side() -> None:
        other.execute("UPDATE meta SET value = 'other' WHERE key = 'a'")  # waits for the broker
        other.execute("COMMIT")

    attempts = 0
    thread = threading.Thread(target=other_side)

    def both(tx: Tx) -> str:
        nonlocal attempts
        attempts += 1
        tx.set_meta("a", "broker")
        if attempts == 1:
            thread.start()
            waiting.wait(0.5)  # let the other client queue up behind our row lock
        tx.set_meta("b", "broker")  # deadlock on the first attempt
        return "done"

    try:
        assert store.transact(both) == "done"
    finally:
        thread.join(10)
        other.close()
    assert attempts == 2
    with store.read() as tx:
        assert (tx.get_meta("a"), tx.get_meta("b")) == ("broker", "broker")


def test_a_lost_connection_is_replaced(
    stores: list[PostgresStore], pg_dsn: str, pg_cluster: PostgresCluster
) -> None:
    store = _open(stores, pg_dsn)

    def backend_pid(tx: Tx) -> int:
        row = tx._db.one("SELECT pg_backend_pid()")
        assert row is not None
        return int(row[0])

    def kill(pid: int) -> None:
        with _admin(pg_cluster, pg_dsn) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])

    # Between transactions (a database restart, an idle connection dropped): transparent.
    with store.write() as tx:
        first = backend_pid(tx)
    kill(first)
    with store.write() as tx:
        tx.set_meta("k", "after restart")
        assert backend_pid(tx) != first

    # In the middle of one: the work was rolled back, so transact() runs it again.
    attempts = 0

    def work(tx: Tx) -> None:
        nonlocal attempts
        attempts += 1
        tx.set_meta("k", f"attempt {attempts}")
        if attempts == 1:
            kill(backend_pid(tx))

    store.transact(work)
    assert attempts == 2
    with store.read() as tx:
        assert tx.get_meta("k") == "attempt 2"


# -- leader lease -------------------------------------------------------------------------------


def test_leadership_moves_when_the_leader_stops_or_dies(
    stores: list[PostgresStore], pg_dsn: str
) -> None:
    a, b, c = (_open(stores, pg_dsn) for _ in range(3))

    async def scenario() -> None:
        lease = 1.5
        first = LeaseLeadership(a, "broker-a", lease=lease)
        second = LeaseLeadership(b, "broker-b", lease=lease)
        third = LeaseLeadership(c, "broker-c", lease=lease)
        for leadership in (first, second, third):
            await leadership.join()
        assert [x.is_leader for x in (first, second, third)] == [True, False, False]
        turns: list[str] = []

        def on_lead(name: str) -> Any:
            async def run() -> None:
                turns.append(name)

            return run

        tasks = {
            x.broker_id: asyncio.create_task(x.run(on_lead(x.broker_id)))
            for x in (first, second, third)
        }
        overlap = False

        async def watch(until: float) -> bool:
            """Sample until ``until``: never two leaders; True once second/third leads."""
            nonlocal overlap
            while time.monotonic() < until:
                leaders = [x.broker_id for x in (first, second, third) if x.is_leader]
                overlap = overlap or len(leaders) > 1
                if leaders and leaders[0] != "broker-a":
                    return True
                await asyncio.sleep(0.02)
            return False

        await asyncio.sleep(lease)
        assert turns and set(turns) == {"broker-a"}

        # A leader that stops gives the lease up: the next broker leads within a renewal.
        await first.shutdown()
        await tasks["broker-a"]
        started = time.monotonic()
        assert await watch(started + lease)
        assert second.is_leader and not third.is_leader
        assert time.monotonic() - started <= second.renew_interval + 0.5

        # A leader that dies (stops renewing, gives nothing up) loses the lead when its lease
        # runs out, and stops acting as leader before anyone else starts.
        tasks["broker-b"].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks["broker-b"]
        died = time.monotonic()
        while second.is_leader:
            overlap = overlap or third.is_leader
            await asyncio.sleep(0.02)
        assert time.monotonic() - died <= lease
        while not third.is_leader:
            assert time.monotonic() - died < 3 * lease
            overlap = overlap or second.is_leader
            await asyncio.sleep(0.02)
        assert not overlap
        await third.shutdown()
        await tasks["broker-c"]
        with a.read() as tx:
            assert tx.live_brokers() == []

    asyncio.run(scenario())
