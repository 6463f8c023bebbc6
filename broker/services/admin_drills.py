"""The drills part of the admin API: a plan's checks, drills now and on a schedule, the history.

ListDrills pages newest first by (started_at, id) (:mod:`broker.paging`); see
:mod:`broker.drills` for what a drill does.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc.aio

from broker import paging
from broker.convert import job_to_proto
from broker.drill_checks import check_proto
from broker.drills import drill_proto
from broker.store.models import DrillSchedule
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.protoconv import timestamp
from sitepair.rpc import rpc
from sitepair.v1 import admin_pb2

if TYPE_CHECKING:
    from broker.services.context import BrokerContext

ADMIN = [pki.Role.ADMIN]
Ctx = grpc.aio.ServicerContext[Any, Any]


class DrillAdmin:
    ctx: BrokerContext

    if TYPE_CHECKING:  # the plans' part of the admin API (ProtectionAdmin) shows plans

        async def _plan_proto(self, name: str) -> admin_pb2.RecoveryPlan: ...

    @rpc(roles=ADMIN)
    async def AddPlanCheck(
        self, request: admin_pb2.AddPlanCheckRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        c = request.check
        await self.ctx.drills.add_check(
            request.plan,
            kind=c.kind,
            program=c.program,
            vm=c.vm,
            args=list(c.args),
            timeout_seconds=c.timeout_seconds or 60,
            name=c.name,
        )
        return await self._plan_proto(request.plan)

    @rpc(roles=ADMIN)
    async def RemovePlanCheck(
        self, request: admin_pb2.RemovePlanCheckRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        await self.ctx.drills.remove_check(request.plan, request.name)
        return await self._plan_proto(request.plan)

    @rpc(roles=ADMIN)
    async def DrillPlan(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.drills.start(request.name, by=identity.id))

    @rpc(roles=ADMIN)
    async def SetDrillSchedule(
        self, request: admin_pb2.SetDrillScheduleRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.DrillSchedule:
        schedule = await self.ctx.drills.set_schedule(
            request.plan, float(request.every_seconds), by=identity.id
        )
        plan = await self._plan_proto(request.plan)
        return schedule_proto(schedule, request.plan, plan)

    @rpc(roles=ADMIN)
    async def ListDrills(
        self, request: admin_pb2.ListDrillsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListDrillsResponse:
        after = paging.decode_token(request.page_token, (float, str))
        size = paging.page_size(request.page_size)
        if request.plan:
            await self.ctx.plans.get(request.plan)  # an unknown plan is an error, not nothing

        def read(tx: Tx) -> admin_pb2.ListDrillsResponse:
            rows = tx.drill_page(plan=request.plan, after=after, limit=size + 1)
            drills, token = paging.fill(
                rows,
                size,
                drill_proto,  # bounded by broker.drills (output tails, proof sizes)
                lambda d: (d.started_at, d.id),
            )
            return admin_pb2.ListDrillsResponse(drills=drills, next_page_token=token)

        return await self.ctx.store.reading(read)

    @rpc(roles=ADMIN)
    async def GetDrill(
        self, request: admin_pb2.GetDrillRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Drill:
        return drill_proto(await self.ctx.drills.get(request.id))


def schedule_proto(
    schedule: DrillSchedule | None, plan: str, shown: admin_pb2.RecoveryPlan
) -> admin_pb2.DrillSchedule:
    msg = admin_pb2.DrillSchedule(plan=plan, checks=list(shown.checks))
    if schedule is not None:
        msg.every_seconds = int(schedule.every_seconds)
        msg.next_at.CopyFrom(timestamp(schedule.next_at))
        msg.set_by = schedule.set_by
    return msg


def plan_checks(doc_json: str, tx: Tx) -> list[admin_pb2.PlanCheck]:
    """A plan's checks as the admin API shows them (VM names as they are now)."""
    checks = json.loads(doc_json).get("checks", [])
    names = {}
    for c in checks:
        rid = c.get("relationship", "")
        if rid and rid not in names:
            rel = tx.get_relationship(rid)
            names[rid] = rel.vm_name if rel else rid
    return [check_proto(c, names) for c in checks]
