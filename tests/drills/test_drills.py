"""Drills end to end: a real broker, four real agents (directory backend), a two-group plan.

One failing drill (a check script that exits 1) and one passing drill, both recorded with
evidence (recovery points, exact proofs, check outputs, RTO) and cleaned up; health Warning
after the failure and cleared by the pass; the drill metrics scraped over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.replication.replica import ReplicaStore
from broker.cli import main as cli_main
from broker.client import wait_job
from sitepair import vdisk
from sitepair.v1 import admin_pb2
from tests.drills.conftest import drills, has_test_vm, make_plan, protect
from tests.metrics.conftest import scrape, value
from tests.protection.conftest import Sites


def drill(s: Sites, plan: str = "erp") -> tuple[admin_pb2.Job, admin_pb2.Drill]:
    job = s.admin.call(s.admin.stub.DrillPlan, admin_pb2.PlanRef(name=plan))
    done = wait_job(s.admin, job.id)
    record = next(d for d in drills(s, plan) if d.job_id == job.id)
    full = s.admin.call(s.admin.stub.GetDrill, admin_pb2.GetDrillRequest(id=record.id))
    return done, full


def reasons(s: Sites, vm: str) -> dict[str, str]:
    return {r.code: r.message for r in s.protected(vm).reasons}


def test_a_failing_then_a_passing_drill_with_evidence_cleanup_health_and_metrics(
    sites: Sites, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = sites
    protect(s, (("db01", "hv-a1"), ("web01", "hv-a2")))
    make_plan(s, "erp", [["db01"], ["web01"]])
    a = s.admin
    a.call(
        a.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="erp",
            group=1,
            when="after",
            action=admin_pb2.PlanAction(name="database up", script="noop.py", timeout_seconds=30),
        ),
    )
    a.call(
        a.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="erp",
            group=2,
            when="before",
            action=admin_pb2.PlanAction(name="call the DBA", instructions="ask if it is up"),
        ),
    )
    flag = tmp_path / "status"
    flag.write_text("1")
    plan = a.call(
        a.stub.AddPlanCheck,
        admin_pb2.AddPlanCheckRequest(
            plan="erp",
            check=admin_pb2.PlanCheck(
                name="orders", kind="script", vm="db01", program="check-db.py", args=[str(flag)]
            ),
        ),
    )
    assert [(c.name, c.kind, c.vm, c.timeout_seconds) for c in plan.checks] == [
        ("orders", "script", "db01", 60)
    ]

    # -- the failing drill -----------------------------------------------------------------
    job, failed = drill(s)
    assert job.kind == "plan-drill" and job.target == "plan/erp" and job.state == "failed"
    assert [(st.name, st.state) for st in job.steps] == [
        ("Group 1: test failover of 1 VM(s)", "succeeded"),
        ("Group 1: after: database up", "succeeded"),  # the plan's script action ran
        ("Group 2: test failover of 1 VM(s)", "succeeded"),  # the manual action left out
        ("Collect the recovery points and exact proofs", "succeeded"),
        ("Check: orders", "failed"),
        ("Clean up the test failover", "succeeded"),
    ]
    assert json.loads(job.result_json)["manual_left_out"] == ["call the DBA"]
    assert failed.state == "failed" and failed.started_by == job.created_by
    assert failed.reason.startswith("Check: orders: exit status 1: orders table missing")
    assert job.error == f"drill failed: {failed.reason}"
    # Evidence per VM: the point, its RPO, the exact proof, how long until it ran.
    assert [v.vm for v in failed.vms] == ["db01", "web01"]
    for v in failed.vms:
        assert v.test_vm == f"{v.vm}-test" and v.recovery_host.startswith("hv-b")
        assert v.point >= 1 and v.cut_at.seconds > 0 and v.rpo_seconds >= 0
        assert v.running_after_seconds > 0 and not v.error
        assert v.exact.checked and v.exact.mismatched_blocks == 0
        assert v.exact.bytes_compared == 6 * 1024 * 1024  # the 4 MiB os and 2 MiB data disks
        assert v.exact.blocks_compared > 0 and len(v.exact.disk_digests) == 2
        assert not v.changed_at_rest
    assert failed.rto_seconds >= max(v.running_after_seconds for v in failed.vms)
    (check,) = failed.checks
    assert (check.name, check.kind, check.vm, check.passed, check.exit_status) == (
        "orders",
        "script",
        "db01",
        False,
        1,
    )
    assert "orders table missing" in check.output_tail
    assert f"drill {failed.id}" in check.output_tail  # the drill's environment reached it
    assert "vm db01 test vm db01-test" in check.output_tail
    assert "vms db01,web01 test vms db01-test,web01-test" in check.output_tail
    # Cleaned up: no test VM on the recovery hosts, no test record on the relationships.
    assert failed.cleaned_up and not failed.cleanup_error
    for vm in ("db01", "web01"):
        assert not has_test_vm(s, vm)
        assert not s.protected(vm).HasField("test_failover")
    # Health: a Warning naming the drill on each VM of the plan; the metrics say failed.
    for vm in ("db01", "web01"):
        assert s.protected(vm).health == "warning"
        assert failed.id in reasons(s, vm)["drill-failed"]
    m = scrape(s.broker.broker.metrics_address)
    assert value(m, "sitepair_drill_last_result", plan="erp") == 0
    assert value(m, "sitepair_drill_last_run_timestamp_seconds", plan="erp") == pytest.approx(
        failed.started_at.seconds, abs=1
    )
    assert value(m, "sitepair_drill_last_success_timestamp_seconds", plan="erp") == 0

    # The operator reads it in the CLI (text and JSON) and fixes the database.
    home = str(s.broker.home.root)
    assert cli_main(["--home", home, "plans", "drill-show", failed.id]) == 1
    out = capsys.readouterr().out
    assert f"drill {failed.id} of recovery plan erp: failed" in out
    assert "check orders: FAILED (exit status 1" in out and "| orders table missing" in out
    assert "0 mismatched" in out and "cleanup  done" in out
    assert cli_main(["--home", home, "plans", "drills", "erp", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in listed] == [failed.id]
    flag.write_text("0")

    # -- the passing drill: a test failover can start again, and it proves the same point ----
    job, passed = drill(s)
    assert job.state == "succeeded", (job.error, [(x.name, x.state) for x in job.steps])
    assert passed.state == "passed" and not passed.reason
    assert [c.passed for c in passed.checks] == [True]
    assert "orders table ok" in passed.checks[0].output_tail
    for before, after in zip(failed.vms, passed.vms, strict=True):
        assert after.exact.checked and after.exact.mismatched_blocks == 0
        if after.point == before.point:  # no cycle in between: the point's first digests
            assert dict(after.exact.earlier_digests) == dict(before.exact.disk_digests)
            assert dict(after.exact.disk_digests) == dict(before.exact.disk_digests)
    assert passed.cleaned_up
    for vm in ("db01", "web01"):
        assert not has_test_vm(s, vm)
        assert "drill-failed" not in reasons(s, vm)
    m = scrape(s.broker.broker.metrics_address)
    assert value(m, "sitepair_drill_last_result", plan="erp") == 1
    assert value(m, "sitepair_drill_last_success_timestamp_seconds", plan="erp") == pytest.approx(
        passed.started_at.seconds, abs=1
    )
    assert [d.id for d in drills(s, "erp")] == [passed.id, failed.id]  # newest first
    # Paged like the other lists: one drill a page, the walk finds both.
    first = s.admin.call(s.admin.stub.ListDrills, admin_pb2.ListDrillsRequest(page_size=1))
    assert [d.id for d in first.drills] == [passed.id] and first.next_page_token
    second = s.admin.call(
        s.admin.stub.ListDrills,
        admin_pb2.ListDrillsRequest(page_size=1, page_token=first.next_page_token),
    )
    assert [d.id for d in second.drills] == [failed.id]


def test_a_point_changed_at_rest_fails_the_next_drill_without_running_checks(
    sites: Sites, tmp_path: Path
) -> None:
    """The second drill of the same recovery point finds its layers changed since the first
    proof (bit rot on the recovery host): the test VM stays off, the checks are not run, the
    drill fails naming the disk, and it still cleans up."""
    s = sites
    protect(s, (("web01", "hv-a1"),))
    make_plan(s, "web", [["web01"]])
    flag = tmp_path / "status"
    flag.write_text("0")
    s.admin.call(
        s.admin.stub.AddPlanCheck,
        admin_pb2.AddPlanCheckRequest(
            plan="web",
            check=admin_pb2.PlanCheck(
                name="up", kind="script", vm="web01", program="check-db.py", args=[str(flag)]
            ),
        ),
    )
    job, first = drill(s, "web")
    assert job.state == "succeeded" and first.state == "passed"
    (vm,) = first.vms
    # Bit rot in the proven point's layer of the os disk, on the recovery host.
    store = ReplicaStore.open(Path(s.protected("web01").replica_folder))
    layer = store.path(store.point(vm.point).layers["os"])
    with vdisk.open_disk(layer) as d:
        d.write(4096, b"\x00rotten\x00")

    job, second = drill(s, "web")
    assert job.state == "failed" and second.state == "failed"
    (again,) = second.vms
    assert again.point == vm.point and again.changed_at_rest
    assert again.exact.disk_digests["os"] != vm.exact.disk_digests["os"]
    assert dict(again.exact.earlier_digests) == dict(vm.exact.disk_digests)
    assert second.reason.startswith("Collect the recovery points and exact proofs: web01: ")
    assert "changed at rest" in second.reason and "os" in second.reason
    assert [(st.name, st.state) for st in job.steps][-2:] == [
        ("Check: up", "skipped"),
        ("Clean up the test failover", "succeeded"),
    ]
    assert second.checks == [] and second.cleaned_up and not has_test_vm(s, "web01")
    assert "drill-failed" in reasons(s, "web01")
