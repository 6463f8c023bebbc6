"""What ``vms list``, ``vms protected`` and ``vms show`` tell an operator through a test
failover, a failover without reverse replication and its commit, and what ``plans resume``
prints: each view says where the VM runs, what is in place and what to do next."""

from __future__ import annotations

import json
import re

from sitepair.v1 import admin_pb2
from tests.operator.conftest import Run
from tests.protection.conftest import Sites, eventually
from tests.protection.test_failover import protect_running
from tests.protection.test_plans import install_scripts, make_plan, protect_three

HEADERS = ["VM", "HOST", "CLOUD", "STATE", "DISKS", "PROTECTION", "HEALTH", "RPO"]


def table(out: str) -> list[dict[str, str]]:
    """A table as printed, by header (cells hold no double spaces)."""
    lines = out.splitlines()
    headers = lines[0].split()
    return [dict(zip(headers, re.split(r"\s{2,}", line), strict=False)) for line in lines[2:]]


def test_views_through_a_test_failover_and_a_failover_without_reverse(
    sites: Sites, cli: Run
) -> None:
    s = sites
    protect_running(s)
    cli("vms", "cycle", "web01", "--wait")
    v = s.protected("web01")
    primary, replica = v.primary_server, v.replica_server

    show = cli("vms", "show", "web01")
    assert "certificate on 8084," in show, show  # the port the replica listens on, not 0
    assert re.search(r"^  RPO            \d+[smhd] \(now minus", show, re.M), show
    out = cli("vms", "list")
    assert out.splitlines()[0].split() == HEADERS
    (row,) = table(out)
    assert row["PROTECTION"] == "protected" and re.fullmatch(r"\d+[smhd]", row["RPO"]), row
    listed = json.loads(cli("vms", "list", "--json"))
    assert isinstance(listed[0]["rpo_seconds"], int)

    # A test failover in place shows in both views.
    cli("vms", "failover", "web01", "--type", "test", "--wait")
    rows = eventually(
        lambda: (r := {r["VM"]: r for r in table(cli("vms", "list"))}) and "web01-test" in r and r,
        what="the recovery host reporting the test VM",
    )
    assert isinstance(rows, dict)
    assert rows["web01-test"]["HOST"] == replica
    assert rows["web01-test"]["PROTECTION"] == "test-failover", rows
    assert rows["web01-test"]["RPO"] == "-"
    show = cli("vms", "show", "web01")
    assert "test failover  test VM web01-test from point" in show, show
    assert f"on {replica}, network none" in show and "vms cleanup-test web01" in show
    cli("vms", "cleanup-test", "web01", "--wait")
    assert "test failover" not in cli("vms", "show", "web01")

    # A planned failover without --reverse: PRIMARY is where the VM runs now.
    cli("vms", "failover", "web01", "--type", "planned", "--wait")
    protected = table(cli("vms", "protected"))
    assert (protected[0]["PRIMARY"], protected[0]["REPLICA"]) == (replica, "-"), protected
    show = cli("vms", "show", "web01")
    assert f"primary        {replica} in cloud-b (failed over from {primary})" in show, show
    assert "nothing replicates until `vms reverse web01`" in show
    eventually(
        lambda: [(r["VM"], r["HOST"]) for r in table(cli("vms", "list"))] == [("web01", replica)],
        what="web01 listed once, where it runs",
    )

    # Committed without reverse replication: nothing replicates, and health says so.
    cli("vms", "commit", "web01", "--wait")
    s.broker.loop.call(s.broker.ctx.reports.evaluate_health())
    v = s.protected("web01")
    assert v.health == "warning", v
    assert any("vms reverse web01" in r.message for r in v.reasons), v.reasons
    assert "warning   failed over and committed, but nothing replicates" in cli(
        "vms", "show", "web01"
    )
    # The way forward it names works.
    cli("vms", "reverse", "web01", "--wait")
    s.broker.loop.call(s.broker.ctx.reports.evaluate_health())
    v = s.protected("web01")
    assert (v.state, v.running_on, v.primary_server) == ("protected", replica, replica)
    assert not any(r.code == "not-replicating" for r in v.reasons)


def test_plans_resume_prints_the_plan_past_its_manual_step(sites: Sites, cli: Run) -> None:
    s = sites
    protect_three(s)
    for h in s.hosts.values():
        install_scripts(h)
    make_plan(s, s.hosts["hv-a1"].home / "marker.txt")
    job = s.admin.call(
        s.admin.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="erp", type="planned")
    )
    eventually(
        lambda: (
            s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state == "waiting"
        ),
        what="the plan waiting at its manual action",
    )
    out = cli("plans", "resume", "erp")
    step = next(line for line in out.splitlines() if "Group 2: before: check the database" in line)
    assert "succeeded" in step and "resumed by" in step, out
    assert "waiting" not in out.splitlines()[1], out
    cli("jobs", "watch", job.id)
