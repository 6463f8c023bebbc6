"""A plan's checks and drills refused before they start: every argument checked, each mistake
named with what to do; a guest check on a host without guests fails the drill, which still
cleans up."""

from __future__ import annotations

import pytest

from broker.cli import main as cli_main
from broker.client import AdminClient, wait_job
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound, SitepairError
from sitepair.v1 import admin_pb2
from tests.drills.conftest import drills, has_test_vm, make_plan, protect
from tests.protection.conftest import Sites


def add_check(a: AdminClient, **check: object) -> admin_pb2.RecoveryPlan:
    plan: admin_pb2.RecoveryPlan = a.call(
        a.stub.AddPlanCheck,
        admin_pb2.AddPlanCheckRequest(plan="web", check=admin_pb2.PlanCheck(**check)),  # type: ignore[arg-type]
    )
    return plan


def refused(a: AdminClient, error: type[SitepairError], match: str, **check: object) -> str:
    with pytest.raises(error, match=match) as info:
        add_check(a, **check)
    return info.value.message


def test_checks_are_checked_before_they_are_stored(sites: Sites) -> None:
    s = sites
    a = s.admin
    protect(s, (("web01", "hv-a1"), ("db01", "hv-a2")))
    make_plan(s, "web", [["web01"]])
    refused(
        a, InvalidArgument, "absolute path inside the VM", kind="guest", vm="web01", program="bin/x"
    )
    refused(a, InvalidArgument, "name it with --vm", kind="guest", program="/usr/bin/true")
    for bad in ("../x.sh", "sub/x.sh", ".hidden", "a\\b.ps1"):
        refused(
            a,
            InvalidArgument,
            "file name in the recovery agent's scripts",
            kind="script",
            program=bad,
        )
    refused(
        a, InvalidArgument, "VM db01 is not in this plan", kind="script", vm="db01", program="c.sh"
    )
    refused(a, NotFound, "nope", kind="script", vm="nope", program="c.sh")
    refused(a, InvalidArgument, "'script' or a 'guest'", kind="shell", program="c.sh")
    refused(
        a,
        InvalidArgument,
        "timeout is 1 s to 3600 s",
        kind="script",
        program="c.sh",
        timeout_seconds=5000,
    )
    refused(a, InvalidArgument, "without NUL", kind="script", program="c.sh", args=["a\x00b"])
    refused(a, InvalidArgument, "a check script must be", kind="script", program="")
    plan = add_check(a, kind="guest", vm="web01", program="/usr/local/bin/check-web", args=["-q"])
    assert [(c.name, c.vm, c.program, list(c.args), c.timeout_seconds) for c in plan.checks] == [
        ("guest /usr/local/bin/check-web on web01", "web01", "/usr/local/bin/check-web", ["-q"], 60)
    ]
    message = refused(
        a, InvalidArgument, "already", kind="guest", vm="web01", program="/usr/local/bin/check-web"
    )
    assert "--check-name" in message
    with pytest.raises(
        NotFound, match="no check named 'x'; it has: 'guest /usr/local/bin/check-web on web01'"
    ):
        a.call(a.stub.RemovePlanCheck, admin_pb2.RemovePlanCheckRequest(plan="web", name="x"))
    plan = a.call(
        a.stub.RemovePlanCheck,
        admin_pb2.RemovePlanCheckRequest(
            plan="web", name="guest /usr/local/bin/check-web on web01"
        ),
    )
    assert list(plan.checks) == []

    # Drills and schedules refused with the reason, before any job.
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="empty"))
    with pytest.raises(FailedPrecondition, match="recovery plan empty has no VMs"):
        a.call(a.stub.DrillPlan, admin_pb2.PlanRef(name="empty"))
    with pytest.raises(NotFound, match="no recovery plan 'nope'"):
        a.call(a.stub.DrillPlan, admin_pb2.PlanRef(name="nope"))
    with pytest.raises(InvalidArgument, match="at most hourly"):
        a.call(
            a.stub.SetDrillSchedule,
            admin_pb2.SetDrillScheduleRequest(plan="web", every_seconds=600),
        )
    with pytest.raises(NotFound, match="no recovery plan"):
        a.call(a.stub.ListDrills, admin_pb2.ListDrillsRequest(plan="nope"))
    with pytest.raises(NotFound, match="no drill 'drill-x'"):
        a.call(a.stub.GetDrill, admin_pb2.GetDrillRequest(id="drill-x"))
    pause = a.call(
        a.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="web01", action="pause")
    )
    s.job(pause)
    with pytest.raises(FailedPrecondition, match="web01 is paused; a drill needs every VM"):
        a.call(a.stub.DrillPlan, admin_pb2.PlanRef(name="web"))
    assert drills(s) == [] and not has_test_vm(s, "web01")


def test_the_cli_adds_checks_schedules_and_refuses_clearly(
    sites: Sites, capsys: pytest.CaptureFixture[str]
) -> None:
    s = sites
    protect(s, (("web01", "hv-a1"),))
    make_plan(s, "web", [["web01"]])
    home = ["--home", str(s.broker.home.root)]

    def run(*args: str, status: int = 0) -> str:
        got = cli_main([*home, *args])
        out, err = capsys.readouterr()
        assert got == status, (args, out, err)
        return out if status == 0 else err

    out = run(
        "plans", "add-check", "web", "--script", "check-db.py", "--arg", "x", "--check-name", "db"
    )
    assert "recovery plan web: 1 check(s)" in out
    assert "check db: script check-db.py x (timeout 60s)" in out
    err = run("plans", "add-check", "web", "--guest", "/bin/true", status=1)
    assert "name it with --vm" in err and "Traceback" not in err
    out = run("plans", "drill", "web", "--every", "7d")
    assert "recovery plan web is drilled every 7d; next drill" in out
    assert "drilled every 7d" in run("plans", "remove-check", "web", "db")
    err = run("plans", "drill", "web", "--every", "5 parsecs", status=1)
    assert "--every '5 parsecs' is not a duration" in err
    assert "no scheduled drills" in run("plans", "drill", "web", "--every", "off")
    test = s.admin.call(s.admin.stub.Failover, admin_pb2.FailoverRequest(vm="web01", type="test"))
    assert wait_job(s.admin, test.id).state == "succeeded"
    err = run("plans", "drill", "web", status=1)
    assert "a test failover of web01 is in place" in err and "plans cleanup-test web" in err


def test_a_guest_check_on_a_host_without_guests_fails_the_drill_and_it_cleans_up(
    sites: Sites,
) -> None:
    s = sites
    a = s.admin
    protect(s, (("web01", "hv-a1"),))
    make_plan(s, "web", [["web01"]])
    add_check(a, kind="guest", vm="web01", program="/usr/local/bin/check-web", name="web up")
    job = wait_job(a, a.call(a.stub.DrillPlan, admin_pb2.PlanRef(name="web")).id)
    assert job.state == "failed"
    (d,) = drills(s, "web")
    d = a.call(a.stub.GetDrill, admin_pb2.GetDrillRequest(id=d.id))
    (check,) = d.checks
    assert not check.passed and check.error  # the directory backend has no guest to run it in
    assert d.reason.startswith("Check: web up: ")
    assert d.vms[0].exact.checked and d.cleaned_up and not has_test_vm(s, "web01")
