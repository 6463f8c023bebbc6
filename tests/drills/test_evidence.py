"""What a recovery host sends as a proof is checked before it is kept (the test acts as a
hostile or broken host), stored evidence that cannot be read does not break the API, and one
plan never has two running drills, whoever starts them."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.drills import MAX_PROOF_DISKS, accept_proof, changed_at_rest, drill_proto
from broker.orchestration import StepFailed
from broker.store.models import Drill, DrillState
from broker.store.sqlite import SqliteStore
from sitepair.errors import FailedPrecondition
from sitepair.v1 import control_pb2

DIGEST = "ab" * 32


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


def test_one_running_drill_per_plan(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "b.db")
    store.migrate()

    def running(drill_id: str, plan: str = "erp") -> Drill:
        return Drill(drill_id, plan, "", DrillState.RUNNING, "", "op", 1.0, None)

    try:
        with store.write() as tx:
            tx.insert_drill(running("d1"))
            tx.insert_drill(running("d2", plan="hr"))  # another plan: fine
        busy = "a drill of recovery plan erp is running"
        with pytest.raises(FailedPrecondition, match=busy), store.write() as tx:
            tx.insert_drill(running("d3"))
        with store.write() as tx:
            tx.update_drill("d1", state=DrillState.PASSED, finished_at=2.0)
            tx.insert_drill(running("d3"))  # the first one is over
            assert tx.running_drill("erp") == running("d3")
    finally:
        store.close()
