"""The protection part of the admin API: VMs, clouds, pairs, mappings, protected VMs.

ListVms (by VM name, host, VM id) and ListProtected (by VM name, relationship id) page
(:mod:`broker.paging`); a VM's disk and NIC lists stored over their cap, or a protected VM's
reported status too big for a page, are withheld and named in the item's ``withheld``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc.aio

from broker import documents, paging, vm_hosts
from broker.convert import job_to_proto, policy_from_proto, policy_to_proto, relationship_to_proto
from broker.failover_record import FailoverRecord, TestFailover
from broker.policy import Policy
from broker.services.admin_checks import check_site
from broker.services.admin_drills import plan_checks
from broker.store.base import StoreError
from broker.store.models import Cloud, InventoryVm, Relationship
from broker.store.repo.cycles import CYCLES_KEPT
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.errors import InvalidArgument, NotFound
from sitepair.protoconv import timestamp
from sitepair.rpc import rpc
from sitepair.v1 import admin_pb2, common_pb2

T = TypeVar("T")

if TYPE_CHECKING:
    from broker.services.context import BrokerContext

ADMIN = [pki.Role.ADMIN]
Ctx = grpc.aio.ServicerContext[Any, Any]
#: What a protected VM too big for a page leaves out first: what agents report about it.
_BULKY_PROTECTED = [
    "primary_status",
    "replica_status",
    "failover_json",
    "reasons",
    "last_verification",
    "vm_name",
    "replica_folder",
]


def _vm_proto(v: InventoryVm) -> tuple[common_pb2.VirtualMachine, list[str]]:
    """The VM as the admin API shows it, and the lists left out because they are unreadable."""
    withheld: list[str] = []
    vm = common_pb2.VirtualMachine(
        id=v.vm_id,
        name=v.name,
        generation=v.generation,
        cpu_count=v.cpu_count,
        memory_mb=v.memory_mb,
        state=v.state,
    )
    try:
        for d in json.loads(v.disks_json):
            vm.disks.add(
                id=d["id"],
                path=d["path"],
                format=d["format"],
                virtual_size=d["virtual_size"],
                storage_class=d.get("storage_class", ""),
                file_size=d.get("file_size", 0),
            )
    except (ValueError, KeyError, TypeError, AttributeError):
        vm.ClearField("disks")
        withheld.append("disks")
    try:
        for n in json.loads(v.nics_json):
            vm.nics.add(**n)
    except (ValueError, KeyError, TypeError, AttributeError):
        vm.ClearField("nics")
        withheld.append("nics")
    return vm, withheld


def rpo_seconds(rel: Relationship, now: float) -> int | None:
    """The RPO lag of ``rel`` in whole seconds (:func:`broker.documents.rpo_lag`, the number the
    metrics serve too); None before the first point."""
    lag = documents.rpo_lag(rel.replica_status_json, rel.primary_status_json, now)
    return None if lag is None else min(int(lag), 2**32 - 1)


def _test_in_place(rel: Relationship) -> TestFailover | None:
    try:
        return FailoverRecord.decode(rel.failover_json).test
    except StoreError:
        return None  # vms show still shows the rest; the failover jobs report the damage


def protected_proto(rel: Relationship, names: dict[str, str], now: float) -> admin_pb2.ProtectedVm:
    """A protected VM as the admin API shows it: the stored relationship, where the VM runs
    now (:mod:`broker.vm_hosts`), its RPO lag and a test failover in place."""
    msg = relationship_to_proto(rel, names)
    running, _ = vm_hosts.hosts_now(rel)
    msg.running_on = names.get(running, running)
    rpo = rpo_seconds(rel, now)
    if rpo is not None:
        msg.rpo_seconds = rpo
    test = _test_in_place(rel)
    if test is not None:
        made = test.result
        msg.test_failover.CopyFrom(
            admin_pb2.TestFailoverInfo(
                vm_name=made.vm_name if made else "",
                host=names.get(rel.replica_server, rel.replica_server),
                point=made.point if made else 0,
                network=test.network,
                job_id=test.job,
            )
        )
    return msg


#: Cycles ListCycles answers when the request names no limit.
DEFAULT_CYCLES = 200


class ProtectionAdmin:
    ctx: BrokerContext

    async def _read(self, fn: Callable[[Tx], T]) -> T:
        return await self.ctx.store.reading(fn)

    def _cloud_proto(self, tx: Tx, cloud: Cloud) -> admin_pb2.Cloud:
        pair = tx.pair_of(cloud.name)
        hosts = [tx.get_server(i) for i in tx.cloud_hosts(cloud.name)]
        msg = admin_pb2.Cloud(
            name=cloud.name,
            site=cloud.site,
            description=cloud.description,
            hosts=sorted(h.name for h in hosts if h is not None),
            created_at=timestamp(cloud.created_at),
        )
        if pair is not None:
            primary = pair.primary_cloud == cloud.name
            msg.role = "primary" if primary else "recovery"
            msg.paired_with = pair.recovery_cloud if primary else pair.primary_cloud
        return msg

    # -- VMs --------------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def ListVms(
        self, request: admin_pb2.ListVmsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListVmsResponse:
        after = paging.decode_token(request.page_token, (str, str, str))
        size = paging.page_size(request.page_size)

        def read(tx: Tx) -> admin_pb2.ListVmsResponse:
            server_id = tx.find_server(request.server).id if request.server else ""
            latest = vm_hosts.latest_relationships(tx.list_relationships(include_disabled=True))
            rels = {i: r for i, r in latest.items() if r.disabled_at is None}

            def other_copy(v: InventoryVm) -> bool:
                """The other copy of a VM whose host where it runs reports it too."""
                rel = rels.get(v.vm_id)
                if rel is None or not vm_hosts.is_other_copy(v, rel):
                    return False
                running, _ = vm_hosts.hosts_now(rel)
                return any(c.server_id == running for c in tx.find_vms(v.vm_id))

            # The VMs test failovers in place made, by their id: shown with their relationship.
            tests = {}
            for r in rels.values():
                test = _test_in_place(r)
                if test is not None and test.result is not None and test.result.vm_id:
                    tests[test.result.vm_id] = r
            now = self.ctx.clock.now()

            # All hosts: each VM once, where it runs. Rows are read until a page is full.
            rows: list[InventoryVm] = []
            cursor = after
            while True:
                batch = tx.vm_page(server_id=server_id, after=cursor, limit=size + 1)
                rows += [v for v in batch if server_id or not other_copy(v)]
                if len(batch) <= size or len(rows) > size:
                    break
                cursor = (batch[-1].name, batch[-1].server_id, batch[-1].vm_id)
            host_ids = sorted({v.server_id for v in rows})
            names = tx.server_names(host_ids)
            clouds = {sid: tx.cloud_of(sid) or "" for sid in host_ids}

            def convert(v: InventoryVm) -> admin_pb2.VmInfo:
                rel = rels.get(v.vm_id)
                vm, unreadable = _vm_proto(v)
                state = rel.state.value if rel else ""
                rpo = rpo_seconds(rel, now) if rel else None
                if rel and other_copy(v):
                    state, rpo = "replica", None
                elif rel is None and v.vm_id in tests:
                    rel, state = tests[v.vm_id], "test-failover"
                info = admin_pb2.VmInfo(
                    server_id=v.server_id,
                    server_name=names.get(v.server_id, v.server_id),
                    cloud=clouds.get(v.server_id, ""),
                    vm=vm,
                    relationship_id=rel.id if rel else "",
                    protection_state=state,
                    health=rel.health if rel else "",
                    withheld=[*v.withheld, *unreadable],
                )
                if state == "test-failover":
                    info.health = ""
                if rpo is not None:
                    info.rpo_seconds = rpo
                return paging.trim(info, ["vm"])

            vms, token = paging.fill(rows, size, convert, lambda v: (v.name, v.server_id, v.vm_id))
            return admin_pb2.ListVmsResponse(vms=vms, next_page_token=token)

        return await self._read(read)

    # -- clouds -----------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def CreateCloud(
        self, request: admin_pb2.CreateCloudRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Cloud:
        await self._read(lambda tx: check_site(tx, request.site))
        cloud = await self.ctx.clouds.create_cloud(request.name, request.site, request.description)
        return await self._read(lambda tx: self._cloud_proto(tx, cloud))

    @rpc(roles=ADMIN)
    async def ListClouds(
        self, request: admin_pb2.ListCloudsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListCloudsResponse:
        return await self._read(
            lambda tx: admin_pb2.ListCloudsResponse(
                clouds=[self._cloud_proto(tx, c) for c in tx.list_clouds()]
            )
        )

    async def _cloud(self, name: str) -> admin_pb2.Cloud:
        def read(tx: Tx) -> admin_pb2.Cloud:
            cloud = tx.get_cloud(name)
            if cloud is None:
                raise NotFound(f"no cloud {name!r}", hint="see `clouds list`")
            return self._cloud_proto(tx, cloud)

        return await self._read(read)

    @rpc(roles=ADMIN)
    async def GetCloud(
        self, request: admin_pb2.CloudRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Cloud:
        return await self._cloud(request.name)

    @rpc(roles=ADMIN)
    async def DeleteCloud(
        self, request: admin_pb2.CloudRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Cloud:
        before = await self._cloud(request.name)
        await self.ctx.clouds.delete_cloud(request.name)
        return before

    @rpc(roles=ADMIN)
    async def AddCloudHost(
        self, request: admin_pb2.CloudHostRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Cloud:
        await self.ctx.clouds.add_host(request.cloud, request.server)
        return await self._cloud(request.cloud)

    @rpc(roles=ADMIN)
    async def RemoveCloudHost(
        self, request: admin_pb2.CloudHostRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Cloud:
        await self.ctx.clouds.remove_host(request.cloud, request.server)
        return await self._cloud(request.cloud)

    @rpc(roles=ADMIN)
    async def RefreshCloud(
        self, request: admin_pb2.CloudRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.servers.refresh_cloud(request.name, by=identity.id))

    # -- pairs ------------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def PairClouds(
        self, request: admin_pb2.PairCloudsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        policy = policy_from_proto(request.policy)
        job = await self.ctx.clouds.pair(request.primary, request.recovery, policy, by=identity.id)
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def SetPairPolicy(
        self, request: admin_pb2.PairCloudsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        policy = policy_from_proto(request.policy)
        return job_to_proto(
            await self.ctx.clouds.set_policy(request.primary, policy, by=identity.id)
        )

    @rpc(roles=ADMIN)
    async def UnpairClouds(
        self, request: admin_pb2.CloudRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.CloudPairInfo:
        pair = await self._read(lambda tx: tx.pair_of(request.name))
        if pair is None:
            raise NotFound(f"cloud {request.name} is not paired")
        await self.ctx.clouds.unpair(request.name)
        return admin_pb2.CloudPairInfo(
            primary=pair.primary_cloud,
            recovery=pair.recovery_cloud,
            policy=policy_to_proto(Policy.from_json(pair.policy_json)),
        )

    @rpc(roles=ADMIN)
    async def ListPairs(
        self, request: admin_pb2.ListPairsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListPairsResponse:
        def read(tx: Tx) -> admin_pb2.ListPairsResponse:
            rels = tx.list_relationships()
            return admin_pb2.ListPairsResponse(
                pairs=[
                    admin_pb2.CloudPairInfo(
                        primary=p.primary_cloud,
                        recovery=p.recovery_cloud,
                        policy=policy_to_proto(Policy.from_json(p.policy_json)),
                        protected_vms=sum(1 for r in rels if r.primary_cloud == p.primary_cloud),
                    )
                    for p in tx.list_pairs()
                ]
            )

        return await self._read(read)

    # -- mappings ---------------------------------------------------------------------------
    async def _mapping(self, kind: str, source: str) -> admin_pb2.MappingInfo:
        for m in await self.ctx.clouds.mappings(kind):
            if m["source"] == source:
                return admin_pb2.MappingInfo(kind=kind, **m)
        raise NotFound(f"no {kind} mapping for {source!r}")

    @rpc(roles=ADMIN)
    async def Map(
        self, request: admin_pb2.MapRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.MappingInfo:
        await self.ctx.clouds.map(request.kind, request.source, request.target)
        return await self._mapping(request.kind, request.source)

    @rpc(roles=ADMIN)
    async def Unmap(
        self, request: admin_pb2.MapRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.MappingInfo:
        before = await self._mapping(request.kind, request.source)
        await self.ctx.clouds.unmap(request.kind, request.source)
        return before

    @rpc(roles=ADMIN)
    async def ListMappings(
        self, request: admin_pb2.ListMappingsRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListMappingsResponse:
        kinds = [request.kind] if request.kind else ["network", "storage"]
        out = admin_pb2.ListMappingsResponse()
        for kind in kinds:
            if kind not in ("network", "storage"):
                raise InvalidArgument(f"unknown mapping kind {kind!r}")
            for m in await self.ctx.clouds.mappings(kind):
                out.mappings.add(kind=kind, **m)
        return out

    # -- protected VMs ----------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def ProtectVm(
        self, request: admin_pb2.ProtectVmRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        job = await self.ctx.protection.protect(
            request.vm,
            by=identity.id,
            accept_no_network=request.accept_no_network,
            server_ref=request.server,
        )
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def DisableProtection(
        self, request: admin_pb2.DisableProtectionRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        delete = {
            admin_pb2.DisableProtectionRequest.POLICY: None,
            admin_pb2.DisableProtectionRequest.KEEP: False,
            admin_pb2.DisableProtectionRequest.DELETE: True,
        }[request.replica]
        return job_to_proto(
            await self.ctx.protection.disable(request.vm, by=identity.id, delete_replica=delete)
        )

    @rpc(roles=ADMIN)
    async def ReplicationAction(
        self, request: admin_pb2.ReplicationActionRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        job = await self.ctx.protection.action(
            request.vm, request.action, by=identity.id, repair=not request.no_repair
        )
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def ListProtected(
        self, request: admin_pb2.ListProtectedRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListProtectedResponse:
        after = paging.decode_token(request.page_token, (str, str))
        size = paging.page_size(request.page_size)

        def read(tx: Tx) -> admin_pb2.ListProtectedResponse:
            rows = tx.relationship_page(
                include_disabled=request.include_disabled, after=after, limit=size + 1
            )
            names = tx.server_names(
                sorted(
                    {
                        sid
                        for r in rows
                        for sid in (r.primary_server, r.replica_server, *vm_hosts.hosts_now(r))
                    }
                )
            )

            now = self.ctx.clock.now()

            def convert(r: Relationship) -> admin_pb2.ProtectedVm:
                return paging.trim(protected_proto(r, names, now), _BULKY_PROTECTED)

            vms, token = paging.fill(rows, size, convert, lambda r: (r.vm_name, r.id))
            return admin_pb2.ListProtectedResponse(vms=vms, next_page_token=token)

        return await self._read(read)

    @rpc(roles=ADMIN)
    async def GetProtected(
        self, request: admin_pb2.ProtectedRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ProtectedVm:
        def read(tx: Tx) -> admin_pb2.ProtectedVm:
            rel: Relationship = tx.find_relationship(request.vm)
            names = {s.id: s.name for s in tx.list_servers(include_removed=True)}
            return protected_proto(rel, names, self.ctx.clock.now())

        return await self._read(read)

    @rpc(roles=ADMIN)
    async def ListCycles(
        self, request: admin_pb2.ListCyclesRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListCyclesResponse:
        if request.limit > CYCLES_KEPT:
            raise InvalidArgument(f"limit must be at most {CYCLES_KEPT} (0 = {DEFAULT_CYCLES})")
        limit = request.limit or DEFAULT_CYCLES

        def read(tx: Tx) -> admin_pb2.ListCyclesResponse:
            rel: Relationship = tx.find_relationship(request.vm)
            # One more than asked: the oldest listed cycle's lag needs the cut before it.
            cycles = tx.recent_cycles(rel.id, limit + 1)
            resp = admin_pb2.ListCyclesResponse(vm_name=rel.vm_name, relationship_id=rel.id)
            for c, before in zip(cycles[:limit], [*cycles[1:], None], strict=False):
                resp.cycles.append(
                    admin_pb2.CycleRecord(
                        sequence=c.sequence,
                        finished_at=timestamp(c.finished_at),
                        cut_at=timestamp(c.cut_at),
                        seconds=c.seconds,
                        bytes=c.bytes,
                        lag_seconds=max(0.0, c.finished_at - before.cut_at) if before else 0.0,
                    )
                )
            return resp

        return await self._read(read)

    # -- failover ---------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def Failover(
        self, request: admin_pb2.FailoverRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        fo = self.ctx.failover
        point = request.point or "latest"
        if request.type == "planned":
            if request.point and request.point != "latest":
                raise InvalidArgument(
                    "a planned failover always uses the latest state (it loses nothing)"
                )
            job = await fo.planned(request.vm, by=identity.id, reverse=request.reverse)
        elif request.type == "unplanned":
            job = await fo.unplanned(request.vm, by=identity.id, point=point)
        elif request.type == "test":
            job = await fo.test(request.vm, by=identity.id, point=point, network=request.network)
        else:
            raise InvalidArgument(
                f"failover type must be planned, unplanned or test, not {request.type!r}"
            )
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def CommitFailover(
        self, request: admin_pb2.ProtectedRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.failback.commit(request.vm, by=identity.id))

    @rpc(roles=ADMIN)
    async def CancelFailover(
        self, request: admin_pb2.ProtectedRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.failback.cancel(request.vm, by=identity.id))

    @rpc(roles=ADMIN)
    async def CleanupTestFailover(
        self, request: admin_pb2.CleanupTestRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(
            await self.ctx.failover.cleanup_test(request.vm, by=identity.id, notes=request.notes)
        )

    @rpc(roles=ADMIN)
    async def ReverseReplication(
        self, request: admin_pb2.ProtectedRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.failback.reverse(request.vm, by=identity.id))

    # -- recovery plans ---------------------------------------------------------------------
    async def _plan_proto(self, name: str) -> admin_pb2.RecoveryPlan:
        plan = await self.ctx.plans.get(name)

        def read(tx: Tx) -> admin_pb2.RecoveryPlan:
            doc = json.loads(plan.doc_json)
            msg = admin_pb2.RecoveryPlan(
                name=plan.name, description=plan.description, updated_at=timestamp(plan.updated_at)
            )
            for i, g in enumerate(doc.get("groups", []), start=1):
                group = msg.groups.add(index=i, relationship_ids=g["vms"])
                for rid in g["vms"]:
                    rel = tx.get_relationship(rid)
                    group.vms.append(rel.vm_name if rel else rid)
                for when in ("before", "after"):
                    for a in g[when]:
                        getattr(group, when).add(
                            name=a["name"],
                            kind=a["kind"],
                            script=a.get("script", ""),
                            args=a.get("args", []),
                            timeout_seconds=int(a.get("timeout", 0)),
                            instructions=a.get("instructions", ""),
                        )
            msg.checks.extend(plan_checks(plan.doc_json, tx))
            schedule = tx.get_drill_schedule(plan.name)
            msg.drill_every_seconds = int(schedule.every_seconds) if schedule else 0
            return msg

        return await self._read(read)

    @rpc(roles=ADMIN)
    async def CreatePlan(
        self, request: admin_pb2.CreatePlanRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        await self.ctx.plans.create(request.name, request.description)
        return await self._plan_proto(request.name)

    @rpc(roles=ADMIN)
    async def GetPlan(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        return await self._plan_proto(request.name)

    @rpc(roles=ADMIN)
    async def ListPlans(
        self, request: admin_pb2.ListPlansRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.ListPlansResponse:
        plans = await self._read(lambda tx: tx.list_plans())
        return admin_pb2.ListPlansResponse(plans=[await self._plan_proto(p.name) for p in plans])

    @rpc(roles=ADMIN)
    async def DeletePlan(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        before = await self._plan_proto(request.name)
        await self.ctx.plans.delete(request.name)
        return before

    @rpc(roles=ADMIN)
    async def AddPlanGroup(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        await self.ctx.plans.add_group(request.name)
        return await self._plan_proto(request.name)

    @rpc(roles=ADMIN)
    async def AddPlanVm(
        self, request: admin_pb2.AddPlanVmRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        await self.ctx.plans.add_vm(request.plan, request.group, request.vm)
        return await self._plan_proto(request.plan)

    @rpc(roles=ADMIN)
    async def AddPlanAction(
        self, request: admin_pb2.AddPlanActionRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.RecoveryPlan:
        a = request.action
        await self.ctx.plans.add_action(
            request.plan,
            request.group,
            when=request.when,
            action_name=a.name,
            script=a.script,
            args=list(a.args),
            timeout_seconds=a.timeout_seconds or 300,
            manual=a.instructions,
        )
        return await self._plan_proto(request.plan)

    @rpc(roles=ADMIN)
    async def PlanFailover(
        self, request: admin_pb2.PlanFailoverRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        job = await self.ctx.plans.run_failover(
            request.plan, request.type, by=identity.id, point=request.point or "latest"
        )
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def PlanCleanupTest(
        self, request: admin_pb2.PlanCleanupRequest, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(
            await self.ctx.plans.cleanup_test(request.plan, by=identity.id, notes=request.notes)
        )

    @rpc(roles=ADMIN)
    async def PlanCommit(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.plans.commit(request.name, by=identity.id))

    @rpc(roles=ADMIN)
    async def PlanResume(
        self, request: admin_pb2.PlanRef, context: Ctx, identity: pki.Identity
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.plans.resume_plan(request.name, by=identity.id))
