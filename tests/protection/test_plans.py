"""Recovery plans: groups in order, script and manual actions, stopping, resuming, restarts."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from broker.client import wait_job
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Host, Sites, eventually, inventory_has
from tests.protection.test_failover import host_of
from tests.protection.test_walkthrough import MiB, make_vm, setup_pair
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerProcess, create_key, make_home

MARK = """import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{sys.argv[2]} plan={os.environ['SITEPAIR_PLAN']} group={os.environ['SITEPAIR_GROUP']} vms={os.environ['SITEPAIR_VMS']} type={os.environ['SITEPAIR_FAILOVER_TYPE']} t={time.time()}\\n")
print("marked", sys.argv[2])
"""


def install_scripts(host: Host) -> None:
    scripts = host.home / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "mark.py").write_text(MARK)
    (scripts / "fail.py").write_text(
        "print('DNS server refused the update')\nraise SystemExit(5)\n"
    )


def protect_three(s: Sites) -> None:
    setup_pair(s)
    for vm, host, seed in (("vm1", "hv-a1", 1), ("vm2", "hv-a2", 2), ("vm3", "hv-a1", 3)):
        make_vm(s, host, vm, size=4 * MiB, seed=seed)
        host_of(s, host).set_vm_state(vm, "running")
    eventually(lambda: all(inventory_has(s.admin, v) for v in ("vm1", "vm2", "vm3")), what="VMs")
    for vm in ("vm1", "vm2", "vm3"):
        s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))


def make_plan(s: Sites, marker: Path, *, failing: bool = False) -> None:
    a = s.admin
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="erp", description="the ERP stack"))
    a.call(a.stub.AddPlanGroup, admin_pb2.PlanRef(name="erp"))
    a.call(a.stub.AddPlanGroup, admin_pb2.PlanRef(name="erp"))
    for group, vm in ((1, "vm1"), (2, "vm2"), (3, "vm3")):
        a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="erp", group=group, vm=vm))
    a.call(
        a.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="erp",
            group=1,
            when="after",
            action=admin_pb2.PlanAction(
                name="database up",
                script="fail.py" if failing else "mark.py",
                args=[str(marker), "after-1"],
                timeout_seconds=30,
            ),
        ),
    )
    a.call(
        a.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="erp",
            group=2,
            when="before",
            action=admin_pb2.PlanAction(
                name="check the database",
                instructions="log in to the database and check the last order",
            ),
        ),
    )
    a.call(
        a.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="erp",
            group=3,
            when="after",
            action=admin_pb2.PlanAction(
                name="update DNS",
                script="mark.py",
                args=[str(marker), "after-3"],
                timeout_seconds=30,
            ),
        ),
    )


def running_on(s: Sites, vm: str, host: str) -> bool:
    try:
        return host_of(s, host).find_vm(vm)[1].state == "running"
    except Exception:
        return False


def test_three_groups_in_order_with_script_and_manual_action(sites: Sites, tmp_path: Path) -> None:
    s = sites
    protect_three(s)
    for h in s.hosts.values():
        install_scripts(h)
    marker = tmp_path / "marker.txt"
    make_plan(s, marker)
    plan = s.admin.call(s.admin.stub.GetPlan, admin_pb2.PlanRef(name="erp"))
    assert [list(g.vms) for g in plan.groups] == [["vm1"], ["vm2"], ["vm3"]]
    job = s.admin.call(
        s.admin.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="erp", type="planned")
    )
    assert [st.name for st in job.steps] == [
        "Group 1: planned failover of 1 VM(s)",
        "Group 1: after: database up",
        "Group 2: before: check the database",
        "Group 2: planned failover of 1 VM(s)",
        "Group 3: planned failover of 1 VM(s)",
        "Group 3: after: update DNS",
    ]
    # The plan waits at the manual action: group 1 is over, group 2 has not started.
    eventually(
        lambda: (
            s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state == "waiting"
        ),
        what="waiting",
    )
    waiting = s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id))
    assert "check the last order" in waiting.steps[2].message
    assert s.protected("vm1").state == "failed-over-planned"
    assert s.protected("vm2").state == "protected" and s.protected("vm3").state == "protected"
    assert marker.read_text().startswith("after-1 plan=erp group=1 vms=vm1 type=planned")
    s.admin.call(s.admin.stub.PlanResume, admin_pb2.PlanRef(name="erp"))
    done = wait_job(s.admin, job.id)
    assert done.state == "succeeded", (
        done.error,
        [(x.name, x.state, x.message) for x in done.steps],
    )
    lines = marker.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["after-1", "after-3"]
    for vm in ("vm1", "vm2", "vm3"):
        assert s.protected(vm).state == "failed-over-planned"
    result = json.loads(done.result_json)
    assert (
        result["action-1"]["exit_status"] == 0 and "marked after-1" in result["action-1"]["output"]
    )
    # Commit the whole plan.
    commit = s.job(s.admin.call(s.admin.stub.PlanCommit, admin_pb2.PlanRef(name="erp")))
    assert [st.state for st in commit.steps] == ["succeeded"] * 3
    assert all(s.protected(vm).state == "committed" for vm in ("vm1", "vm2", "vm3"))


def test_failing_script_stops_a_planned_plan_where_it_failed(sites: Sites, tmp_path: Path) -> None:
    s = sites
    protect_three(s)
    for h in s.hosts.values():
        install_scripts(h)
    make_plan(s, tmp_path / "marker.txt", failing=True)
    job = s.admin.call(
        s.admin.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="erp", type="planned")
    )
    done = wait_job(s.admin, job.id)
    assert done.state == "failed"
    assert "step 2, Group 1: after: database up" in done.error
    assert (
        "status 5" in done.steps[1].message
        and "DNS server refused the update" in done.steps[1].message
    )
    assert [st.state for st in done.steps[2:]] == ["cancelled"] * 4
    assert s.protected("vm1").state == "failed-over-planned"
    assert s.protected("vm2").state == "protected" and s.protected("vm3").state == "protected"


def test_test_failover_of_a_plan_and_cleanup(sites: Sites, tmp_path: Path) -> None:
    s = sites
    protect_three(s)
    for h in s.hosts.values():
        install_scripts(h)
    make_plan(s, tmp_path / "marker.txt")
    job = s.admin.call(
        s.admin.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="erp", type="test")
    )
    eventually(
        lambda: (
            s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state == "waiting"
        ),
        what="waiting",
    )
    s.admin.call(s.admin.stub.PlanResume, admin_pb2.PlanRef(name="erp"))
    assert wait_job(s.admin, job.id).state == "succeeded"
    for vm in ("vm1", "vm2", "vm3"):
        v = s.protected(vm)
        assert v.state == "protected"
        assert running_on(s, f"{vm}-test", v.replica_server)
    s.job(
        s.admin.call(
            s.admin.stub.PlanCleanupTest,
            admin_pb2.PlanCleanupRequest(plan="erp", notes="all green"),
        )
    )
    for vm in ("vm1", "vm2", "vm3"):
        v = s.protected(vm)
        assert not running_on(s, f"{vm}-test", v.replica_server)


def test_broker_killed_during_a_plan_failover_finishes_it(tmp_path: Path) -> None:
    """SIGKILL the broker while a plan waits between groups; a new broker process finishes it."""
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    broker.pin_ports()
    agents: list[AgentThread] = []
    try:
        hosts = {}
        with broker.admin() as admin:
            for name, site in (("hv-a1", "site-a"), ("hv-b1", "site-b")):
                creds = tmp_path / f"{name}.json"
                create_key(admin, creds, site=site)
                h = tmp_path / name
                (h / "gold").mkdir(parents=True)
                ident = register_agent(
                    creds,
                    h,
                    name=name,
                    storage={"gold": str(h / "gold")},
                    networks=[("corp-a" if site == "site-a" else "corp-b", [])],
                    vm_root="gold/vms",
                )
                hosts[name] = Host(name, site, h, ident.host_id, None)
                install_scripts(hosts[name])
            for h in hosts.values():
                agents.append(AgentThread(h.home))
                agents[-1].wait_connected()
            sites = Sites(broker=None, admin=admin, hosts=hosts)  # type: ignore[arg-type]
            a = admin
            a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
            a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
            a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
            a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
            sites.job(
                a.call(
                    a.stub.PairClouds,
                    admin_pb2.PairCloudsRequest(
                        primary="cloud-a",
                        recovery="cloud-b",
                        policy=admin_pb2.Policy(copy_frequency_seconds=300, compression=True),
                    ),
                )
            )
            a.call(
                a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b")
            )
            for vm in ("vm1", "vm2"):
                make_vm(sites, "hv-a1", vm, size=4 * MiB)
                host_of(sites, "hv-a1").set_vm_state(vm, "running")
            eventually(lambda: inventory_has(a, "vm1") and inventory_has(a, "vm2"), what="VMs")
            for vm in ("vm1", "vm2"):
                sites.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))
            a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="p"))
            a.call(a.stub.AddPlanGroup, admin_pb2.PlanRef(name="p"))
            a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="p", group=1, vm="vm1"))
            a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="p", group=2, vm="vm2"))
            a.call(
                a.stub.AddPlanAction,
                admin_pb2.AddPlanActionRequest(
                    plan="p",
                    group=2,
                    when="before",
                    action=admin_pb2.PlanAction(name="wait", instructions="press on"),
                ),
            )
            job = a.call(
                a.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="p", type="planned")
            )
            eventually(
                lambda: (
                    a.call(a.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state == "waiting"
                ),
                what="waiting",
            )
        broker.stop(signal.SIGKILL)
        broker.start()
        with broker.admin() as admin:
            sites.admin = admin
            # The restarted broker resumed the plan: it still waits for the operator.
            eventually(
                lambda: (
                    admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state
                    == "waiting"
                ),
                what="resumed and waiting",
            )
            admin.call(admin.stub.PlanResume, admin_pb2.PlanRef(name="p"))
            done = wait_job(admin, job.id)
            assert done.state == "succeeded", (
                done.error,
                [(x.name, x.state, x.message) for x in done.steps],
            )
            for vm in ("vm1", "vm2"):
                assert sites.protected(vm).state == "failed-over-planned"
                assert running_on(sites, vm, "hv-b1")
            # No job is left in progress.
            jobs = admin.call(admin.stub.ListJobs, admin_pb2.ListJobsRequest(limit=100)).jobs
            assert all(j.state in ("succeeded", "failed", "cancelled") for j in jobs), [
                (j.kind, j.state) for j in jobs
            ]
    finally:
        for ag in agents:
            ag.stop()
        broker.stop()
