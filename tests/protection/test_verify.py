"""Scheduled verification with a real broker and agents: due order, the concurrency limit, and
a replica corrupted at rest found, reported in health, and repaired."""

from __future__ import annotations

import json
import os
from pathlib import Path

from broker.store.models import Relationship, RelationshipState
from broker.verify import SCHEDULER, VerifyConfig, VerifyScheduler
from sitepair import vdisk
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has
from tests.protection.test_walkthrough import MiB, make_vm, replica_content, setup_pair


def scheduler(s: Sites, **config: float | bool) -> VerifyScheduler:
    ctx = s.broker.ctx
    return VerifyScheduler(
        store=ctx.store,
        clock=ctx.clock,
        jobs=ctx.jobs,
        protection=ctx.protection,
        config=VerifyConfig(**config),  # type: ignore[arg-type]
    )


def tick(s: Sites, sched: VerifyScheduler) -> list[admin_pb2.Job]:
    ids = s.broker.loop.call(sched.tick())
    return [s.job(s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=i))) for i in ids]


def corrupt_replica(s: Sites, vm: str, disk: str, offset: int, n: int) -> None:
    v = s.protected(vm)
    host = next(h for h in s.hosts.values() if h.name == v.replica_server)
    root = Path(v.replica_folder or host.home / "replicas" / v.relationship_id)
    state = json.loads((root / "state.json").read_text())
    with vdisk.open_disk(root / state["disks"][disk]["chain"][-1]) as d:
        d.write(offset, os.urandom(n))  # bit rot, or a tool writing the replica folder


def reasons(s: Sites, vm: str) -> dict[str, str]:
    return {r.code: r.level for r in s.protected(vm).reasons}


def test_scheduled_verification_finds_reports_and_repairs_a_corrupt_replica(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    models = {
        "web01": make_vm(s, "hv-a1", "web01", size=8 * MiB, seed=1),
        "db01": make_vm(s, "hv-a2", "db01", size=8 * MiB, seed=2),
    }
    for vm in models:
        eventually(lambda vm=vm: inventory_has(s.admin, vm), what=f"{vm} in inventory")
        s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))
    assert not s.protected("web01").HasField("last_verification")

    # Protected minutes ago, a weekly schedule: nothing is due yet.
    assert tick(s, scheduler(s)) == []

    # Everything overdue, one at a time: the most overdue (protected first) goes first.
    one = scheduler(s, interval=1e-3, concurrent=1)
    [first] = tick(s, one)
    assert first.target == "vm/web01" and first.created_by == SCHEDULER
    [second] = tick(s, one)
    assert second.target == "vm/db01"
    for vm in models:
        lv = s.protected(vm).last_verification
        assert lv.by == SCHEDULER and lv.mismatched_bytes == 0 and lv.sequence >= 1
    assert s.protected("web01").health == "normal"

    # Bit rot on web01's replica: a report-only schedule finds it and turns health Critical.
    corrupt_replica(s, "web01", "os", 3 * MiB + 17, 100)
    assert replica_content(s, "web01", "os") != bytes(models["web01"]["os"])
    report_only = scheduler(s, interval=1e-3, concurrent=2, repair=False)
    jobs = {j.target: j for j in tick(s, report_only)}
    assert set(jobs) == {"vm/web01", "vm/db01"}
    lv = s.protected("web01").last_verification
    assert lv.mismatched_bytes == 65536 and not lv.repaired  # the one 64 KiB block it touched
    assert s.protected("db01").last_verification.mismatched_bytes == 0
    eventually(lambda: s.protected("web01").health == "critical", what="critical")
    assert reasons(s, "web01") == {"replica-mismatch": "critical"}
    assert s.protected("db01").health == "normal"

    # The default schedule repairs: the replica is byte-exact again, health says it happened.
    repairing = scheduler(s, interval=1e-3, concurrent=2)
    tick(s, repairing)
    lv = s.protected("web01").last_verification
    assert lv.mismatched_bytes == 65536 and lv.repaired
    for disk, model in models["web01"].items():
        assert replica_content(s, "web01", disk) == bytes(model)
    assert reasons(s, "web01") == {"replica-mismatch-repaired": "warning"}

    # A clean verification (here by an operator) clears it.
    s.job(
        s.admin.call(
            s.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="web01", action="verify"),
        )
    )
    assert s.protected("web01").last_verification.mismatched_bytes == 0
    eventually(lambda: s.protected("web01").health == "normal", what="normal again")


def test_no_verification_starts_while_a_host_is_down(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=4 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM in inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    sched = scheduler(s, interval=1e-3)
    replica = s.protected("web01").replica_server
    s.hosts[replica].stop()
    eventually(lambda: "replica-host-offline" in reasons(s, "web01"), what="replica seen offline")
    assert s.broker.loop.call(sched.tick()) == []
    s.hosts[replica].start()
    eventually(lambda: "replica-host-offline" not in reasons(s, "web01"), what="replica back")
    # The restarted replica listens on a new port (port 0 in tests): the broker told the
    # primary, or the verification below could not reach it.
    moved = s.admin.call(
        s.admin.stub.ListJobs, admin_pb2.ListJobsRequest(kind="update-replica-address")
    ).jobs
    assert [j.target for j in moved] == ["vm/web01"]
    s.job(moved[0])
    [job] = tick(s, sched)
    assert job.created_by == SCHEDULER and s.protected("web01").last_verification.sequence >= 1


def test_due_time_follows_the_last_result_and_backs_off_after_a_failure() -> None:
    sched = VerifyScheduler(
        store=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
        jobs=None,  # type: ignore[arg-type]
        protection=None,  # type: ignore[arg-type]
        config=VerifyConfig(interval=1000, retry=50),
    )

    def rel(verify: dict[str, float]) -> Relationship:
        return Relationship(
            id="r",
            vm_id="v",
            vm_name="vm",
            primary_cloud="a",
            recovery_cloud="b",
            primary_server="p",
            replica_server="q",
            state=RelationshipState.PROTECTED,
            epoch=1,
            policy_json="{}",
            created_at=10.0,
            verify_json=json.dumps(verify),
        )

    assert sched._due_at(rel({})) == 1010  # never verified: an interval after protection
    assert sched._due_at(rel({"at": 100, "attempted_at": 90})) == 1100  # succeeded
    assert sched._due_at(rel({"at": 100, "attempted_at": 200})) == 1100  # failed, retry passed
    assert sched._due_at(rel({"at": 100, "attempted_at": 1090})) == 1140  # failed recently
