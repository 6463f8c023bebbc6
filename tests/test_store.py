"""The store and the job model, on real files and a real PostgreSQL server.

Every test taking ``open_store`` runs once per backend: SQLite in a temp folder, and a fresh
database on the throwaway PostgreSQL server of ``tests/store_pg/conftest.py`` (skipped with the
reason when the server binaries are missing). The PostgreSQL-only behaviour (races across
connections, retries, leases across brokers) is tested in ``tests/store_pg``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.jobs import JobManager
from broker.store.base import Store
from broker.store.models import (
    Cloud,
    Command,
    CommandState,
    JobState,
    RegistrationKey,
    Server,
    StepState,
)
from broker.store.sqlite import SqliteStore, StoreError, migrations
from sitepair.clock import ManualClock
from sitepair.errors import AlreadyExists, FailedPrecondition, NotFound
from tests.store_pg import conftest as pg

# The PostgreSQL fixtures, shared with tests/store_pg (one server for the whole session).
pg_cluster = pg.pg_cluster
pg_dsn = pg.pg_dsn

OpenStore = Callable[[], Store]
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens (and re-opens) one store of the backend under test; all are closed afterwards."""
    opened: list[Store] = []
    if request.param == "sqlite":

        def make() -> Store:
            return SqliteStore.open(tmp_path / "b.db")

    else:
        dsn: str = request.getfixturevalue("pg_dsn")

        def make() -> Store:
            from broker.store.postgres import PostgresStore

            return PostgresStore.open(dsn)

    def opener() -> Store:
        store = make()
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def _key(uses: int = 1) -> RegistrationKey:
    return RegistrationKey(
        id="key-1",
        site="s",
        secret_hash=b"h" * 32,
        created_at=1.0,
        expires_at=2e9,
        uses_total=uses,
        uses_remaining=uses,
        revoked_at=None,
        created_by="t",
    )


def _server(sid: str = "host-1", name: str = "hv-1") -> Server:
    return Server(
        id=sid,
        name=name,
        site="s",
        registered_at=1.0,
        registration_key_id="key-1",
        cert_serial="ab",
        cert_not_after=2e9,
    )


def test_migrations_apply_once_and_are_numbered(open_store: OpenStore) -> None:
    known = migrations()
    assert [v for v, _, _ in known] == list(range(1, len(known) + 1))
    store = open_store()
    assert store.schema_version() == len(known)
    assert store.migrate() == len(known)  # idempotent
    store.close()
    store = open_store()
    assert store.schema_version() == len(known)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at_6(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Store, Callable[[str, Sequence[Any]], None]]]:
    """A store migrated only to version 6, as a broker before migration 0007 left it, and a way
    to write rows into it as that broker did (its SQL, run outside the current repository)."""
    store: Store
    if request.param == "sqlite":
        path = tmp_path / "b.db"
        store = SqliteStore(path)

        def run(sql: str, args: Sequence[Any]) -> None:
            with contextlib.closing(sqlite3.connect(path)) as db, db:
                db.execute(sql, args)

    else:
        import psycopg

        from broker.store.postgres import PostgresStore

        dsn: str = request.getfixturevalue("pg_dsn")
        store = PostgresStore(dsn)

        def run(sql: str, args: Sequence[Any]) -> None:
            with psycopg.connect(dsn, password=pg.PASSWORD, autocommit=True) as db:
                db.execute(store.dialect.sql(sql), args)

    try:
        assert store.migrate(to=6) == 6
        assert store.schema_version() == 6
        yield store, run
    finally:
        store.close()


def test_migration_7_names_the_step_of_each_stored_command(
    store_at_6: tuple[Store, Callable[[str, Sequence[Any]], None]],
) -> None:
    """Commands stored by index before migration 0007 take the name of the step at that index."""
    from broker.store.models import Job, JobStep

    store, run = store_at_6
    names = ["prepare", "configure", "finish"]
    with store.write() as tx:
        tx.insert_server(_server())
        tx.insert_job(
            Job(
                id="job-1",
                kind="k",
                target="t",
                state=JobState.RUNNING,
                created_at=1.0,
                updated_at=1.0,
                created_by="t",
                steps=tuple(
                    JobStep("job-1", i, name, StepState.PENDING) for i, name in enumerate(names)
                ),
            )
        )
    for cid, job_id, step in [
        ("c-1", "job-1", 1),
        ("c-0", "job-1", 0),
        ("c-gone", "job-1", 7),  # no such step: nothing to name it by
        ("c-plain", None, None),  # not sent by a job
    ]:
        run(
            "INSERT INTO commands (id, server_id, kind, payload, state, created_at, job_id, "
            "job_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, "host-1", "ping", b"", "pending", 1.0, job_id, step),
        )

    assert store.migrate(to=7) == 7
    with store.read() as tx:
        named = {c.id: (c.job_step, c.job_step_name) for c in tx.open_commands("host-1")}
    assert named == {
        "c-1": (1, "configure"),
        "c-0": (0, "prepare"),
        "c-gone": (7, ""),
        "c-plain": (None, ""),
    }


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "b.db")
    store.close()
    with sqlite3.connect(tmp_path / "b.db") as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    with pytest.raises(StoreError, match="newer than this broker knows"):
        SqliteStore.open(tmp_path / "b.db")


def test_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="damaged"):
        SqliteStore.open(path)


def test_key_uses_are_consumed_atomically_under_contention(open_store: OpenStore) -> None:
    store = open_store()
    with store.write() as tx:
        tx.insert_key(_key(uses=100))

    def take() -> bool:
        with store.write() as tx:
            return tx.consume_key_use("key-1")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: take(), range(300)))
    assert results.count(True) == 100
    with store.read() as tx:
        key = tx.get_key("key-1")
    assert key is not None and key.uses_remaining == 0


def test_failed_transaction_rolls_back(open_store: OpenStore) -> None:
    store = open_store()
    with store.write() as tx:
        tx.insert_key(_key())
    with pytest.raises(RuntimeError), store.write() as tx:
        assert tx.consume_key_use("key-1")
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.get_key("key-1").uses_remaining == 1  # type: ignore[union-attr]


def test_command_outcome_recorded_once_and_only_by_its_server(open_store: OpenStore) -> None:
    store = open_store()
    with store.write() as tx:
        tx.insert_server(_server())
        tx.insert_server(_server("host-2", "hv-2"))
        tx.insert_command(
            Command(
                id="c1",
                server_id="host-1",
                kind="ping",
                payload=b"",
                state=CommandState.PENDING,
                created_at=1,
            )
        )
    with store.write() as tx:
        assert (
            tx.complete_command("c1", server_id="host-2", state=CommandState.SUCCEEDED, now=2)
            is None
        )
        done = tx.complete_command(
            "c1", server_id="host-1", state=CommandState.FAILED, now=2, error="x"
        )
        assert done is not None and done.state == CommandState.FAILED
        assert (
            tx.complete_command("c1", server_id="host-1", state=CommandState.SUCCEEDED, now=3)
            is None
        )
        assert tx.open_commands("host-1") == []


def test_jobs_steps_watch_cancel_and_recovery(open_store: OpenStore) -> None:
    store = open_store()
    clock = ManualClock()

    async def scenario() -> None:
        jobs = JobManager(store, clock)
        job = await jobs.create("demo", "thing/x", ["first", "second"], created_by="t")
        seen: list[tuple[str, str]] = []

        async def watcher() -> None:
            async for j in jobs.watch(job.id, poll=0.2):
                seen.append((j.state.value, j.steps[0].state.value))

        w = asyncio.create_task(watcher())
        await asyncio.sleep(0.05)
        await jobs.step(job.id, 0, StepState.RUNNING, done=5, total=10)
        await asyncio.sleep(0.05)
        await jobs.step(job.id, 0, StepState.SUCCEEDED)
        await jobs.succeed(job.id, {"ok": True})
        await asyncio.wait_for(w, 5)
        assert seen[0] == ("running", "pending")
        assert seen[-1] == ("succeeded", "succeeded")
        final = await jobs.get(job.id)
        assert final.steps[1].state == StepState.CANCELLED  # never ran; the job says so
        assert final.result_json == '{"ok": true}'
        # A final state is never left.
        await jobs.fail(job.id, "late")
        assert (await jobs.get(job.id)).state == JobState.SUCCEEDED
        with pytest.raises(FailedPrecondition, match="already succeeded"):
            await jobs.cancel(job.id)

        # A running job nobody can resume is failed plainly at start-up.
        orphan = await jobs.create("unknown-kind", "x", ["a"], created_by="t")
        resumable = await jobs.create("resumable", "y", ["a"], created_by="t")
        jobs2 = JobManager(store, clock)
        taken: list[str] = []

        async def resume(j):  # type: ignore[no-untyped-def]
            taken.append(j.id)
            return True

        jobs2.register_resumer("resumable", resume)
        await jobs2.recover()
        o = await jobs2.get(orphan.id)
        assert o.state == JobState.FAILED and "broker restarted" in o.error
        assert taken == [resumable.id]
        assert (await jobs2.get(resumable.id)).state == JobState.RUNNING
        assert (await jobs2.get(resumable.id)).owner == jobs2.owner  # it is jobs2's now

        # Cancel runs the job's hook.
        hooked = await jobs2.create("cancellable", "z", ["a"], created_by="t")
        calls: list[int] = []

        async def hook() -> None:
            calls.append(1)

        jobs2.on_cancel(hooked.id, hook)
        c = await jobs2.cancel(hooked.id)
        assert c.state == JobState.CANCELLED and calls == [1]

    asyncio.run(scenario())


def test_unique_violations_are_already_exists_and_the_transaction_goes_on(
    open_store: OpenStore,
) -> None:
    store = open_store()
    with store.write() as tx:
        tx.insert_server(_server())
        tx.insert_cloud(Cloud(name="c1", site="s", description="", created_at=1.0))
    with store.write() as tx:
        with pytest.raises(AlreadyExists, match="already registered"):
            tx.insert_server(_server("host-9", "hv-1"))  # same name at the same site
        with pytest.raises(AlreadyExists, match="already exists"):
            tx.insert_cloud(Cloud(name="c1", site="s", description="", created_at=2.0))
        # Both backends keep the transaction usable after the refused insert.
        tx.insert_server(_server("host-2", "hv-2"))
    with store.read() as tx:
        assert [s.id for s in tx.list_servers()] == ["host-1", "host-2"]
    with store.write() as tx:
        tx.mark_server_removed("host-1", 5.0)
        tx.insert_server(_server("host-3", "hv-1"))  # the name is free once removed
    with store.read() as tx:
        with pytest.raises(NotFound):
            tx.find_server("nope")
        assert tx.find_server("hv-1").id == "host-3"


def test_values_round_trip_and_text_sorts_byte_wise(open_store: OpenStore) -> None:
    store = open_store()
    names = ["b", "B", "a", "_x", "Z", "é", "a b", "a-b"]
    with store.write() as tx:
        tx.insert_key(_key())
        for i, name in enumerate(names):
            tx.insert_server(_server(f"host-{i}", name))
        tx.record_heartbeats([])
    with store.read() as tx:
        listed = [s.name for s in tx.list_servers()]
        key = tx.get_key("key-1")
    # Same order on both backends: by code point, as SQLite compares text.
    assert listed == sorted(names)
    assert key == _key()
    assert isinstance(key.created_at, float) and isinstance(key.uses_total, int)
    # 64-bit integers, and times kept to the microsecond (not single precision).
    with store.write() as tx:
        tx.update_server_certificate("host-0", "ff", 1_800_000_000.123456)
        tx.set_server_connected("host-0", now=1.5, facts_json="{}", agent_version="1", cloud="")
    with store.read() as tx:
        s = tx.get_server("host-0")
    assert s is not None and s.cert_not_after == 1_800_000_000.123456 and s.connected is True


def test_relationship_updates_change_only_the_columns_named(open_store: OpenStore) -> None:
    from broker.store.models import Relationship, RelationshipState

    store = open_store()
    rel = Relationship(
        id="rel-1",
        vm_id="vm-1",
        vm_name="web",
        primary_cloud="a",
        recovery_cloud="b",
        primary_server="host-1",
        replica_server="host-2",
        state=RelationshipState.ENABLING,
        epoch=1,
        policy_json="{}",
        created_at=1.0,
        updated_at=1.0,
    )
    with store.write() as tx:
        tx.insert_relationship(rel)
        tx.update_relationship(
            "rel-1", 5.0, state=RelationshipState.PROTECTED, epoch=2, paused=True, disabled_at=4.0
        )
    with store.read() as tx:
        got = tx.get_relationship("rel-1")
    assert got == dataclasses.replace(
        rel,
        state=RelationshipState.PROTECTED,
        epoch=2,
        paused=True,
        disabled_at=4.0,
        updated_at=5.0,
    )
    # A key mypy cannot see (an untyped dict) is refused before any SQL is built from it.
    untyped: list[dict[str, Any]] = [
        {"id": "rel-2"},
        {"updated_at": 9.0},
        {"state = 'x', epoch": 1},
    ]
    for bad in untyped:
        with pytest.raises(ValueError, match="not a relationship column"), store.write() as tx:
            tx.update_relationship("rel-1", 6.0, **bad)


def test_broker_leases_elect_the_first_to_join(open_store: OpenStore) -> None:
    store = open_store()
    with store.write() as tx:
        tx.renew_broker("broker-a", "first", 30.0)
    with store.write() as tx:
        tx.renew_broker("broker-b", "second", 30.0)
        tx.renew_broker("broker-a", "first, renewed", 30.0)  # renewing keeps its place
    with store.read() as tx:
        live = tx.live_brokers()
    assert [(m.id, m.description) for m in live] == [
        ("broker-a", "first, renewed"),
        ("broker-b", "second"),
    ]
    with store.write() as tx:
        tx.resign_broker("broker-a")
    with store.read() as tx:
        assert [m.id for m in tx.live_brokers()] == ["broker-b"]
    # A lease that ran out is dropped; its broker comes back as the newest.
    with store.write() as tx:
        tx.renew_broker("broker-b", "", -1.0)
        tx.renew_broker("broker-c", "", 30.0)
    time.sleep(0.01)  # SQLite's clock counts milliseconds
    with store.write() as tx:
        tx.renew_broker("broker-b", "", 30.0)
    with store.read() as tx:
        assert [m.id for m in tx.live_brokers()] == ["broker-c", "broker-b"]


def test_only_jobs_of_brokers_without_a_live_lease_are_adopted(open_store: OpenStore) -> None:
    store = open_store()
    clock = ManualClock()

    async def scenario() -> None:
        live = JobManager(store, clock, owner="broker-live")
        gone = JobManager(store, clock, owner="broker-gone")
        mine = JobManager(store, clock, owner="broker-me")
        with store.write() as tx:
            tx.renew_broker("broker-live", "", 60.0)
        a = await live.create("k", "t", ["s"], created_by="t")
        b = await gone.create("k", "t", ["s"], created_by="t")
        c = await mine.create("k", "t", ["s"], created_by="t")
        done = await gone.create("k", "t", ["s"], created_by="t")
        await gone.succeed(done.id)
        with store.write() as tx:
            assert tx.adopt_orphaned_jobs("broker-me") == [b.id]
            assert tx.adopt_orphaned_jobs("broker-me") == []  # now it is broker-me's
        assert (await mine.get(b.id)).owner == "broker-me"
        assert (await mine.get(a.id)).owner == "broker-live"
        assert (await mine.get(c.id)).owner == "broker-me"

    asyncio.run(scenario())


def test_pages_walk_every_row_once_and_leave_oversized_values_unread(
    open_store: OpenStore,
) -> None:
    """Keyset pages on both backends: a walk in pages of 3 sees every row once, in the order of
    the whole list, even with rows added behind it; values over the read caps are not loaded."""
    from broker import bounds
    from broker.store.models import InventoryVm, Job

    store = open_store()
    names = ["b", "B", "a", "_x", "Z", "é", "a b", "a-b", "c", "d"]
    with store.write() as tx:
        tx.insert_key(_key())
        for i, name in enumerate(names):
            tx.insert_server(_server(f"host-{i}", name))
        tx.insert_server(
            Server(
                id="host-big",
                name="big",
                site="s",
                registered_at=1.0,
                registration_key_id="key-1",
                cert_serial="ab",
                cert_not_after=2e9,
                facts_json='{"hostname": "' + "h" * bounds.MAX_STORED_FACTS + '"}',
                metrics_json="{}",
            )
        )
        vms = [
            InventoryVm("host-0", f"vm-{i}", f"vm {i % 4}", 2, 1, 1, "off", "[]", "[]", 1.0)
            for i in range(7)
        ]
        vms.append(
            InventoryVm(
                "host-0", "vm-big", "big", 2, 1, 1, "off", "[" + " " * (3 << 20) + "]", "[]", 1.0
            )
        )
        vms.append(InventoryVm("host-0", "vm-long", "x" * 2000, 2, 1, 1, "off", "[]", "[]", 1.0))
        tx.replace_inventory("host-0", vms, [], [])
        for i in range(8):
            # Pairs of jobs created at the same instant: the id breaks the tie.
            tx.insert_job(
                Job(
                    id=f"job-{i}",
                    kind="k",
                    target="t",
                    state=JobState.SUCCEEDED,
                    created_at=100.0 + i // 2,
                    updated_at=1.0,
                    created_by="t",
                )
            )

    def walk(page: Callable[[Any], Sequence[T]], key: Callable[[T], Any]) -> list[T]:
        seen: list[T] = []
        after = None
        while True:
            rows = page(after)
            seen += rows
            if len(rows) < 3:
                return seen
            after = key(rows[-1])

    with store.read() as tx:
        servers = walk(
            lambda a: tx.server_page(after=a, limit=3),
            lambda s: (s.site, s.name, s.id),
        )
        assert [s.name for s in servers] == sorted([*names, "big"])
        big = next(s for s in servers if s.name == "big")
        assert big.withheld == ("facts",) and big.facts_json == "{}"
        assert tx.vm_counts(["host-0", "host-1"]) == {"host-0": 9}
        assert tx.server_names(["host-0", "nope"]) == {"host-0": "b"}

        listed = walk(
            lambda a: tx.vm_page(after=a, limit=3),
            lambda v: (v.name, v.server_id, v.vm_id),
        )
        ids = [v.vm_id for v in listed]
        assert ids == [v.vm_id for v in sorted(vms[:8], key=lambda v: (v.name, v.vm_id))]
        vm_big = next(v for v in listed if v.vm_id == "vm-big")
        assert vm_big.withheld == ("disks",) and vm_big.disks_json == "[]"

        jobs = walk(
            lambda a: tx.job_page(after=a, limit=3),
            lambda j: (j.created_at, j.id),
        )
        assert [j.id for j in jobs] == [
            "job-6",
            "job-7",
            "job-4",
            "job-5",
            "job-2",
            "job-3",
            "job-0",
            "job-1",
        ]
        first = tx.job_page(after=None, limit=3)
    # A job created during the walk, newer than the page already read, does not shift the rest.
    with store.write() as tx:
        tx.insert_job(
            Job(
                id="job-new",
                kind="k",
                target="t",
                state=JobState.SUCCEEDED,
                created_at=200.0,
                updated_at=1.0,
                created_by="t",
            )
        )
    with store.read() as tx:
        rest = tx.job_page(after=(first[-1].created_at, first[-1].id), limit=10)
        assert [j.id for j in first + rest] == [
            "job-6",
            "job-7",
            "job-4",
            "job-5",
            "job-2",
            "job-3",
            "job-0",
            "job-1",
        ]
        assert [k.id for k in tx.key_page(after=None, limit=5)] == ["key-1"]
        assert tx.key_page(after=(1.0, "key-1"), limit=5) == []


def test_cycles_are_kept_once_newest_first_and_pruned(open_store: OpenStore) -> None:
    from broker.store.models import Cycle

    store = open_store()
    store.migrate()

    def cycle(seq: int, rel: str = "rel-1") -> Cycle:
        return Cycle(rel, seq, 1000.0 + seq, 990.0 + seq, 1.5, 2**63 - 1 if seq == 3 else seq)

    with store.write() as tx:
        added = [tx.record_cycle(cycle(n), keep=4) for n in (1, 2, 3, 3, 4, 5, 6)]
        tx.record_cycle(cycle(1, rel="rel-2"), keep=4)
    assert added == [True, True, True, False, True, True, True]
    with store.read() as tx:
        kept = tx.recent_cycles("rel-1", 10)
        other = tx.recent_cycles("rel-2", 10)
        newest = tx.recent_cycles("rel-1", 2)
    assert [c.sequence for c in kept] == [6, 5, 4, 3]  # the oldest two pruned, newest first
    assert kept[3].bytes == 2**63 - 1 and kept[0].cut_at == 996.0
    assert [c.sequence for c in other] == [1]
    assert [c.sequence for c in newest] == [6, 5]
