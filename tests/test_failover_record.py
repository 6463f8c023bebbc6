"""The failover record a relationship keeps (broker/failover_record.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from broker.failover_record import FailoverRecord, FinalCycle, MadeVm, TestFailover
from broker.store.base import StoreError
from sitepair.v1 import control_pb2


def test_the_empty_record_is_stored_as_an_empty_object() -> None:
    assert FailoverRecord().encode() == "{}"
    assert FailoverRecord.decode("") == FailoverRecord.decode("{}") == FailoverRecord()


def test_a_record_round_trips_with_its_nested_parts() -> None:
    made = control_pb2.FailoverResult(epoch=3, point=12, vm_name="web01", vm_id="v", started=True)
    made.cut_at.FromNanoseconds(1_700_000_000_250_000_000)
    record = FailoverRecord(
        job="job-1",
        type="planned",
        epoch=3,
        epoch_before=2,
        old_primary="srv-a",
        new_primary="srv-b",
        point="latest",
        previous_state="protected",
        fence_pending=True,
        final=FinalCycle(sequence=12, final_bytes=4096, disks_compared=2),
        result=MadeVm.of(made),
        test=TestFailover(network="test-net", created_network=True, job="job-0"),
    )
    assert record.result is not None and record.result.cut_at == 1_700_000_000.25
    text = record.encode()
    assert json.loads(text)["version"] == 1
    assert FailoverRecord.decode(text) == record
    fenced = dataclasses.replace(record, fence_pending=False, test=None)
    assert FailoverRecord.decode(fenced.encode()) == fenced


def test_a_record_an_older_broker_stored_is_read() -> None:
    older = {
        "job": "job-9",
        "type": "unplanned",
        "epoch": 5,
        "old_primary": "a",
        "new_primary": "b",
        "point": "7",
        "committed": False,
        "fence_pending": True,
        # The agent's own record was kept whole then, with fields this broker does not keep.
        "result": {"epoch": 5, "point": 7, "vm_name": "db01", "vm_folder": "/x", "children": []},
        "test": {"network": "", "created_network": False, "job": "job-8"},
    }
    record = FailoverRecord.decode(json.dumps(older))
    assert record.epoch == 5 and record.old_primary == "a" and record.point == "7"
    assert record.result == MadeVm(epoch=5, point=7, vm_name="db01")
    assert record.test == TestFailover(job="job-8")


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        "{broken",
        '{"version": 2, "job": "x"}',
        '{"epoch": "five"}',
        '{"test": [1, 2]}',
        '{"result": {"point": "x"}}',
    ],
)
def test_a_damaged_record_is_a_store_error_not_a_crash(text: str) -> None:
    with pytest.raises(StoreError):
        FailoverRecord.decode(text)
