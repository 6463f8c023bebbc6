"""Two sites of two agents each against a real broker whose metrics endpoint is on, and a
recovery plan of two protected VMs (db01 in group 1, web01 in group 2) to drill."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.home import BrokerHome
from sitepair.v1 import admin_pb2
from tests.metrics.conftest import enable_metrics
from tests.protection.conftest import Sites, eventually, inventory_has, sites  # noqa: F401
from tests.protection.test_failover import host_of
from tests.protection.test_walkthrough import MiB, make_vm, setup_pair
from tests.support.brokers import make_home

#: A check script whose exit status is what the file named by its first argument says, and
#: which reports what a drill tells it.
CHECK = """import os, sys
status = int(open(sys.argv[1]).read())
print("plan", os.environ["SITEPAIR_PLAN"], "drill", os.environ["SITEPAIR_DRILL"])
print("vm", os.environ.get("SITEPAIR_VM", "-"), "test vm", os.environ.get("SITEPAIR_TEST_VM", "-"))
print("vms", os.environ["SITEPAIR_VMS"], "test vms", os.environ["SITEPAIR_TEST_VMS"])
print("orders table missing" if status else "orders table ok")
raise SystemExit(status)
"""


@pytest.fixture
def broker_home(tmp_path: Path) -> BrokerHome:
    home = make_home(tmp_path / "broker", log_file=tmp_path / "broker.log")
    enable_metrics(home.config)
    return home


def install_scripts(s: Sites) -> None:
    for h in s.hosts.values():
        scripts = h.home / "scripts"
        scripts.mkdir(exist_ok=True)
        (scripts / "check-db.py").write_text(CHECK)
        (scripts / "noop.py").write_text("print('group action ran')\n")


def protect(s: Sites, vms: tuple[tuple[str, str], ...]) -> None:
    setup_pair(s, points=2)
    for i, (vm, host) in enumerate(vms, start=1):
        make_vm(s, host, vm, size=4 * MiB, seed=i)
        host_of(s, host).set_vm_state(vm, "running")
    eventually(lambda: all(inventory_has(s.admin, v) for v, _ in vms), what="VMs")
    for vm, _ in vms:
        s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))
    install_scripts(s)


def make_plan(s: Sites, name: str, groups: list[list[str]]) -> admin_pb2.RecoveryPlan:
    a = s.admin
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name=name))
    for _ in groups[1:]:
        a.call(a.stub.AddPlanGroup, admin_pb2.PlanRef(name=name))
    for gi, vms in enumerate(groups, start=1):
        for vm in vms:
            a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan=name, group=gi, vm=vm))
    plan: admin_pb2.RecoveryPlan = a.call(a.stub.GetPlan, admin_pb2.PlanRef(name=name))
    return plan


def drills(s: Sites, plan: str = "") -> list[admin_pb2.Drill]:
    resp = s.admin.call(s.admin.stub.ListDrills, admin_pb2.ListDrillsRequest(plan=plan))
    return list(resp.drills)


def has_test_vm(s: Sites, vm: str) -> bool:
    """Whether the test VM of ``vm`` is on its recovery host."""
    host = host_of(s, s.protected(vm).replica_server)
    try:
        host.find_vm(f"{vm}-test")
    except Exception:
        return False
    return True
