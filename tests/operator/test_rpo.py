"""RPO lag as the admin API computes it (the broker's now minus the replica's latest cut) and
as the command line shows it, with the broker's clock moved by the test."""

from __future__ import annotations

from broker.cli_protection import NO_RPO, format_rpo, rpo_cell
from broker.documents import StoredStatus
from broker.services.admin_protection import rpo_seconds
from broker.store.models import Relationship, RelationshipState
from sitepair.protoconv import timestamp
from sitepair.v1 import admin_pb2, control_pb2

CUT = 1_800_000_000.0


def relationship(cut: float | None) -> Relationship:
    status = control_pb2.RelationshipStatus(relationship_id="rel-1", committed_sequence=4)
    if cut is not None:
        status.last_cut_at.CopyFrom(timestamp(cut))
    return Relationship(
        id="rel-1",
        vm_id="vm-1",
        vm_name="web01",
        primary_cloud="a",
        recovery_cloud="b",
        primary_server="h1",
        replica_server="h2",
        state=RelationshipState.PROTECTED,
        epoch=1,
        policy_json="{}",
        replica_status_json=StoredStatus(status=status, reported_at=cut or 0.0).encode(),
    )


def test_rpo_is_now_minus_the_latest_cut_and_grows_with_the_clock() -> None:
    rel = relationship(CUT)
    assert rpo_seconds(rel, CUT + 42.4) == 42
    assert rpo_seconds(rel, CUT + 3 * 60 + 5) == 185
    assert rpo_seconds(rel, CUT - 10) == 0  # a replica clock ahead of the broker's
    assert rpo_seconds(relationship(None), CUT) is None  # before the first cycle


def test_rpo_as_the_tables_show_it() -> None:
    assert [format_rpo(n) for n in (0, 42, 59, 60, 185, 3600, 7300, 86400 * 3)] == [
        "0s",
        "42s",
        "59s",
        "1m",
        "3m",
        "1h",
        "2h",
        "3d",
    ]
    assert rpo_cell(admin_pb2.VmInfo(rpo_seconds=42), True) == "42s"
    assert rpo_cell(admin_pb2.VmInfo(), True) == NO_RPO == "\u2014"
    assert rpo_cell(admin_pb2.VmInfo(), False) == ""  # not protected: the table's "-"
    assert rpo_cell(admin_pb2.ProtectedVm(rpo_seconds=0), True) == "0s"
