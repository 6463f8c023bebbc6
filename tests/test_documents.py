"""The documents the broker stores about hosts and relationships, and their one codec each."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from broker import documents
from broker.documents import StoredStatus
from broker.store.base import StoreError
from sitepair.v1 import common_pb2, control_pb2, replication_pb2

State = control_pb2.ReplicationState


def _status() -> control_pb2.RelationshipStatus:
    st = control_pb2.RelationshipStatus(
        relationship_id="rel-1",
        role=control_pb2.ROLE_PRIMARY,
        state=State.STATE_RESYNC_REQUIRED,
        committed_sequence=12,
        cycles_succeeded=3,
        last_error="the replica's disk is full",
        last_error_code=replication_pb2.ERROR_DISK_FULL,
    )
    st.last_success_at.FromNanoseconds(1_700_000_000_500_000_000)
    st.points.add(sequence=12, app_consistent=True).cut_at.FromSeconds(1_700_000_000)
    return st


def test_status_round_trips_with_enums_by_name() -> None:
    text = StoredStatus(status=_status(), reported_at=1_700_000_001.25).encode()
    doc = json.loads(text)
    assert doc["version"] == documents.STATUS_VERSION
    # Stored with the .proto names and enum names: what a person reading the store sees.
    assert doc["status"]["state"] == "STATE_RESYNC_REQUIRED"
    assert doc["status"]["last_error_code"] == "ERROR_DISK_FULL"
    assert "committed_sequence" in doc["status"]
    back = StoredStatus.decode(text)
    assert back is not None
    assert back.status == _status()
    assert back.reported_at == 1_700_000_001.25
    assert back.last_success_at == 1_700_000_000.5


def test_status_stored_by_an_older_broker_is_read() -> None:
    # Version 1: the status flattened, free strings for role, state and error code.
    old = json_format.MessageToDict(
        control_pb2.RelationshipStatus(relationship_id="rel-1", committed_sequence=7),
        preserving_proto_field_name=True,
    )
    old.update(
        role="primary",
        state="resynchronizing",
        last_error_code="stale-epoch",
        last_success_at=1_700_000_000.0,
        reported_at=1_700_000_002.0,
    )
    stored = StoredStatus.decode(json.dumps(old))
    assert stored is not None
    assert stored.status.role == control_pb2.ROLE_PRIMARY
    assert stored.state == State.STATE_RESYNCHRONIZING
    assert stored.status.last_error_code == replication_pb2.ERROR_STALE_EPOCH
    assert stored.status.committed_sequence == 7
    assert stored.last_success_at == 1_700_000_000.0
    assert stored.reported_at == 1_700_000_002.0


def test_missing_or_unreadable_status_reads_as_none() -> None:
    for text in ("", "{}", "not json", "[1, 2]", json.dumps({"version": 99, "status": {}})):
        assert StoredStatus.decode(text) is None, text
    # A state this broker does not know (from a newer agent) reads as unspecified, the rest kept.
    newer = json.dumps({"version": 2, "status": {"state": "STATE_FROM_THE_FUTURE", "epoch": 3}})
    stored = StoredStatus.decode(newer)
    assert stored is not None
    assert stored.state == State.REPLICATION_STATE_UNSPECIFIED and stored.status.epoch == 3
    assert documents.state_name(stored.state) == "unknown"
    assert documents.status_of("") == control_pb2.RelationshipStatus()
    assert documents.progress_message(documents.status_of("")) == "waiting for the first report"


def test_facts_read_in_either_json_spelling() -> None:
    facts = common_pb2.HostFacts(hostname="hv-1", certificate_port=8084, replication_host="a")
    stored = documents.encode_message(facts)
    assert '"certificate_port": 8084' in stored
    camel = json_format.MessageToJson(facts, indent=None)  # how older brokers stored facts
    assert '"certificatePort": 8084' in camel
    assert documents.decode_facts(stored) == facts
    assert documents.decode_facts(camel) == facts
    assert documents.decode_facts("{broken") == common_pb2.HostFacts()


def test_command_results_typed_and_from_older_brokers() -> None:
    typed = control_pb2.CommandResult(
        configure_replica=control_pb2.ConfigureReplicaResult(
            relationship_id="rel-1", folder="/replicas/web01-rel-1", committed_sequence=4
        )
    )
    text = documents.encode_result(typed)
    assert documents.decode_result("configure_replica", text) == typed
    # Results stored before typed results: the kind's free JSON object.
    legacy = json.dumps(
        {"relationship": "rel-1", "folder": "/r", "committed_sequence": 4, "ports": {"x": 1}}
    )
    old = documents.decode_result("configure_replica", legacy)
    assert old.configure_replica.relationship_id == "rel-1"
    assert old.configure_replica.folder == "/r"
    assert old.configure_replica.committed_sequence == 4
    cleaned = documents.decode_result("failover_control", '{"cleaned": true, "vm_name": "w-test"}')
    assert cleaned.failover_control.done and cleaned.failover_control.vm_name == "w-test"
    # A value of the wrong type is not a crash: the result reads as empty.
    assert documents.decode_result("failover", '{"cut_at": 12.5}') == control_pb2.CommandResult()
    assert documents.decode_result("ping", "") == control_pb2.CommandResult()


def test_oversized_result_is_not_kept() -> None:
    big = control_pb2.CommandResult(
        run_script=control_pb2.RunScriptResult(output="x" * (documents.MAX_STORED_RESULT + 1))
    )
    assert documents.encode_result(big) == ""


def test_result_fields_show_zero_values() -> None:
    result = control_pb2.CommandResult(
        run_script=control_pb2.RunScriptResult(script="s.sh", exit_status=0, output="")
    )
    assert documents.result_fields(result) == {
        "script": "s.sh",
        "exit_status": 0,
        "output": "",
        "timed_out": False,
    }
    assert documents.result_fields(control_pb2.CommandResult()) == {}


def test_verification_record_round_trips_and_reads_older_records() -> None:
    v = documents.Verification(
        at=10.5, job_id="job-1", by="alice", sequence=4, mismatched_bytes=8192, repaired=True
    )
    assert documents.Verification.decode(v.encode()) == v
    older = json.dumps({"at": 3.0, "job": "job-0", "sequence": 2, "mismatched_bytes": 0})
    assert documents.Verification.decode(older) == documents.Verification(
        at=3.0, job_id="job-0", sequence=2
    )
    assert documents.Verification.decode("") == documents.Verification()
    assert documents.Verification.decode('{"at": "soon"}') == documents.Verification()
    assert documents.Verification.decode('{"version": 9, "at": 1}') == documents.Verification()


def test_protected_vm_round_trips_reverses_and_refuses_a_damaged_record() -> None:
    vm = documents.ProtectedVm(
        name="web01",
        memory_mb=2048,
        disks=(documents.ProtectedDisk("os", "vhdx", 1 << 30, file_size=1 << 20),),
        nics=(documents.ProtectedNic("eth0", network="dr-net", source_network="prod-net"),),
        adopt=True,
    )
    assert documents.ProtectedVm.decode(vm.encode()) == vm
    back = vm.reversed()
    assert back.nics[0] == documents.ProtectedNic("eth0", "prod-net", "dr-net")
    assert back.reversed() == vm
    older = json.dumps(  # as brokers before the version field wrote it
        {
            "adopt": False,
            "name": "db01",
            "generation": 1,
            "cpu_count": 2,
            "memory_mb": 512,
            "disks": [{"id": "d0", "format": "vhd", "virtual_size": 10, "path": "/v/d0.vhd"}],
            "nics": [{"name": "n0", "network": "", "source_network": "lan"}],
            "replica_kept": True,
        }
    )
    old = documents.ProtectedVm.decode(older)
    assert old.generation == 1 and old.replica_kept and old.disks[0].path == "/v/d0.vhd"
    for bad in ("[]", "{broken", '{"disks": [{"format": "vhd"}]}', '{"version": 7}'):
        with pytest.raises(StoreError):
            documents.ProtectedVm.decode(bad)
