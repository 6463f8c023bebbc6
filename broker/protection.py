"""Protection management: clouds, cloud pairs and their policy, mappings, protected VMs, health.

What an operator does between registering hosts and a failover, as Azure Site Recovery does it
between two on-premises sites. Every change that touches hosts runs as a job whose steps are
commands to agents; command steps are idempotent and a job interrupted by a broker restart
carries on from its first unfinished step (:meth:`ProtectionManager.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from google.protobuf import json_format

from broker.commands import CommandDispatcher
from broker.health import CycleHistory, HealthConfig, evaluate
from broker.jobs import JobManager
from broker.orchestration import Orchestrator, Step, StepFailed, StepRun
from broker.policy import Policy, validate
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.leadership import Leader
from broker.store.models import (
    Cloud,
    CloudPair,
    CommandState,
    InventoryVm,
    Job,
    JobState,
    JobStep,
    Relationship,
    RelationshipState,
    Server,
    StepState,
)
from broker.store.sqlite import Tx
from sitepair import paths, pki, tickets
from sitepair.clock import Clock
from sitepair.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SitepairError,
)
from sitepair.protoconv import timestamp
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.protection")

SUPPORTED_FORMATS = ("vhd", "vhdx")
#: Space kept free on a replica volume beyond the disks' allocated size.
PLACEMENT_MARGIN = 1 << 30
#: How long a failed job waits for a host to confirm a rollback command (it stays queued).
UNDO_WAIT = 30.0
#: Statuses looked at in one replication report (a host reports one per relationship and role;
#: more than this is not a host we would give that many relationships).
MAX_STATUSES_PER_REPORT = 4096
#: Longest text kept from a status, per field; longer text is cut.
STATUS_TEXT_LIMITS = {
    "relationship_id": 64,
    "role": 16,
    "state": 64,
    "vm_id": 128,
    "last_error": 2048,
    "last_error_code": 64,
    "app_consistent_error": 2048,
}
#: Recovery points kept from a status (24 hourly points, the latest, and room for pinned ones).
MAX_STATUS_POINTS = 64


@dataclasses.dataclass(frozen=True)
class Placement:
    server: Server
    folder: str
    reason: str


class ProtectionManager(Orchestrator):
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        jobs: JobManager,
        dispatcher: CommandDispatcher,
        sessions: SessionRegistry,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        ticket_key: Any,
        agent_lifetime: float,
        health: HealthConfig | None = None,
        command_timeout: float = 3600.0,
    ) -> None:
        super().__init__(
            store=store,
            clock=clock,
            jobs=jobs,
            dispatcher=dispatcher,
            sessions=sessions,
            spawn=spawn,
            command_timeout=command_timeout,
        )
        self.ticket_key = ticket_key
        self.agent_lifetime = agent_lifetime
        self.health_config = health or HealthConfig()
        self.history = CycleHistory()
        self._reported = asyncio.Condition()
        self._refused_count = 0
        self._refused_logged_at: float | None = None
        self.declare("configure-pair", self._pair_steps)
        self.declare("enable-protection", self._protect_steps, on_failure=self._undo_protect)
        self.declare("disable-protection", self._disable_steps)
        self.declare("replication-action", self._action_steps)
        self.declare("update-replica-address", self._readdress_steps)

    # -- clouds -----------------------------------------------------------------------------
    async def create_cloud(self, name: str, site: str, description: str = "") -> Cloud:
        pki.check_identifier(name, "cloud name")
        pki.check_identifier(site, "site")
        cloud = Cloud(name=name, site=site, description=description, created_at=self.clock.now())
        await self.write(lambda tx: tx.insert_cloud(cloud))
        log.info("cloud created", extra={"fields": {"cloud": name, "site": site}})
        return cloud

    async def delete_cloud(self, name: str) -> None:
        def run(tx: Tx) -> None:
            if tx.get_cloud(name) is None:
                raise NotFound(f"no cloud {name!r}")
            pair = tx.pair_of(name)
            if pair is not None:
                raise FailedPrecondition(
                    f"cloud {name} is paired ({pair.primary_cloud} -> {pair.recovery_cloud})",
                    hint=f"remove the pairing first: clouds unpair {pair.primary_cloud}",
                )
            tx.delete_cloud(name)

        await self.write(run)

    async def add_host(self, cloud: str, server_ref: str) -> Server:
        now = self.clock.now()

        def run(tx: Tx) -> Server:
            c = tx.get_cloud(cloud)
            if c is None:
                raise NotFound(f"no cloud {cloud!r}", hint="create it with `clouds create`")
            server = tx.find_server(server_ref)
            if server.removed_at is not None:
                raise FailedPrecondition(f"server {server.name} was removed")
            if server.site != c.site:
                raise FailedPrecondition(
                    f"server {server.name} is at site {server.site}, cloud {cloud} at {c.site}"
                )
            current = tx.cloud_of(server.id)
            if current == cloud:
                return server
            if current is not None and _active_on(tx, server.id):
                raise FailedPrecondition(
                    f"server {server.name} is in cloud {current} and protects VMs there",
                    hint="disable their protection before moving the host",
                )
            tx.set_host_cloud(server.id, cloud, now)
            return server

        return await self.write(run)

    async def remove_host(self, cloud: str, server_ref: str) -> Server:
        now = self.clock.now()

        def run(tx: Tx) -> Server:
            server = tx.find_server(server_ref)
            if tx.cloud_of(server.id) != cloud:
                raise FailedPrecondition(f"server {server.name} is not in cloud {cloud}")
            if _active_on(tx, server.id):
                raise FailedPrecondition(
                    f"server {server.name} takes part in protected VMs",
                    hint="disable their protection first",
                )
            tx.set_host_cloud(server.id, None, now)
            return server

        return await self.write(run)

    # -- pairs ------------------------------------------------------------------------------
    async def pair(self, primary: str, recovery: str, policy: Policy, *, by: str) -> Job:
        validate(policy)
        now = self.clock.now()

        def run(tx: Tx) -> None:
            for name in (primary, recovery):
                if tx.get_cloud(name) is None:
                    raise NotFound(f"no cloud {name!r}")
            if primary == recovery:
                raise InvalidArgument("a cloud cannot be paired with itself")
            for name in (primary, recovery):
                existing = tx.pair_of(name)
                if existing is not None:
                    raise AlreadyExists(
                        f"cloud {name} already belongs to the pair {existing.primary_cloud} -> "
                        f"{existing.recovery_cloud}; a cloud belongs to one pair at most",
                        hint="to change the target, remove the pairing first: "
                        f"clouds unpair {existing.primary_cloud}",
                    )
            tx.insert_pair(CloudPair(primary, recovery, policy.to_json(), now, now))

        await self.write(run)
        log.info("clouds paired", extra={"fields": {"primary": primary, "recovery": recovery}})
        return await self._apply_policy_job(primary, recovery, policy, by=by)

    async def set_policy(self, primary: str, policy: Policy, *, by: str) -> Job:
        validate(policy)
        now = self.clock.now()

        def run(tx: Tx) -> CloudPair:
            pair = tx.pair_of(primary)
            if pair is None or pair.primary_cloud != primary:
                raise NotFound(f"cloud {primary} is not the primary of a pair")
            tx.update_pair_policy(primary, policy.to_json(), now)
            return pair

        pair = await self.write(run)
        return await self._apply_policy_job(pair.primary_cloud, pair.recovery_cloud, policy, by=by)

    async def _apply_policy_job(
        self, primary: str, recovery: str, policy: Policy, *, by: str
    ) -> Job:
        return await self.start_job(
            "configure-pair",
            f"pair/{primary}",
            {"primary": primary, "recovery": recovery, "authentication": policy.authentication},
            by=by,
        )

    def _pair_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        primary, recovery = params["primary"], params["recovery"]

        async def check_hosts(step: StepRun) -> str:
            def read(tx: Tx) -> tuple[Policy, list[Server]]:
                pair = tx.pair_of(primary)
                if pair is None:
                    raise StepFailed(f"the pair {primary} -> {recovery} was removed meanwhile")
                return Policy.from_json(pair.policy_json), [
                    s for s in (tx.get_server(i) for i in tx.cloud_hosts(recovery)) if s is not None
                ]

            policy, hosts = await self.read(read)
            problems = []
            for host in hosts:
                facts = json.loads(host.facts_json or "{}")
                port = int(
                    facts.get(
                        "certificatePort"
                        if policy.authentication == "certificate"
                        else "ticketPort",
                        0,
                    )
                )
                if not port:
                    problems.append(
                        f"{host.name} reports no {policy.authentication} replication listener"
                    )
            if problems:
                raise StepFailed("; ".join(problems))
            return (
                f"{len(hosts)} recovery host(s) ready"
                if hosts
                else f"cloud {recovery} has no hosts yet"
            )

        async def apply_to_relationships(step: StepRun) -> str:
            def read(tx: Tx) -> tuple[CloudPair | None, list[Relationship], set[str]]:
                rels = [r for r in tx.list_relationships() if r.primary_cloud == primary]
                return tx.pair_of(primary), rels, tx.removed_server_ids()

            pair, rels, removed = await self.read(read)
            if pair is None:
                raise StepFailed(f"the pair {primary} -> {recovery} was removed meanwhile")
            updated, waiting = 0, []
            for rel in rels:
                # Every relationship gets the policy in the store; those replicating get it on
                # their hosts too, each its own commands (one per relationship and host).
                # Others take it when they next configure their hosts (cancel, reverse); a
                # failed-over VM's old primary must not be told to replicate again.
                def update(tx: Tx, rel_id: str = rel.id) -> None:
                    tx.update_relationship(rel_id, self.clock.now(), policy_json=pair.policy_json)

                await self.write(update)
                if rel.state not in _REPLICATING:
                    waiting.append(f"{rel.vm_name} ({rel.state.value})")
                    continue
                gone = [s for s in (rel.primary_server, rel.replica_server) if s in removed]
                if gone:
                    waiting.append(f"{rel.vm_name} (a host was removed)")
                    continue
                fresh = await self.relationship(rel.id)
                await step.send(fresh.replica_server, self._configure_replica_cmd(fresh))
                await step.send(fresh.primary_server, await self._configure_source_cmd(fresh))
                updated += 1
                await step.progress(done=updated, total=len(rels))
            message = f"{updated} protected VM(s) updated"
            if waiting:
                message += f"; stored for {len(waiting)} not replicating now: " + ", ".join(
                    waiting[:20]
                )
            return message

        # Jobs created before the name of the policy's authentication was kept say "ticket" or
        # "certificate" in their first step's name as the policy had it then.
        authentication = params.get("authentication", "")
        return [
            Step(f"check the hosts of {recovery} accept {authentication} replication", check_hosts),
            Step(APPLY_POLICY, apply_to_relationships),
        ]

    async def unpair(self, primary: str) -> None:
        def run(tx: Tx) -> None:
            pair = tx.pair_of(primary)
            if pair is None or pair.primary_cloud != primary:
                raise NotFound(f"cloud {primary} is not the primary of a pair")
            rels = [r for r in tx.list_relationships() if r.primary_cloud == primary]
            if rels:
                raise FailedPrecondition(
                    f"{len(rels)} VM(s) of cloud {primary} are protected",
                    hint="disable their protection before removing the pairing",
                )
            tx.delete_pair(primary)

        await self.write(run)

    # -- mappings ---------------------------------------------------------------------------
    async def map(self, kind: str, source: str, target: str) -> None:
        if kind not in ("network", "storage"):
            raise InvalidArgument(f"unknown mapping kind {kind!r}")
        if not source or not target:
            raise InvalidArgument("a mapping needs a source and a target")
        await self.write(lambda tx: tx.put_mapping(kind, source, target, self.clock.now()))

    async def unmap(self, kind: str, source: str) -> None:
        removed = await self.write(lambda tx: tx.delete_mapping(kind, source))
        if not removed:
            raise NotFound(f"no {kind} mapping for {source!r}")

    async def mappings(self, kind: str) -> list[dict[str, Any]]:
        """Each mapping with the clouds whose hosts offer its source and target."""

        def read(tx: Tx) -> list[dict[str, Any]]:
            offered: dict[str, set[str]] = {}
            if kind == "network":
                for server_id, name, _ in tx.host_networks():
                    cloud = tx.cloud_of(server_id)
                    if cloud:
                        offered.setdefault(name, set()).add(cloud)
            else:
                for st in tx.host_storage():
                    cloud = tx.cloud_of(st.server_id)
                    if cloud:
                        offered.setdefault(st.name, set()).add(cloud)
            return [
                {
                    "source": m.source,
                    "target": m.target,
                    "source_clouds": sorted(offered.get(m.source, ())),
                    "target_clouds": sorted(offered.get(m.target, ())),
                }
                for m in tx.list_mappings(kind)
            ]

        return await self.read(read)

    # -- enable protection ------------------------------------------------------------------
    async def protect(self, vm_ref: str, *, by: str, accept_no_network: bool = False) -> Job:
        now = self.clock.now()

        def prepare(tx: Tx) -> Relationship:
            vm, server = _find_vm(tx, vm_ref)
            cloud = tx.cloud_of(server.id)
            if cloud is None:
                raise FailedPrecondition(
                    f"VM {vm.name} is on {server.name}, which is in no cloud",
                    hint="add the host to a cloud that is the primary of a pair",
                )
            pair = tx.pair_of(cloud)
            if pair is None or pair.primary_cloud != cloud:
                raise FailedPrecondition(
                    f"cloud {cloud} is not the primary cloud of a pair",
                    hint=f"pair it: clouds pair {cloud} RECOVERY_CLOUD",
                )
            disks = json.loads(vm.disks_json)
            if not disks:
                raise FailedPrecondition(f"VM {vm.name} has no disks to replicate")
            for d in disks:
                # A disk id becomes a file name on the replica host: the path rule, here first.
                paths.check_component(str(d["id"]), f"disk id of {vm.name}")
                if d["format"] not in SUPPORTED_FORMATS:
                    raise FailedPrecondition(
                        f"disk {d['id']} of {vm.name} is {d['format']}; "
                        "only VHD and VHDX are replicated"
                    )
            nics = json.loads(vm.nics_json)
            net_map = {m.source: m.target for m in tx.list_mappings("network")}
            unmapped = sorted(
                {n["network"] for n in nics if n["network"] and n["network"] not in net_map}
            )
            if unmapped and not accept_no_network:
                raise FailedPrecondition(
                    f"VM {vm.name} uses network(s) {', '.join(unmapped)} with no mapping: "
                    "after failover those NICs would have no network",
                    hint="map them (networks map SRC TGT) or protect with --accept-no-network",
                )
            for r in tx.list_relationships():
                if r.vm_id == vm.vm_id:
                    raise AlreadyExists(
                        f"VM {vm.name} is already protected ({r.id}, {r.state.value})"
                    )
            # Onboarding: a replica of this VM kept by an earlier relationship, on a host of the
            # recovery cloud, is reused and brought up to date by a checksum resync.
            recovery_hosts = set(tx.cloud_hosts(pair.recovery_cloud))
            earlier = [
                r
                for r in tx.list_relationships(include_disabled=True)
                if r.vm_id == vm.vm_id
                and r.disabled_at is not None
                and r.replica_folder
                and r.replica_server in recovery_hosts
                and json.loads(r.replica_vm_json).get("replica_kept")
            ]
            adopt_from = max(earlier, key=lambda r: r.disabled_at or 0.0) if earlier else None
            replica_vm = {
                "adopt": adopt_from is not None,
                "name": vm.name,
                "generation": vm.generation,
                "cpu_count": vm.cpu_count,
                "memory_mb": vm.memory_mb,
                "disks": disks,
                "nics": [
                    {
                        "name": n["name"],
                        "network": net_map.get(n["network"], ""),
                        "source_network": n["network"],
                    }
                    for n in nics
                ],
            }
            rel = Relationship(
                id=f"rel-{uuid.uuid4().hex[:12]}",
                vm_id=vm.vm_id,
                vm_name=vm.name,
                primary_cloud=pair.primary_cloud,
                recovery_cloud=pair.recovery_cloud,
                primary_server=server.id,
                replica_server=adopt_from.replica_server if adopt_from else "",
                replica_folder=adopt_from.replica_folder if adopt_from else "",
                state=RelationshipState.ENABLING,
                epoch=1,
                policy_json=pair.policy_json,
                replica_vm_json=json.dumps(replica_vm),
                created_at=now,
                updated_at=now,
            )
            tx.insert_relationship(rel)
            return rel

        rel = await self.write(prepare)
        job = await self.create_job(
            "enable-protection", f"vm/{rel.vm_name}", {"relationship": rel.id}, by=by
        )
        await self.jobs.step(
            job.id,
            PREREQUISITES,
            StepState.SUCCEEDED,
            message="VM, pair, disks and networks checked",
        )
        self.spawn(self.run(job))
        return await self.jobs.get(job.id)

    def _protect_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def noop(step: StepRun) -> str:
            return "checked"

        async def place(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if rel.replica_server:
                return f"{rel.replica_server} (chosen before)"
            placement = await self.read(lambda tx: _place(tx, rel))
            await self.write(
                lambda tx: tx.update_relationship(
                    rel_id,
                    self.clock.now(),
                    replica_server=placement.server.id,
                    replica_folder=placement.folder,
                )
            )
            return f"{placement.server.name}: {placement.reason}"

        async def create_replica(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            result = await step.send(rel.replica_server, self._configure_replica_cmd(rel))
            committed = int(result.get("committed_sequence", 0))
            if not rel.replica_folder and result.get("folder"):
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), replica_folder=str(result["folder"])
                    )
                )
            if committed:
                # An existing replica of this VM was found and adopted: resync instead of copying.
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), state=RelationshipState.RESYNCHRONIZING
                    )
                )
                return (
                    f"existing replica adopted at sequence {committed}; a checksum resync follows"
                )
            return f"replica folder {result.get('folder', '')}"

        async def enable_source(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            # `clouds policy` leaves VMs still being enabled to this job: if the policy changed
            # since the replica host got its grant, it gets the current one before the primary.
            grant = self._configure_replica_cmd(rel)
            if await self._grant_outdated(step.job, CREATE_REPLICA, grant.configure_replica):
                await step.send(rel.replica_server, grant)
            await step.send(rel.primary_server, await self._configure_source_cmd(rel))
            if rel.state == RelationshipState.ENABLING:
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), state=RelationshipState.INITIAL_REPLICATION
                    )
                )
            return "replication configured"

        async def initial(step: StepRun) -> str:
            return await self._wait_initial(step, rel_id)

        async def finalize(step: StepRun) -> str:
            await self.write(
                lambda tx: tx.update_relationship(
                    rel_id, self.clock.now(), state=RelationshipState.PROTECTED
                )
            )
            await self.evaluate_health()  # no stale "initial replication pending" shown
            return "protected"

        return [
            Step(PREREQUISITES, noop),
            Step("Choose the replica host", place),
            Step(CREATE_REPLICA, create_replica),
            Step("Enable replication on the primary host", enable_source),
            Step("Initial replication", initial),
            Step("Finalize protection", finalize),
        ]

    async def _grant_outdated(
        self, job: Job, step: str, current: control_pb2.ConfigureReplica
    ) -> bool:
        """True when the grant a job step sent differs from ``current`` in what both sides of
        a cycle must agree on (authentication, recovery points)."""
        sent = [
            c
            for c in await self.read(lambda tx: tx.commands_for_job(job.id))
            if c.job_step_name == step and c.kind == "configure_replica"
        ]
        if not sent:
            return False
        before = control_pb2.Command()
        before.ParseFromString(sent[-1].payload)
        old = before.configure_replica
        return (old.auth, old.recovery_points) != (current.auth, current.recovery_points)

    async def _finish_failed_protect(self, job: Job, failed: JobStep) -> None:
        undone = await self.undo(
            StepRun(self, job, failed.name, failed.index),
            self._undo_protect,
            f"{failed.name}: {failed.message}",
        )
        await self.jobs.fail(job.id, undone)

    async def _undo_protect(self, step: StepRun) -> str:
        """A failed enable-protection job leaves nothing behind on the hosts: the primary stops
        replicating (if it was told to start) and the replica host drops its grant (if it got
        one), deleting what was copied unless the replica was adopted from an earlier
        relationship (then it is kept, for the next attempt to adopt again). The relationship
        is disabled, so the VM can be protected again."""
        job = step.job
        rel_id = json.loads(job.params_json)["relationship"]
        rel = await self.read(lambda tx: tx.get_relationship(rel_id))
        if rel is None:
            return ""
        sent = {c.kind for c in await self.read(lambda tx: tx.commands_for_job(job.id))}
        replica_vm = json.loads(rel.replica_vm_json or "{}")
        adopted = bool(replica_vm.get("adopt"))
        undone = []
        if "configure_source" in sent and rel.primary_server:
            undone.append(
                await self._undo_on(
                    step,
                    rel.primary_server,
                    control_pb2.RemoveRelationship(relationship_id=rel_id),
                    "replication stopped on",
                )
            )
        if "configure_replica" in sent and rel.replica_server:
            undone.append(
                await self._undo_on(
                    step,
                    rel.replica_server,
                    control_pb2.RemoveRelationship(
                        relationship_id=rel_id, delete_replica=not adopted
                    ),
                    "the earlier replica kept, the grant removed on"
                    if adopted
                    else "grant and partial replica removed on",
                )
            )
        now = self.clock.now()
        replica_vm["replica_kept"] = adopted
        await self.write(
            lambda tx: tx.update_relationship(
                rel_id,
                now,
                state=RelationshipState.DISABLED,
                disabled_at=now,
                replica_vm_json=json.dumps(replica_vm),
            )
        )
        self.history.forget(rel_id)
        log.warning(
            "enable protection failed and was rolled back",
            extra={"fields": {"job": job.id, "relationship": rel_id, "undone": undone}},
        )
        return "rolled back: " + (
            "; ".join(undone) if undone else "nothing was set up on the hosts"
        )

    async def _undo_on(
        self, step: StepRun, server_id: str, body: control_pb2.RemoveRelationship, done: str
    ) -> str:
        """Send a rollback command and wait a little for it; a host that is offline (or slow)
        gets it when it reconnects, and the job does not wait for that."""
        server = await self.read(lambda tx: tx.get_server(server_id))
        name = server.name if server is not None else server_id
        if server is None or server.removed_at is not None:
            return f"{name} was removed from the vault (nothing to undo there)"
        cmd = await step.submit(server_id, control_pb2.Command(remove_relationship=body))
        if self.sessions.get(server_id) is None:
            return f"{name} is offline: it gets the removal when it reconnects"
        try:
            outcome = await asyncio.wait_for(self.dispatcher.wait(cmd.id), UNDO_WAIT)
        except TimeoutError:
            return f"{name} has not answered the removal yet (it stays queued)"
        if outcome.state != CommandState.SUCCEEDED:
            return f"{name} refused the removal: {outcome.error or outcome.state.value}"
        return f"{done} {name}"

    async def _wait_initial(self, step: StepRun, rel_id: str) -> str:
        """Wait for the replica to hold sequence 1, showing progress from the primary's report."""
        sent_import = False
        while True:
            rel = await self.relationship(rel_id)
            replica = json.loads(rel.replica_status_json or "{}")
            primary = json.loads(rel.primary_status_json or "{}")
            committed = int(replica.get("committed_sequence", 0))
            if committed >= 1 and rel.state != RelationshipState.RESYNCHRONIZING:
                return f"replica at sequence {committed}"
            if (
                rel.state == RelationshipState.RESYNCHRONIZING
                and primary.get("state") == "protected"
                and committed
            ):
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), state=RelationshipState.INITIAL_REPLICATION
                    )
                )
                return f"resynchronized at sequence {committed}"
            policy = Policy.from_json(rel.policy_json)
            if (
                policy.initial_method == "offline"
                and primary.get("state") == "waiting-for-import"
                and not sent_import
            ):
                await step.send(
                    rel.replica_server,
                    control_pb2.Command(
                        replication_action=control_pb2.ReplicationAction(
                            relationship_id=rel_id,
                            action=control_pb2.ReplicationAction.IMPORT,
                            path=policy.import_path,
                        )
                    ),
                )
                sent_import = True
            done, total = (
                int(primary.get("progress_done", 0)),
                int(primary.get("progress_total", 0)),
            )
            message = primary.get("state", "waiting for the first report")
            if primary.get("last_error"):
                message += f"; last error: {primary['last_error']}"
            await step.progress(message, done=done, total=total)
            async with self._reported:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reported.wait(), timeout=2.0)

    async def wait_first_cycle(self, step: StepRun, rel_id: str) -> str:
        """Wait for the primary to report a committed cycle (after reverse replication)."""
        while True:
            rel = await self.relationship(rel_id)
            primary = json.loads(rel.primary_status_json or "{}")
            if primary.get("state") == "protected" and int(primary.get("cycles_succeeded", 0)) >= 1:
                return f"replica at sequence {primary.get('committed_sequence')}"
            done, total = (
                int(primary.get("progress_done", 0)),
                int(primary.get("progress_total", 0)),
            )
            message = primary.get("state", "waiting for the first report")
            if primary.get("last_error"):
                message += f"; last error: {primary['last_error']}"
            await step.progress(message, done=done, total=total)
            async with self._reported:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reported.wait(), timeout=2.0)

    # -- disable, pause, resume, resync, verify --------------------------------------------
    async def disable(self, ref: str, *, by: str, delete_replica: bool | None = None) -> Job:
        rel = await self.read(lambda tx: tx.find_relationship(ref))
        if rel.disabled_at is not None:
            raise FailedPrecondition(f"protection of {rel.vm_name} is already disabled")
        policy = Policy.from_json(rel.policy_json)
        delete = policy.delete_replica_on_disable if delete_replica is None else delete_replica
        return await self.start_job(
            "disable-protection",
            f"vm/{rel.vm_name}",
            {"relationship": rel.id, "delete_replica": delete},
            by=by,
        )

    def _disable_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, delete = params["relationship"], bool(params["delete_replica"])

        async def stop_primary(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if not rel.primary_server or await self.server_gone(rel.primary_server):
                return "the primary host is gone; nothing to stop"
            await step.send(
                rel.primary_server,
                control_pb2.Command(
                    remove_relationship=control_pb2.RemoveRelationship(relationship_id=rel_id)
                ),
            )
            return "stopped"

        async def handle_replica(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if not rel.replica_server or await self.server_gone(rel.replica_server):
                return "the replica host is gone"
            result = await step.send(
                rel.replica_server,
                control_pb2.Command(
                    remove_relationship=control_pb2.RemoveRelationship(
                        relationship_id=rel_id, delete_replica=delete
                    )
                ),
            )
            return ", ".join(result.get("removed", [])) or "nothing to remove"

        async def mark(step: StepRun) -> str:
            now = self.clock.now()
            rel = await self.relationship(rel_id)
            replica_vm = json.loads(rel.replica_vm_json)
            replica_vm["replica_kept"] = not delete
            await self.write(
                lambda tx: tx.update_relationship(
                    rel_id,
                    now,
                    state=RelationshipState.DISABLED,
                    disabled_at=now,
                    replica_vm_json=json.dumps(replica_vm),
                )
            )
            self.history.forget(rel_id)
            return "disabled"

        return [
            Step("Stop replication on the primary host", stop_primary),
            Step(
                "Delete the replica" if delete else "Keep the replica, stop accepting cycles",
                handle_replica,
            ),
            Step("Disable protection", mark),
        ]

    async def action(self, ref: str, action: str, *, by: str, repair: bool = True) -> Job:
        if action not in _ACTIONS:
            raise InvalidArgument(f"unknown replication action {action!r}")
        rel = await self.read(lambda tx: tx.find_relationship(ref))
        if rel.disabled_at is not None:
            raise FailedPrecondition(f"protection of {rel.vm_name} is disabled")
        if rel.state in (RelationshipState.ENABLING,):
            raise FailedPrecondition(f"protection of {rel.vm_name} is still being enabled")
        return await self.start_job(
            "replication-action",
            f"vm/{rel.vm_name}",
            {"relationship": rel.id, "action": action, "repair": repair},
            by=by,
        )

    def _action_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, action = params["relationship"], params["action"]
        code = _ACTIONS[action]

        async def run(step: StepRun) -> str:
            job = step.job
            rel = await self.relationship(rel_id)
            if action == "resync":
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), state=RelationshipState.RESYNCHRONIZING
                    )
                )
            result = await step.send(
                rel.primary_server,
                control_pb2.Command(
                    replication_action=control_pb2.ReplicationAction(
                        relationship_id=rel_id, action=code, repair=bool(params.get("repair", True))
                    )
                ),
            )
            changes: dict[str, Any] = {}
            if action in ("pause", "resume"):
                changes["paused"] = action == "pause"
            if action == "resync":
                changes["state"] = RelationshipState.PROTECTED
            if changes:
                await self.write(
                    lambda tx: tx.update_relationship(rel_id, self.clock.now(), **changes)
                )
            await self.jobs.set_state(job.id, JobState.RUNNING, result=result)
            if action == "verify":
                await self._record_verification(rel_id, job, result)
                return f"{result.get('mismatched_bytes', 0)} mismatching bytes" + (
                    " repaired" if result.get("repaired") else ""
                )
            return json.dumps(result, sort_keys=True)

        # The VM's name as the job's target has it (``vm/NAME``), as when the job was created.
        return [Step(f"{action} replication of {target.removeprefix('vm/')}", run)]

    async def _record_verification(self, rel_id: str, job: Job, result: dict[str, Any]) -> None:
        """Keep the outcome of a verification on the relationship (health, schedule, `vms show`)."""
        now = self.clock.now()

        def update(tx: Tx) -> None:
            rel = tx.get_relationship(rel_id)
            if rel is None:
                return
            doc = json.loads(rel.verify_json or "{}")
            doc.update(
                at=now,
                job=job.id,
                by=job.created_by,
                sequence=int(result.get("sequence", 0)),
                mismatched_bytes=int(result.get("mismatched_bytes", 0)),
                repaired=bool(result.get("repaired", False)),
            )
            tx.update_relationship(rel_id, now, verify_json=json.dumps(doc, sort_keys=True))

        await self.write(update)
        await self.evaluate_health()

    # -- a replica host that moved ---------------------------------------------------------
    async def on_replica_address_changed(self, server_id: str) -> list[Job]:
        """A replica host reconnected listening somewhere else (a new advertised name or port):
        tell the primary of each VM it holds, or cycles would keep dialing the old address."""
        rels = await self.read(lambda tx: tx.list_relationships())
        started = []
        for rel in rels:
            if rel.replica_server != server_id or rel.state not in _REPLICATING:
                continue
            job = await self.start_job(
                "update-replica-address",
                f"vm/{rel.vm_name}",
                {"relationship": rel.id},
                by="broker",
            )
            started.append(job)
        return started

    def _readdress_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def tell(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if rel.state not in _REPLICATING:
                return f"nothing to do: the relationship is {rel.state.value}"
            cmd = await self._configure_source_cmd(rel)
            await step.send(rel.primary_server, cmd)
            return f"replicating to {cmd.configure_source.address}"

        return [Step("Give the primary host the replica host's new address", tell)]

    # -- reports and health -----------------------------------------------------------------
    async def on_report(self, server_id: str, report: control_pb2.ReplicationReport) -> None:
        """Take the statuses a host reports, for the relationships it is party to only.

        A status counts only from the host that holds that role in the relationship (primary
        status from the primary host, replica status from the replica host): another host's
        word about a relationship costs nothing (no history, no store write) and is logged at
        most once a minute. Free-form fields are cut to size before they are stored.
        """
        now = self.clock.now()
        mine: dict[str, Relationship] = await self.read(
            lambda tx: {r.id: r for r in tx.relationships_of_server(server_id)}
        )
        statuses = report.relationships
        kept: dict[tuple[str, str], control_pb2.RelationshipStatus] = {}
        refused = max(0, len(statuses) - MAX_STATUSES_PER_REPORT)
        example = ""
        for status in statuses[:MAX_STATUSES_PER_REPORT]:
            rel = mine.get(status.relationship_id)
            if rel is None or _role_of(rel, server_id) != status.role:
                refused += 1
                example = example or status.relationship_id
                continue
            kept[(status.relationship_id, status.role)] = status  # the last one of each
        if refused:
            self._note_refused(server_id, refused, example)
        if not kept:
            return
        docs = [(st, _status_doc(st, now)) for st in kept.values()]

        def update(tx: Tx) -> list[control_pb2.RelationshipStatus]:
            taken = []
            for st, d in docs:
                rel = tx.get_relationship(st.relationship_id)  # again: it may have changed
                if (
                    rel is None
                    or rel.disabled_at is not None
                    or _role_of(rel, server_id) != st.role
                ):
                    continue
                fields: dict[str, Any] = {}
                if st.role == "primary":
                    fields["primary_status_json"] = json.dumps(d, sort_keys=True)
                    if st.state == "resynchronizing" and rel.state == RelationshipState.PROTECTED:
                        fields["state"] = RelationshipState.RESYNCHRONIZING
                    elif st.state == "protected" and rel.state in (
                        RelationshipState.RESYNCHRONIZING,
                        RelationshipState.RESYNC_REQUIRED,
                    ):
                        fields["state"] = RelationshipState.PROTECTED
                else:
                    fields["replica_status_json"] = json.dumps(d, sort_keys=True)
                tx.update_relationship(rel.id, now, **fields)
                taken.append(st)
            return taken

        taken: list[control_pb2.RelationshipStatus] = await self.write(update)
        for status in taken:
            if status.role == "primary":
                self.history.add(
                    status.relationship_id,
                    now,
                    status.cycles_succeeded,
                    status.cycles_missed,
                    status.cycles_failed,
                )
        async with self._reported:
            self._reported.notify_all()

    def _note_refused(self, server_id: str, count: int, example: str) -> None:
        """One log line a minute at most for statuses refused (a confused or hostile host)."""
        self._refused_count += count
        at = self.clock.monotonic()
        if self._refused_logged_at is not None and at - self._refused_logged_at < 60.0:
            return
        log.warning(
            "replication statuses refused: the reporting host does not hold that role in "
            "those relationships (or sent too many)",
            extra={
                "fields": {
                    "server": server_id[:64],
                    "refused": self._refused_count,
                    "example": example[:64],
                }
            },
        )
        self._refused_logged_at = at
        self._refused_count = 0

    async def evaluate_health(self) -> list[tuple[str, str]]:
        """Recompute and store every active relationship's health; returns (id, health)."""
        now = self.clock.now()

        def run(tx: Tx) -> list[tuple[str, str]]:
            out = []
            for rel in tx.list_relationships():
                health, reasons = evaluate(
                    rel,
                    primary=tx.get_server(rel.primary_server) if rel.primary_server else None,
                    replica=tx.get_server(rel.replica_server) if rel.replica_server else None,
                    now=now,
                    config=self.health_config,
                    history=self.history,
                    agent_lifetime=self.agent_lifetime,
                )
                reasons_json = json.dumps([r.as_dict() for r in reasons], sort_keys=True)
                if health != rel.health or reasons_json != rel.health_reasons_json:
                    tx.update_relationship(
                        rel.id, now, health=health, health_reasons_json=reasons_json
                    )
                    if health != rel.health:
                        log.warning(
                            "replication health changed",
                            extra={
                                "fields": {
                                    "vm": rel.vm_name,
                                    "from": rel.health,
                                    "to": health,
                                    "reasons": [r.code for r in reasons],
                                }
                            },
                        )
                out.append((rel.id, health))
            return out

        out: list[tuple[str, str]] = await self.write(run)
        # Relationships disabled or deleted since (by this broker or another) leave no samples.
        self.history.retain(rel_id for rel_id, _ in out)
        return out

    async def run_health(self, interval: float, *, leader: Leader | None = None) -> None:
        """Evaluate health every ``interval``; with several brokers, on the leader only."""
        while True:
            if leader is None or leader.is_leader:
                try:
                    await self.evaluate_health()
                except SitepairError:
                    log.exception("health evaluation failed")
            await asyncio.sleep(interval)

    # -- tickets ----------------------------------------------------------------------------
    def issue_ticket(self, rel: Relationship) -> str:
        return tickets.issue(
            self.ticket_key,
            source_host=rel.primary_server,
            replica_host=rel.replica_server,
            relationship=rel.id,
            vm=rel.vm_id,
            epoch=rel.epoch,
            now=self.clock.now(),
        )

    # -- commands for agents ----------------------------------------------------------------
    def _configure_replica_cmd(self, rel: Relationship) -> control_pb2.Command:
        """The replica host's grant: from which host, how authenticated, and the VM's disks as
        the broker's inventory knows them (the only disk ids its cycles may name)."""
        policy = Policy.from_json(rel.policy_json)
        replica_vm = json.loads(rel.replica_vm_json or "{}")
        return control_pb2.Command(
            configure_replica=control_pb2.ConfigureReplica(
                relationship_id=rel.id,
                vm_id=rel.vm_id,
                vm_name=rel.vm_name,
                source_host=rel.primary_server,
                epoch=rel.epoch,
                folder=rel.replica_folder,
                auth=policy.authentication,
                ticket_public_key=tickets.public_key_bytes(self.ticket_key),
                recovery_points=policy.recovery_points,
                point_interval_seconds=3600,
                adopt=bool(replica_vm.get("adopt")),
                disks=granted_disks(replica_vm),
            )
        )

    async def _configure_source_cmd(self, rel: Relationship) -> control_pb2.Command:
        policy = Policy.from_json(rel.policy_json)
        replica = await self.read(lambda tx: tx.get_server(rel.replica_server))
        if replica is None:
            raise StepFailed(f"the replica host {rel.replica_server} is not registered")
        host, certificate_port, ticket_port = replication_endpoint(replica.facts_json)
        port = certificate_port if policy.authentication == "certificate" else ticket_port
        if policy.port and port != policy.port and port:
            log.info(
                "replica host listens on another port than the policy's",
                extra={"fields": {"host": replica.name, "policy_port": policy.port, "port": port}},
            )
        if not port:
            raise StepFailed(
                f"{replica.name} reports no {policy.authentication} replication listener"
            )
        method = {
            "network": control_pb2.InitialReplication.NETWORK,
            "scheduled": control_pb2.InitialReplication.SCHEDULED,
            "offline": control_pb2.InitialReplication.OFFLINE,
        }[policy.initial_method]
        return control_pb2.Command(
            configure_source=control_pb2.ConfigureSource(
                relationship_id=rel.id,
                vm_id=rel.vm_id,
                replica_host=rel.replica_server,
                address=f"{host}:{port}",
                epoch=rel.epoch,
                auth=policy.authentication,
                compression=policy.compression,
                copy_frequency_seconds=policy.copy_frequency,
                app_consistent_interval_seconds=policy.app_consistent_hours * 3600,
                bandwidth_limit=policy.bandwidth_limit,
                initial=control_pb2.InitialReplication(
                    method=method,
                    start_at=timestamp(policy.initial_at) if policy.initial_at else None,
                    export_path=policy.export_path,
                ),
                resync_first=bool(json.loads(rel.replica_vm_json).get("adopt")),
            )
        )

    async def resume(self, job: Job) -> bool:
        failed = next((s for s in job.steps if s.state == StepState.FAILED), None)
        if job.kind == "enable-protection" and failed is not None:
            # The broker stopped while rolling a failed job back: finish the rollback.
            self.spawn(self._finish_failed_protect(job, failed))
            return True
        return await super().resume(job)


#: The names of job steps looked up by name elsewhere than in their job's declaration.
PREREQUISITES = "Prerequisites check for enabling protection"
CREATE_REPLICA = "Create the replica VM"
APPLY_POLICY = "apply the policy to protected VMs"

_ACTIONS = {
    "pause": control_pb2.ReplicationAction.PAUSE,
    "resume": control_pb2.ReplicationAction.RESUME,
    "resync": control_pb2.ReplicationAction.RESYNC,
    "verify": control_pb2.ReplicationAction.VERIFY,
    "cycle": control_pb2.ReplicationAction.RUN_CYCLE,
}

#: States in which the primary replicates to the replica (a test failover leaves it running).
_REPLICATING = (
    RelationshipState.INITIAL_REPLICATION,
    RelationshipState.PROTECTED,
    RelationshipState.RESYNC_REQUIRED,
    RelationshipState.RESYNCHRONIZING,
    RelationshipState.FAILED_OVER_TEST,
)


def replication_endpoint(facts_json: str) -> tuple[str, int, int]:
    """Where a host's receivers listen, from its facts: (host, certificate port, ticket port)."""
    facts = json.loads(facts_json or "{}")
    return (
        str(facts.get("replicationHost") or "127.0.0.1"),
        int(facts.get("certificatePort", 0)),
        int(facts.get("ticketPort", 0)),
    )


def granted_disks(replica_vm: dict[str, Any]) -> list[control_pb2.GrantedDisk]:
    """The disks a replica host accepts for a VM, from the VM's inventory at protection."""
    return [
        control_pb2.GrantedDisk(
            disk_id=str(d["id"]),
            virtual_size=int(d.get("virtual_size") or 0),
            format=str(d.get("format") or ""),
        )
        for d in replica_vm.get("disks", [])
    ]


def _role_of(rel: Relationship, server_id: str) -> str:
    """The role ``server_id`` holds in ``rel`` ("primary", "replica" or "")."""
    if rel.primary_server == server_id:
        return "primary"
    if rel.replica_server == server_id:
        return "replica"
    return ""


def _status_doc(status: control_pb2.RelationshipStatus, now: float) -> dict[str, Any]:
    """A reported status as stored: free-form text cut to size, recovery points bounded."""
    st = control_pb2.RelationshipStatus()
    st.CopyFrom(status)
    for name, limit in STATUS_TEXT_LIMITS.items():
        value = getattr(st, name)
        if len(value) > limit:
            setattr(st, name, value[:limit])
    if len(st.points) > MAX_STATUS_POINTS:
        del st.points[: len(st.points) - MAX_STATUS_POINTS]  # keep the newest
    doc = json_format.MessageToDict(st, preserving_proto_field_name=True)
    doc["last_success_at"] = st.last_success_at.seconds + st.last_success_at.nanos / 1e9
    doc["reported_at"] = now
    return doc


def _active_on(tx: Tx, server_id: str) -> bool:
    return bool(tx.relationships_of_server(server_id))


def _find_vm(tx: Tx, ref: str) -> tuple[InventoryVm, Server]:
    vms = tx.find_vms(ref)
    if not vms:
        raise NotFound(
            f"no VM {ref!r} in the inventory",
            hint="see `vms list`; refresh a host with `servers refresh`",
        )
    if len(vms) > 1:
        hosts = ", ".join(v.server_id for v in vms)
        raise FailedPrecondition(f"{ref!r} names VMs on several hosts ({hosts}); use the VM id")
    vm = vms[0]
    server = tx.get_server(vm.server_id)
    if server is None or server.removed_at is not None:
        raise FailedPrecondition(f"VM {vm.name} is on a host that was removed")
    return vm, server


def replica_folder(storage_path: str, vm_name: str, rel_id: str) -> str:
    """``<storage path>/<slug of the VM name>-<relationship id>`` on the replica host.

    The VM name comes from the primary host's inventory, so it never becomes a path as it is:
    :func:`sitepair.paths.slug` makes one safe component of it, the relationship id (ours) makes
    it unique, and the result is proved to lie directly inside the storage path. The storage
    path is the replica host's own (POSIX, or Windows with a drive letter); it must be absolute.
    """
    name = paths.check_component(f"{paths.slug(vm_name)}-{rel_id}", "replica folder name")
    windows = "\\" in storage_path or PureWindowsPath(storage_path).drive != ""
    if windows:
        root = PureWindowsPath(storage_path)
        folder = root / name
        if not root.is_absolute() or ".." in root.parts or folder.parent != root:
            raise InvalidArgument(
                f"storage path {storage_path[:200]!r} is not an absolute folder",
                hint="the replica host must report its storage classifications' full paths",
            )
        return str(folder)
    if not PurePosixPath(storage_path).is_absolute():
        raise InvalidArgument(
            f"storage path {storage_path[:200]!r} is not an absolute folder",
            hint="the replica host must report its storage classifications' full paths",
        )
    root_path = Path(os.path.normpath(storage_path))
    folder_path = paths.check_inside(root_path, root_path / name, "replica folder")
    if folder_path.name != name:
        raise InvalidArgument(f"replica folder {name} would not lie in {storage_path[:200]!r}")
    return str(root_path / name)


def _place(tx: Tx, rel: Relationship) -> Placement:
    """Choose the replica host: mapped storage with room, memory headroom, fewest replicas."""
    replica_vm = json.loads(rel.replica_vm_json)
    disks = replica_vm["disks"]
    need = sum(int(d.get("file_size") or d["virtual_size"]) for d in disks) + PLACEMENT_MARGIN
    storage_map = {m.source: m.target for m in tx.list_mappings("storage")}
    classes = {d.get("storage_class", "") for d in disks}
    target_class = ""
    for c in classes:
        if c and c in storage_map:
            target_class = storage_map[c]
    candidates = []
    refusals = []
    for server_id in tx.cloud_hosts(rel.recovery_cloud):
        server = tx.get_server(server_id)
        if server is None or server.removed_at is not None:
            continue
        metrics = json.loads(server.metrics_json or "{}")
        facts = json.loads(server.facts_json or "{}")
        if target_class:
            match = [s for s in tx.host_storage(server_id) if s.name == target_class]
            if not match:
                refusals.append(f"{server.name} has no storage classification {target_class}")
                continue
            free = match[0].free_bytes
            try:
                folder = replica_folder(match[0].path, rel.vm_name, rel.id)
            except InvalidArgument as exc:
                refusals.append(f"{server.name}: {exc.message}")
                continue
        else:
            volumes = metrics.get("volumes") or []
            free = max((int(v.get("freeBytes", 0)) for v in volumes), default=0)
            folder = ""
        if free < need:
            refusals.append(
                f"{server.name} has {free >> 20} MiB free, the disks need {need >> 20} MiB"
            )
            continue
        memory = int(facts.get("memoryTotalBytes", 0))
        committed = sum(
            json.loads(r.replica_vm_json).get("memory_mb", 0) << 20
            for r in tx.relationships_of_server(server_id)
            if r.replica_server == server_id
        )
        if memory and committed + (int(replica_vm["memory_mb"]) << 20) > memory:
            refusals.append(
                f"{server.name} lacks memory for another {replica_vm['memory_mb']} MiB replica VM"
            )
            continue
        replicas = sum(
            1 for r in tx.relationships_of_server(server_id) if r.replica_server == server_id
        )
        candidates.append((replicas, -free, server.name, server, folder))
    if not candidates:
        detail = "; ".join(refusals) if refusals else f"cloud {rel.recovery_cloud} has no hosts"
        raise StepFailed(f"no host in {rel.recovery_cloud} can hold the replica: {detail}")
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    replicas, neg_free, _, server, folder = candidates[0]
    where = f"storage {target_class}" if target_class else "the host's default replica location"
    return Placement(
        server, folder, f"{replicas} replica(s) there, {(-neg_free) >> 30} GiB free in {where}"
    )
