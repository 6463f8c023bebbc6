"""A drill of a real QEMU guest (slow): the test VM proven exact and booted on the recovery
host, guest checks run inside it through qemu-guest-agent (one passes, one exits 3), the
drill failed with both outcomes kept, and the test VM removed."""

from __future__ import annotations

import pytest

from broker.client import wait_job
from sitepair.v1 import admin_pb2
from tests.drills.conftest import drills
from tests.qemu.conftest import Sites, guest_image, sites  # noqa: F401
from tests.qemu.test_guest_failover import protect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_guest_checks_run_inside_the_drilled_test_vm(sites: Sites) -> None:  # noqa: F811
    s = sites
    a = s.admin
    protect(s, "web01")
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="web"))
    a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="web", group=1, vm="web01"))
    for name, script in (("hello", "echo guest says hello"), ("broken", "echo no app; exit 3")):
        a.call(
            a.stub.AddPlanCheck,
            admin_pb2.AddPlanCheckRequest(
                plan="web",
                check=admin_pb2.PlanCheck(
                    name=name,
                    kind="guest",
                    vm="web01",
                    program="/bin/sh",
                    args=["-c", script],
                    timeout_seconds=300,  # the test VM boots under TCG first
                ),
            ),
        )
    job = wait_job(a, a.call(a.stub.DrillPlan, admin_pb2.PlanRef(name="web")).id)
    (d,) = drills(s, "web")
    d = a.call(a.stub.GetDrill, admin_pb2.GetDrillRequest(id=d.id))
    assert job.state == "failed" and d.state == "failed", (d.reason, list(d.checks))
    (vm,) = d.vms
    assert vm.exact.checked and vm.exact.mismatched_blocks == 0 and vm.exact.bytes_compared > 0
    hello, broken = d.checks
    assert hello.passed and hello.exit_status == 0 and "guest says hello" in hello.output_tail
    assert not broken.passed and broken.exit_status == 3 and "no app" in broken.output_tail
    assert d.reason == "Check: broken: exit status 3: no app"
    assert d.cleaned_up
    assert not any(v.name == "web01-test" for v in s.b.backend.inventory().vms)
