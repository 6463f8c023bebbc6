"""What a recovery host sends as a proof is checked before it is kept (the test acts as a
hostile or broken host), stored evidence that cannot be read does not break the API, and one
plan never has two running drills, whoever starts them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.drill_checks import MAX_PROOF_DISKS, accept_proof, changed_at_rest
from broker.drills import drill_proto
from broker.orchestration import StepFailed
from broker.store.base import Store
from broker.store.models import Drill, DrillSchedule, DrillState
from broker.store.sqlite import SqliteStore
from sitepair.errors import FailedPrecondition
from sitepair.v1 import control_pb2
from tests.store_pg import conftest as pg

DIGEST = "ab" * 32

# The PostgreSQL fixtures, shared with tests/store_pg (one server for the whole session).
pg_cluster = pg.pg_cluster
pg_dsn = pg.pg_dsn


def proof(**fields: object) -> control_pb2.ExactProof:
    return control_pb2.ExactProof(checked=True, blocks_compared=4, **fields)  # type: ignore[arg-type]


def test_a_hosts_proof_is_bounded_and_its_digests_hex() -> None:
    good = proof(disk_digests={"os": DIGEST}, earlier_digests={"os": DIGEST})
    assert accept_proof(good) is good and changed_at_rest(good) == []
    with pytest.raises(StepFailed, match="not hex"):
        accept_proof(proof(disk_digests={"os": "<script>"}))
    with pytest.raises(StepFailed, match="unprintable or long id"):
        accept_proof(proof(disk_digests={"os\n/../x": DIGEST}))
    with pytest.raises(StepFailed, match="unprintable or long id"):
        accept_proof(proof(earlier_digests={"d" * 300: DIGEST}))
    many = {f"d{i}": DIGEST for i in range(MAX_PROOF_DISKS + 1)}
    with pytest.raises(StepFailed, match=f"at most {MAX_PROOF_DISKS}"):
        accept_proof(proof(disk_digests=many))
    moved = proof(disk_digests={"os": DIGEST, "data": "cd" * 32}, earlier_digests={"data": "00"})
    assert changed_at_rest(moved) == ["data"]


def test_unreadable_stored_evidence_shows_the_drill_without_it() -> None:
    drill = Drill("drill-1", "erp", "job-1", DrillState.FAILED, "why", "op", 10.0, 20.0, "{oops")
    msg = drill_proto(drill)
    assert (msg.id, msg.state, msg.reason, len(msg.vms)) == ("drill-1", "failed", "why", 0)
    typed = Drill(
        "drill-2", "erp", "", DrillState.PASSED, "", "op", 10.0, 20.0, '{"vms": "not a list"}'
    )
    assert drill_proto(typed).id == "drill-2"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store of each backend (PostgreSQL: a throwaway server, tests/store_pg)."""
    if request.param == "sqlite":
        opened: Store = SqliteStore.open(tmp_path / "b.db")
    else:
        from broker.store.postgres import PostgresStore

        opened = PostgresStore.open(request.getfixturevalue("pg_dsn"))
    try:
        yield opened
    finally:
        opened.close()


def running(drill_id: str, plan: str = "erp", at: float = 1.0) -> Drill:
    return Drill(drill_id, plan, "", DrillState.RUNNING, "", "op", at, None)


def test_one_running_drill_per_plan(store: Store) -> None:
    with store.write() as tx:
        tx.insert_drill(running("d1"))
        tx.insert_drill(running("d2", plan="hr"))  # another plan: fine
    busy = "a drill of recovery plan erp is running"
    with pytest.raises(FailedPrecondition, match=busy), store.write() as tx:
        tx.insert_drill(running("d3"))
    with store.write() as tx:
        tx.update_drill("d1", state=DrillState.PASSED, finished_at=2.0)
        tx.insert_drill(running("d3", at=3.0))  # the first one is over
        assert tx.running_drill("erp") == running("d3", at=3.0)


def test_drill_history_pages_and_each_plans_last_outcome(store: Store) -> None:
    with store.write() as tx:
        for i, state in enumerate(
            [DrillState.PASSED, DrillState.FAILED, DrillState.SKIPPED], start=1
        ):
            tx.insert_drill(Drill(f"d{i}", "erp", "", state, "", "op", float(i), float(i)))
        tx.insert_drill(Drill("h1", "hr", "", DrillState.FAILED, "", "op", 5.0, 5.0))
    with store.read() as tx:
        assert [d.id for d in tx.drill_page(plan="", after=None, limit=10)] == [
            "h1",
            "d3",
            "d2",
            "d1",
        ]
        page = tx.drill_page(plan="erp", after=None, limit=2)
        assert [d.id for d in page] == ["d3", "d2"]
        after = (page[-1].started_at, page[-1].id)
        assert [d.id for d in tx.drill_page(plan="erp", after=after, limit=2)] == ["d1"]
        last = tx.last_drills()
        # Skipped drills did not run: erp's last is the failed one; it passed at 1.0 before.
        assert {p: (d.id, ok) for p, (d, ok) in last.items()} == {
            "erp": ("d2", 1.0),
            "hr": ("h1", 0.0),
        }


def test_a_schedule_moves_on_once(store: Store) -> None:
    with store.write() as tx:
        tx.set_drill_schedule(DrillSchedule("erp", 3600.0, 100.0, "op", 1.0))
    with store.write() as tx:
        assert tx.move_drill_schedule("erp", seen_next_at=100.0, next_at=3700.0)
        # A second broker that read the same schedule does not start the drill again.
        assert not tx.move_drill_schedule("erp", seen_next_at=100.0, next_at=3700.0)
        assert tx.get_drill_schedule("erp") == DrillSchedule("erp", 3600.0, 3700.0, "op", 1.0)
        assert tx.delete_drill_schedule("erp") and tx.list_drill_schedules() == []
