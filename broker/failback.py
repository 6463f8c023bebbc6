"""After a failover: commit it, cancel it, or replicate back (reverse replication).

Committing makes the failed-over VM's recovery point final (the others are discarded);
cancelling removes the failed-over VM, restarts the VM on the original primary and replicates
as before, at the raised epoch; reversing makes the old primary the replica of the new one,
keeping its VM's disks, so a checksum resync sends only the blocks that differ. A planned
failover can reverse in the same job (:meth:`commit_step`, :meth:`reverse_steps`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from broker.agent_commands import AgentCommands
from broker.documents import ProtectedVm
from broker.failover_jobs import FAILED_OVER, FailoverJobs, failover_record
from broker.orchestration import Orchestration, Step, StepFailed, StepRun
from broker.reports import ReplicationReports
from broker.store.models import Job, RelationshipState
from sitepair.errors import FailedPrecondition
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.failback")


class FailbackManager(FailoverJobs):
    def __init__(
        self,
        orchestration: Orchestration,
        *,
        commands: AgentCommands,
        reports: ReplicationReports,
    ) -> None:
        super().__init__(orchestration, commands=commands, reports=reports)
        self.declare("commit-failover", self._commit_steps)
        self.declare("cancel-failover", self._cancel_steps)
        self.declare("reverse-replication", self._reverse_job_steps)

    # -- commit and cancel ------------------------------------------------------------------
    def commit_step(self, rel_id: str) -> Step:
        async def commit(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            if doc.committed:
                return "committed before"
            await step.send(
                doc.new_primary,
                control_pb2.Command(
                    failover_control=control_pb2.FailoverControl(
                        relationship_id=rel.id,
                        action=control_pb2.FailoverControl.COMMIT,
                        epoch=rel.epoch,
                    )
                ),
            )
            await self.set_failover(rel_id, lambda r: replace(r, committed=True))
            await self.set_fields(rel_id, state=RelationshipState.COMMITTED)
            return "committed: other recovery points discarded"

        return Step("Commit the failover", commit)

    async def commit(self, ref: str, *, by: str) -> Job:
        rel = await self.find(ref)
        doc = failover_record(rel)
        if rel.state not in FAILED_OVER:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; only a failed-over VM can be committed"
            )
        if doc.committed:
            raise FailedPrecondition(f"the failover of {rel.vm_name} is already committed")
        return await self.start_failover_job("commit-failover", rel, by=by, params={})

    def _commit_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        return [self.commit_step(params["relationship"])]

    async def cancel(self, ref: str, *, by: str) -> Job:
        rel = await self.find(ref)
        doc = failover_record(rel)
        if doc.committed or rel.state in (
            RelationshipState.COMMITTED,
            RelationshipState.REVERSE_REPLICATING,
        ):
            raise FailedPrecondition(
                f"the failover of {rel.vm_name} was committed; it can no longer be cancelled",
                hint="replicate back (vms reverse) and fail over again to return",
            )
        if rel.state not in FAILED_OVER:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; there is no failover to cancel"
            )
        return await self.start_failover_job("cancel-failover", rel, by=by, params={})

    def _cancel_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def undo(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            await step.send(
                doc.new_primary,
                control_pb2.Command(
                    failover_control=control_pb2.FailoverControl(
                        relationship_id=rel.id,
                        action=control_pb2.FailoverControl.CANCEL,
                        epoch=rel.epoch,
                    )
                ),
            )
            return "failed-over VM removed; the replica is as it was"

        async def restart(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            await step.send(
                doc.old_primary,
                control_pb2.Command(
                    vm_power=control_pb2.VmPower(
                        vm_id=rel.vm_id, state="running", relationship_id=rel.id, epoch=rel.epoch
                    )
                ),
            )
            return "VM running on the original primary"

        async def resume(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            # Both sides get the raised epoch: the relationship goes on where it was.
            await step.send(rel.replica_server, self._commands.configure_replica(rel))
            await step.send(rel.primary_server, await self._commands.configure_source(rel))
            await self.set_fields(rel_id, state=RelationshipState.PROTECTED, failover_json="{}")
            return f"replicating again at epoch {rel.epoch}"

        return [
            Step("Remove the failed-over VM, keep the replica", undo),
            Step("Restart the VM on the original primary", restart),
            Step("Resume replication", resume),
        ]

    # -- reverse replication ----------------------------------------------------------------
    async def reverse(self, ref: str, *, by: str) -> Job:
        rel = await self.find(ref)
        if rel.state not in (*FAILED_OVER, RelationshipState.COMMITTED):
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; reverse replication follows a failover"
            )
        doc = failover_record(rel)
        return await self.start_failover_job(
            "reverse-replication",
            rel,
            by=by,
            params={},
            primary=doc.old_primary,
            replica=doc.new_primary,
        )

    def _reverse_job_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, names = params["relationship"], params["names"]
        return [
            self.commit_step(rel_id),
            *self.reverse_steps(rel_id, names["primary"], names["replica"]),
        ]

    def reverse_steps(self, rel_id: str, old_primary: str, new_primary: str) -> list[Step]:
        """Replicate back from the new primary to the old one (names as shown)."""

        async def prepare(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            if doc.reversed:
                return "done before"
            old, new = doc.old_primary, doc.new_primary
            if await self.server_gone(old):
                raise StepFailed(
                    "the old primary was removed from the vault; there is nothing to replicate "
                    "back to: disable protection and protect the VM again from where it runs"
                )
            if not await self.connected(old):
                raise StepFailed(
                    "the old primary is not connected; it must come back before replicating to it"
                )
            # The relationship now runs the other way round; the NIC mapping too.
            spec = ProtectedVm.decode(rel.replica_vm_json).reversed()
            await self.set_fields(
                rel_id,
                primary_server=new,
                replica_server=old,
                primary_cloud=rel.recovery_cloud,
                recovery_cloud=rel.primary_cloud,
                replica_folder="",
                replica_vm_json=spec.encode(),
                state=RelationshipState.REVERSE_REPLICATING,
                primary_status_json="{}",
                replica_status_json="{}",
            )
            await self.set_failover(
                rel_id, lambda r: replace(r, reversed=True, fence_pending=False)
            )
            rel = await self.relationship(rel_id)
            cmd = self._commands.configure_replica(rel)
            cmd.configure_replica.from_vm = rel.vm_id
            cmd.configure_replica.from_sequence = 1
            adopted = (await step.send(old, cmd)).configure_replica
            await self.set_fields(rel_id, replica_folder=adopted.folder)
            seq = adopted.committed_sequence
            return f"the old VM's disks are the replica, at sequence {seq}"

        async def enable(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            cmd = await self._commands.configure_source(rel)
            cmd.configure_source.resync_first = True
            await step.send(rel.primary_server, cmd)
            return await self._reports.wait_first_cycle(step, rel_id)

        async def complete(step: StepRun) -> str:
            await self.set_fields(rel_id, state=RelationshipState.PROTECTED, failover_json="{}")
            return "protected, in the reverse direction"

        return [
            Step(f"Prepare {old_primary} as the replica (its VM's disks are kept)", prepare),
            Step(
                f"Replicate from {new_primary}: checksum resync, only differing blocks travel",
                enable,
            ),
            Step("Complete reverse replication", complete),
        ]
