"""Scheduled drills: stored schedules, run when due (the scheduler driven with a clock moved
ahead, sitepair/clock.py), skipped with a recorded reason when the plan cannot be drilled."""

from __future__ import annotations

from broker.client import AdminClient, wait_job
from broker.drill_schedule import DrillScheduler
from broker.drills import SCHEDULER
from broker.home import BrokerHome
from broker.store.models import Drill, DrillState
from sitepair.clock import OffsetClock
from sitepair.v1 import admin_pb2
from tests.drills.conftest import drills, has_test_vm, make_plan, protect
from tests.protection.conftest import Sites
from tests.support.brokers import BrokerThread

HOUR = 3600


def scheduler_ahead(s: Sites, seconds: float) -> DrillScheduler:
    """The broker's drill scheduler as it would be ``seconds`` from now."""
    ctx = s.broker.ctx
    return DrillScheduler(store=ctx.store, clock=OffsetClock(seconds), drills=ctx.drills)


def test_a_scheduled_drill_runs_when_due_and_is_skipped_with_its_reason(sites: Sites) -> None:
    s = sites
    a = s.admin
    protect(s, (("web01", "hv-a1"),))
    make_plan(s, "web", [["web01"]])
    schedule = a.call(
        a.stub.SetDrillSchedule, admin_pb2.SetDrillScheduleRequest(plan="web", every_seconds=HOUR)
    )
    assert schedule.every_seconds == HOUR and schedule.set_by
    assert a.call(a.stub.GetPlan, admin_pb2.PlanRef(name="web")).drill_every_seconds == HOUR
    stored = s.broker.loop.call(s.broker.ctx.store.reading(lambda tx: tx.get_drill_schedule("web")))
    assert stored is not None and stored.next_at == schedule.next_at.seconds + (
        schedule.next_at.nanos / 1e9
    )
    # Not due yet: nothing starts.
    assert s.broker.loop.call(scheduler_ahead(s, 0).tick()) == []
    assert drills(s) == []

    # A drill a stopped broker left "running" (its job gone) does not block the next one.
    orphan = Drill("drill-orphan", "web", "job-gone", DrillState.RUNNING, "", "op", 1.0, None)
    s.broker.loop.call(s.broker.ctx.store.writing(lambda tx: tx.insert_drill(orphan)))

    # An hour later it is due: a drill job carried by the scheduler, which passes (no checks:
    # the test VM proven exact and started is the drill).
    (due,) = s.broker.loop.call(scheduler_ahead(s, HOUR + 1).tick())
    assert due.plan == "web" and due.job and not due.skipped
    job = wait_job(a, due.job)
    assert job.state == "succeeded" and job.created_by == SCHEDULER
    ran, settled = drills(s, "web")
    assert (ran.id, ran.state, ran.started_by) == (due.drill, "passed", SCHEDULER)
    assert (settled.id, settled.state) == ("drill-orphan", "failed")
    assert settled.reason == "the drill's job ended before the drill was recorded"
    assert not has_test_vm(s, "web01")
    # The same moment again: the schedule moved on, nothing runs twice.
    assert s.broker.loop.call(scheduler_ahead(s, HOUR + 1).tick()) == []

    # A test failover in place when the next drill is due: skipped, with the reason kept.
    test = a.call(a.stub.Failover, admin_pb2.FailoverRequest(vm="web01", type="test"))
    assert wait_job(a, test.id).state == "succeeded"
    (due,) = s.broker.loop.call(scheduler_ahead(s, 2 * HOUR + 2).tick())
    assert due.skipped and not due.job
    skipped, passed, _ = drills(s, "web")
    assert passed.id == ran.id
    assert skipped.state == "skipped" and skipped.started_by == SCHEDULER
    assert skipped.reason == "a test failover of web01 is in place"
    # A skipped drill changes neither health nor the last result.
    assert "drill-failed" not in {r.code for r in s.protected("web01").reasons}

    # --every off: no more scheduled drills.
    off = a.call(
        a.stub.SetDrillSchedule, admin_pb2.SetDrillScheduleRequest(plan="web", every_seconds=0)
    )
    assert off.every_seconds == 0
    assert s.broker.loop.call(scheduler_ahead(s, 100 * HOUR).tick()) == []


def test_a_deleted_plans_schedule_is_dropped_with_a_skipped_drill(
    broker: BrokerThread, admin: AdminClient
) -> None:
    a = admin
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="gone"))
    a.call(
        a.stub.SetDrillSchedule, admin_pb2.SetDrillScheduleRequest(plan="gone", every_seconds=HOUR)
    )
    a.call(a.stub.DeletePlan, admin_pb2.PlanRef(name="gone"))
    later = DrillScheduler(
        store=broker.ctx.store, clock=OffsetClock(HOUR + 1), drills=broker.ctx.drills
    )
    (due,) = broker.loop.call(later.tick())
    assert "no recovery plan 'gone'" in due.skipped
    (skipped,) = a.call(a.stub.ListDrills, admin_pb2.ListDrillsRequest()).drills
    assert (skipped.plan, skipped.state) == ("gone", "skipped")
    assert broker.loop.call(broker.ctx.store.reading(lambda tx: tx.list_drill_schedules())) == []


def test_a_schedule_survives_a_broker_restart(broker_home: BrokerHome) -> None:
    first = BrokerThread(broker_home)
    try:
        with first.admin() as a:
            a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="erp"))
            set_ = a.call(
                a.stub.SetDrillSchedule,
                admin_pb2.SetDrillScheduleRequest(plan="erp", every_seconds=7 * 86400),
            )
    finally:
        first.stop()
    second = BrokerThread(broker_home)
    try:
        with second.admin() as a:
            assert a.call(a.stub.GetPlan, admin_pb2.PlanRef(name="erp")).drill_every_seconds == (
                7 * 86400
            )
        assert second.broker.drill_scheduler is not None
        later = DrillScheduler(
            store=second.ctx.store, clock=OffsetClock(7 * 86400 + 1), drills=second.ctx.drills
        )
        (due,) = second.loop.call(later.tick())  # due as set before the restart
        assert due.plan == "erp" and due.skipped == "recovery plan erp has no VMs"
        schedule = second.loop.call(
            second.ctx.store.reading(lambda tx: tx.get_drill_schedule("erp"))
        )
        assert schedule is not None and schedule.next_at > set_.next_at.seconds
    finally:
        second.stop()
