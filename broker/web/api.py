"""What the dashboard's pages read and do, through the admin API's own handlers.

Pages never touch the store: every read and every action here is the admin RPC's handler body
(``AdminService.<Rpc>.__wrapped__``, the function under the ``@rpc`` decorator), called after
the same authorisation the decorator makes (``ctx.authorizer.authorize(identity, [admin])``),
with the signed-in operator's identity. So a dashboard action is the admin call: its job records
the operator as ``created_by`` and a revoked operator is refused as on the admin port. The one
read that is not an admin RPC is :meth:`DashboardApi.leadership`, which asks the store's broker
leases (the query the leader election itself decides by): the admin API has no RPC for it.

Lists page as the admin API does (:mod:`broker.paging`): a page of the dashboard is at most one
admin page, and a filtered list reads a bounded number of admin pages (:data:`SCAN_PAGES`), so no
request's work grows with the vault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf.message import Message

from broker.services.admin import AdminService
from broker.services.context import BrokerContext
from broker.web import CONTEXT, OPERATOR
from sitepair import pki
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2

M = TypeVar("M", bound=Message)
_ADMIN = frozenset([pki.Role.ADMIN])

#: How many admin pages a filtered list reads at most before it offers "more".
SCAN_PAGES = 5
#: How many of the newest jobs a VM's page looks through for that VM's jobs.
VM_JOBS_SCAN = 500

#: The dashboard's plan actions: the confirmation page's name -> what it runs.
PLAN_ACTIONS = (
    "test-failover",
    "cleanup-test",
    "failover-planned",
    "failover-unplanned",
    "commit",
    "resume",
    "drill",
)


@dataclasses.dataclass(frozen=True)
class Leadership:
    """Whether this broker leads the brokers sharing its store, and which one does."""

    is_leader: bool
    #: The leading broker's description (host, pid, control address); "" when not known.
    leader: str = ""


@dataclasses.dataclass(frozen=True)
class Filtered:
    """A filtered page: the items that matched, and where the next look starts ("" = done)."""

    items: list[Any]
    next_page_token: str


class DashboardApi:
    """The admin API as the signed-in operator, for one request."""

    def __init__(self, ctx: BrokerContext, operator: pki.Identity) -> None:
        self.ctx = ctx
        self.operator = operator
        self._service = AdminService(ctx)

    @classmethod
    def for_request(cls, request: web.Request) -> DashboardApi:
        return cls(request.app[CONTEXT], request[OPERATOR])

    async def _call(self, rpc: Callable[..., Coroutine[Any, Any, M]], message: Message) -> M:
        """Run an admin RPC's handler body as the operator, authorised as the RPC would be."""
        self.ctx.authorizer.authorize(self.operator, _ADMIN)
        handler: Callable[..., Coroutine[Any, Any, M]] = rpc.__wrapped__  # type: ignore[attr-defined]
        return await handler(self._service, message, None, self.operator)

    # -- the vault and this broker ----------------------------------------------------------
    async def broker_info(self) -> admin_pb2.BrokerInfo:
        return await self._call(AdminService.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())

    async def operator_name(self) -> str:
        """The operator's name as ``operators list`` shows it (its id if it has none)."""
        resp = await self._call(AdminService.ListOperators, admin_pb2.ListOperatorsRequest())
        for op in resp.operators:
            if op.id == self.operator.id:
                return str(op.name)
        return self.operator.id

    async def leadership(self) -> Leadership:
        """Whether this broker leads, as the admin API's GetBrokerInfo says."""
        info = await self._call(AdminService.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
        return Leadership(is_leader=info.is_leader, leader=info.leader)

    # -- servers, clouds, pairs -------------------------------------------------------------
    async def servers(
        self, page_token: str = "", page_size: int = 0
    ) -> admin_pb2.ListServersResponse:
        return await self._call(
            AdminService.ListServers,
            admin_pb2.ListServersRequest(page_token=page_token, page_size=page_size),
        )

    async def clouds(self) -> admin_pb2.ListCloudsResponse:
        return await self._call(AdminService.ListClouds, admin_pb2.ListCloudsRequest())

    async def pairs(self) -> admin_pb2.ListPairsResponse:
        return await self._call(AdminService.ListPairs, admin_pb2.ListPairsRequest())

    # -- protected VMs ----------------------------------------------------------------------
    async def protected(
        self,
        keep: Callable[[admin_pb2.ProtectedVm], bool],
        *,
        page_token: str = "",
        page_size: int = 0,
    ) -> Filtered:
        """Protected VMs by name that ``keep`` accepts: up to ``page_size`` of them from at
        most :data:`SCAN_PAGES` admin pages."""
        return await self._filtered(
            lambda token: self._call(
                AdminService.ListProtected,
                admin_pb2.ListProtectedRequest(page_token=token, page_size=page_size),
            ),
            lambda resp: list(resp.vms),
            keep,
            page_token,
            page_size,
        )

    async def protected_vm(self, vm: str) -> admin_pb2.ProtectedVm:
        return await self._call(AdminService.GetProtected, admin_pb2.ProtectedRef(vm=vm))

    async def cycles(self, vm: str, limit: int = 0) -> admin_pb2.ListCyclesResponse:
        """The VM's recent replication cycles, newest first (``limit`` 0: the API's default)."""
        return await self._call(
            AdminService.ListCycles, admin_pb2.ListCyclesRequest(vm=vm, limit=limit)
        )

    async def vm_jobs(self, vm_name: str, limit: int = 20) -> list[admin_pb2.Job]:
        """The VM's newest jobs (target ``vm/NAME``) among the vault's newest
        :data:`VM_JOBS_SCAN` jobs."""
        resp = await self._call(
            AdminService.ListJobs, admin_pb2.ListJobsRequest(page_size=VM_JOBS_SCAN)
        )
        return [j for j in resp.jobs if j.target == f"vm/{vm_name}"][:limit]

    # -- jobs -------------------------------------------------------------------------------
    async def jobs(
        self, state: str = "", page_token: str = "", page_size: int = 0
    ) -> admin_pb2.ListJobsResponse:
        return await self._call(
            AdminService.ListJobs,
            admin_pb2.ListJobsRequest(state=state, page_token=page_token, page_size=page_size),
        )

    async def job(self, job_id: str) -> admin_pb2.Job:
        return await self._call(AdminService.GetJob, admin_pb2.GetJobRequest(id=job_id))

    async def watch_job(self, job_id: str) -> AsyncGenerator[admin_pb2.Job, None]:
        """The job now and after every change until it is final (the WatchJob stream)."""
        self.ctx.authorizer.authorize(self.operator, _ADMIN)
        watch = AdminService.WatchJob.__wrapped__
        async for job in watch(
            self._service, admin_pb2.GetJobRequest(id=job_id), None, self.operator
        ):
            yield job

    # -- plans and drills -------------------------------------------------------------------
    async def plans(self) -> admin_pb2.ListPlansResponse:
        return await self._call(AdminService.ListPlans, admin_pb2.ListPlansRequest())

    async def plan(self, name: str) -> admin_pb2.RecoveryPlan:
        return await self._call(AdminService.GetPlan, admin_pb2.PlanRef(name=name))

    async def run_plan_action(self, plan: str, action: str, *, point: str = "") -> admin_pb2.Job:
        """Start one of :data:`PLAN_ACTIONS` on ``plan``; the job the admin call made."""
        if action == "test-failover":
            return await self._call(
                AdminService.PlanFailover,
                admin_pb2.PlanFailoverRequest(plan=plan, type="test", point=point),
            )
        if action == "failover-planned":
            return await self._call(
                AdminService.PlanFailover, admin_pb2.PlanFailoverRequest(plan=plan, type="planned")
            )
        if action == "failover-unplanned":
            return await self._call(
                AdminService.PlanFailover,
                admin_pb2.PlanFailoverRequest(plan=plan, type="unplanned", point=point),
            )
        if action == "cleanup-test":
            return await self._call(
                AdminService.PlanCleanupTest,
                admin_pb2.PlanCleanupRequest(plan=plan, notes="from the dashboard"),
            )
        if action == "commit":
            return await self._call(AdminService.PlanCommit, admin_pb2.PlanRef(name=plan))
        if action == "resume":
            return await self._call(AdminService.PlanResume, admin_pb2.PlanRef(name=plan))
        if action == "drill":
            return await self._call(AdminService.DrillPlan, admin_pb2.PlanRef(name=plan))
        raise InvalidArgument(
            f"unknown plan action {action!r}; use one of {', '.join(PLAN_ACTIONS)}"
        )

    async def drills(
        self, plan: str = "", page_token: str = "", page_size: int = 0
    ) -> admin_pb2.ListDrillsResponse:
        return await self._call(
            AdminService.ListDrills,
            admin_pb2.ListDrillsRequest(plan=plan, page_token=page_token, page_size=page_size),
        )

    async def drill(self, drill_id: str) -> admin_pb2.Drill:
        return await self._call(AdminService.GetDrill, admin_pb2.GetDrillRequest(id=drill_id))

    # -- paging -----------------------------------------------------------------------------
    @staticmethod
    async def _filtered(
        page: Callable[[str], Coroutine[Any, Any, Any]],
        items: Callable[[Any], list[Any]],
        keep: Callable[[Any], bool],
        page_token: str,
        page_size: int,
    ) -> Filtered:
        """Read admin pages from ``page_token`` until ``page_size`` items matched, the list
        ended, or :data:`SCAN_PAGES` pages were read; the token says where to go on."""
        found: list[Any] = []
        token = page_token
        for _ in range(SCAN_PAGES):
            resp = await page(token)
            found.extend(item for item in items(resp) if keep(item))
            token = resp.next_page_token
            if not token or (page_size and len(found) >= page_size):
                break
        return Filtered(found, token)
