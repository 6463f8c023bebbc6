"""Protection of VMs: enable, disable, replication actions, and a replica host that moved.

Protecting a VM (``vms protect``) is a job: the broker checks the VM, its cloud's pair and its
disks, chooses the replica host (:mod:`broker.placement`), has the replica host accept the VM
and the primary replicate to it (:mod:`broker.agent_commands`), and follows the initial
replication through the hosts' reports (:mod:`broker.reports`). A failed enable leaves nothing
behind on the hosts. Disabling protection, the replication actions (pause, resume, resync,
verify, run a cycle) and telling a primary its replica host's new address are jobs too. Every
command step is idempotent and a job interrupted by a broker restart carries on from its first
unfinished step (:mod:`broker.orchestration`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from typing import Any

from broker import placement, vm_hosts
from broker.agent_commands import REPLICATING, AgentCommands
from broker.documents import (
    ProtectedVm,
    State,
    Verification,
    progress_message,
    status_of,
)
from broker.orchestration import Orchestration, Orchestrator, Step, StepRun
from broker.policy import Policy
from broker.reports import ReplicationReports
from broker.store.models import (
    CommandState,
    Job,
    JobState,
    JobStep,
    Relationship,
    RelationshipState,
    StepState,
)
from broker.store.sqlite import Tx
from sitepair import paths
from sitepair.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from sitepair.v1 import control_pb2, replication_pb2

log = logging.getLogger("sitepair.broker.protection")

SUPPORTED_FORMATS = ("vhd", "vhdx")
#: How long a failed job waits for a host to confirm a rollback command (it stays queued).
UNDO_WAIT = 30.0


class ProtectionManager(Orchestrator):
    def __init__(
        self,
        orchestration: Orchestration,
        *,
        commands: AgentCommands,
        reports: ReplicationReports,
    ) -> None:
        super().__init__(orchestration)
        self._commands = commands
        self._reports = reports
        self.declare("enable-protection", self._protect_steps, on_failure=self._undo_protect)
        self.declare("disable-protection", self._disable_steps)
        self.declare("replication-action", self._action_steps)
        self.declare("update-replica-address", self._readdress_steps)

    # -- enable protection ------------------------------------------------------------------
    async def protect(
        self, vm_ref: str, *, by: str, accept_no_network: bool = False, server_ref: str = ""
    ) -> Job:
        now = self.clock.now()

        def prepare(tx: Tx) -> Relationship:
            vm, server = vm_hosts.find_vm(tx, vm_ref, server_ref)
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
                and ProtectedVm.decode(r.replica_vm_json).replica_kept
            ]
            adopt_from = max(earlier, key=lambda r: r.disabled_at or 0.0) if earlier else None
            replica_vm = ProtectedVm.from_inventory(
                vm, net_map=net_map, adopt=adopt_from is not None
            )
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
                replica_vm_json=replica_vm.encode(),
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
            chosen = await self.read(lambda tx: placement.place(tx, rel))
            await self.write(
                lambda tx: tx.update_relationship(
                    rel_id,
                    self.clock.now(),
                    replica_server=chosen.server.id,
                    replica_folder=chosen.folder,
                )
            )
            return f"{chosen.server.name}: {chosen.reason}"

        async def create_replica(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            sent = await step.send(rel.replica_server, self._commands.configure_replica(rel))
            result = sent.configure_replica
            committed = result.committed_sequence
            if not rel.replica_folder and result.folder:
                await self.write(
                    lambda tx: tx.update_relationship(
                        rel_id, self.clock.now(), replica_folder=result.folder
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
            return f"replica folder {result.folder}"

        async def enable_source(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            # `clouds policy` leaves VMs still being enabled to this job: if the policy changed
            # since the replica host got its grant, it gets the current one before the primary.
            grant = self._commands.configure_replica(rel)
            if await self._grant_outdated(step.job, CREATE_REPLICA, grant.configure_replica):
                await step.send(rel.replica_server, grant)
            await step.send(rel.primary_server, await self._commands.configure_source(rel))
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
            await self._reports.evaluate_health()  # no stale "initial replication pending" shown
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
        replica_vm = ProtectedVm.decode(rel.replica_vm_json)
        adopted = replica_vm.adopt
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
        kept = dataclasses.replace(replica_vm, replica_kept=adopted)
        await self.write(
            lambda tx: tx.update_relationship(
                rel_id,
                now,
                state=RelationshipState.DISABLED,
                disabled_at=now,
                replica_vm_json=kept.encode(),
            )
        )
        self._reports.forget(rel_id)
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
            replica = status_of(rel.replica_status_json)
            primary = status_of(rel.primary_status_json)
            committed = replica.committed_sequence
            if committed >= 1 and rel.state != RelationshipState.RESYNCHRONIZING:
                return f"replica at sequence {committed}"
            if (
                rel.state == RelationshipState.RESYNCHRONIZING
                and primary.state == State.STATE_PROTECTED
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
                and primary.state == State.STATE_WAITING_FOR_IMPORT
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
            await step.progress(
                progress_message(primary), done=primary.progress_done, total=primary.progress_total
            )
            await self._reports.next_report(2.0)

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
            return ", ".join(result.remove_relationship.removed) or "nothing to remove"

        async def mark(step: StepRun) -> str:
            now = self.clock.now()
            rel = await self.relationship(rel_id)
            replica_vm = dataclasses.replace(
                ProtectedVm.decode(rel.replica_vm_json), replica_kept=not delete
            )
            await self.write(
                lambda tx: tx.update_relationship(
                    rel_id,
                    now,
                    state=RelationshipState.DISABLED,
                    disabled_at=now,
                    replica_vm_json=replica_vm.encode(),
                )
            )
            self._reports.forget(rel_id)
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
            done = result.replication_action
            outcome = _action_outcome(action, done)
            await self.jobs.set_state(job.id, JobState.RUNNING, result=outcome)
            if action == "verify":
                await self._record_verification(rel_id, job, done)
                return f"{done.mismatched_bytes} mismatching bytes" + (
                    " repaired" if done.repaired else ""
                )
            return json.dumps(outcome, sort_keys=True)

        # The VM's name as the job's target has it (``vm/NAME``), as when the job was created.
        return [Step(f"{action} replication of {target.removeprefix('vm/')}", run)]

    async def _record_verification(
        self, rel_id: str, job: Job, result: control_pb2.ReplicationActionResult
    ) -> None:
        """Keep the outcome of a verification on the relationship (health, schedule, `vms show`)."""
        now = self.clock.now()

        def update(tx: Tx) -> None:
            rel = tx.get_relationship(rel_id)
            if rel is None:
                return
            done = Verification(
                at=now,
                job_id=job.id,
                by=job.created_by,
                sequence=result.sequence,
                mismatched_bytes=result.mismatched_bytes,
                repaired=result.repaired,
                attempted_at=Verification.decode(rel.verify_json).attempted_at,
            )
            tx.update_relationship(rel_id, now, verify_json=done.encode())

        await self.write(update)
        await self._reports.evaluate_health()

    # -- a replica host that moved ---------------------------------------------------------
    async def on_replica_address_changed(self, server_id: str) -> list[Job]:
        """A replica host reconnected listening somewhere else (a new advertised name or port):
        tell the primary of each VM it holds, or cycles would keep dialing the old address."""
        rels = await self.read(lambda tx: tx.list_relationships())
        started = []
        for rel in rels:
            if rel.replica_server != server_id or rel.state not in REPLICATING:
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
            if rel.state not in REPLICATING:
                return f"nothing to do: the relationship is {rel.state.value}"
            cmd = await self._commands.configure_source(rel)
            await step.send(rel.primary_server, cmd)
            return f"replicating to {cmd.configure_source.address}"

        return [Step("Give the primary host the replica host's new address", tell)]

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

_ACTIONS = {
    "pause": control_pb2.ReplicationAction.PAUSE,
    "resume": control_pb2.ReplicationAction.RESUME,
    "resync": control_pb2.ReplicationAction.RESYNC,
    "verify": control_pb2.ReplicationAction.VERIFY,
    "cycle": control_pb2.ReplicationAction.RUN_CYCLE,
}


def _action_outcome(action: str, done: control_pb2.ReplicationActionResult) -> dict[str, Any]:
    """What a replication action's job keeps as its result (``jobs show``)."""
    outcome: dict[str, Any] = {"relationship": done.relationship_id}
    if action in ("pause", "resume"):
        outcome["paused"] = done.paused
    elif action == "verify":
        outcome.update(
            sequence=done.sequence,
            mismatched_bytes=done.mismatched_bytes,
            repaired=done.repaired,
            mismatches={
                r.disk_id: [[o, n] for o, n in zip(r.offsets, r.lengths, strict=True)]
                for r in done.mismatches
            },
        )
    else:
        outcome.update(
            sequence=done.sequence,
            bytes=done.bytes,
            kind=replication_pb2.CycleKind.Name(done.kind) if done.sequence else "",
        )
    return outcome
