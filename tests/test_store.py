"""The SQLite store and the job model, on real files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from pathlib import Path

import pytest

from broker.jobs import JobManager
from broker.store.models import (
    Command,
    CommandState,
    JobState,
    RegistrationKey,
    Server,
    StepState,
)
from broker.store.sqlite import SqliteStore, StoreError, migrations
from sitepair.clock import ManualClock
from sitepair.errors import FailedPrecondition


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


def test_migrations_apply_once_and_are_numbered(tmp_path: Path) -> None:
    known = migrations()
    assert [v for v, _, _ in known] == list(range(1, len(known) + 1))
    store = SqliteStore.open(tmp_path / "b.db")
    assert store.schema_version() == len(known)
    assert store.migrate() == len(known)  # idempotent
    store.close()
    store = SqliteStore.open(tmp_path / "b.db")
    assert store.schema_version() == len(known)
    store.close()


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


def test_key_uses_are_consumed_atomically_under_contention(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "b.db")
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
    store.close()


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "b.db")
    with store.write() as tx:
        tx.insert_key(_key())
    with pytest.raises(RuntimeError), store.write() as tx:
        assert tx.consume_key_use("key-1")
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.get_key("key-1").uses_remaining == 1  # type: ignore[union-attr]
    store.close()


def test_command_outcome_recorded_once_and_only_by_its_server(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "b.db")
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
    store.close()


def test_jobs_steps_watch_cancel_and_recovery(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "b.db")
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

        # Cancel runs the job's hook.
        hooked = await jobs2.create("cancellable", "z", ["a"], created_by="t")
        calls: list[int] = []

        async def hook() -> None:
            calls.append(1)

        jobs2.on_cancel(hooked.id, hook)
        c = await jobs2.cancel(hooked.id)
        assert c.state == JobState.CANCELLED and calls == [1]

    asyncio.run(scenario())
    store.close()
