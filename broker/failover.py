"""Failover: planned, unplanned and test failovers, and fencing a returning old primary.

Every failover raises the relationship's **epoch** before the recovery host makes a VM of the
replica, and every command carries the epoch, so agents refuse anything older (fencing): the old
primary's cycles are refused by the replica, and when the old primary comes back it is told to
stop replicating and power its VM off. At most one writable primary per VM, always. What follows
a failover (commit, cancel, reverse replication) is :mod:`broker.failback`.

Each operation is a job of idempotent steps; a job interrupted by a broker or agent restart is
resumed from its first unfinished step (commands already sent are found again, not resent), so
no failover stays "in progress" forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

from google.protobuf import json_format

from broker.agent_commands import AgentCommands
from broker.documents import status_of
from broker.failback import FailbackManager
from broker.failover_jobs import (
    FAILED_OVER,
    REPLICATING,
    FailoverJobs,
    failover_record,
)
from broker.failover_record import FailoverRecord, FinalCycle, MadeVm, TestFailover
from broker.orchestration import Orchestration, Step, StepFailed, StepRun
from broker.reports import ReplicationReports
from broker.store.models import Job, JobState, Relationship, RelationshipState
from broker.store.sqlite import Tx
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.failover")

#: The name of the step that raises the epoch (in planned and unplanned failovers).
RAISE_EPOCH = "Raise the epoch"
#: How long undoing a failed test failover waits for the recovery host (the command stays queued).
UNDO_WAIT = 30.0
#: The named recovery points (besides a sequence number).
NAMED_POINTS = ("latest", "latest-app-consistent")


def check_point_form(point: str) -> None:
    """``--point`` is latest, latest-app-consistent or a sequence number."""
    if point not in NAMED_POINTS and not point.isdigit():
        raise InvalidArgument(
            f"--point must be latest, latest-app-consistent or a sequence number, not {point!r}"
        )


def check_point_held(rel: Relationship, point: str) -> None:
    """The replica holds the recovery point asked for (as far as its last report says)."""
    status = status_of(rel.replica_status_json)
    if not status.relationship_id:
        return  # no report yet: the recovery host decides
    held = sorted({p.sequence for p in status.points} | {status.committed_sequence} - {0})
    if point.isdigit() and held and int(point) not in held:
        raise InvalidArgument(
            f"the replica of {rel.vm_name} holds no recovery point {point}; it holds "
            f"{', '.join(map(str, held))}",
            hint=f"see `vms show {rel.vm_name}`, or use --point latest",
        )
    if point == "latest-app-consistent" and not any(p.app_consistent for p in status.points):
        raise InvalidArgument(
            f"the replica of {rel.vm_name} holds no application-consistent recovery point",
            hint="use --point latest, or a sequence number (see `vms show`)",
        )


class FailoverManager(FailoverJobs):
    def __init__(
        self,
        orchestration: Orchestration,
        *,
        commands: AgentCommands,
        reports: ReplicationReports,
        failback: FailbackManager,
    ) -> None:
        super().__init__(orchestration, commands=commands, reports=reports)
        self._failback = failback
        self.declare("planned-failover", self._planned_steps)
        self.declare("unplanned-failover", self._unplanned_steps)
        self.declare("test-failover", self._test_steps, on_failure=self._undo_test)
        self.declare("cleanup-test-failover", self._cleanup_steps)
        self.declare("fence-old-primary", self._fence_steps)

    async def _raise_epoch(self, job: Job, kind: str, point: str) -> int:
        """Raise the epoch once per job (a resumed job finds it raised already)."""

        def run(tx: Tx) -> int:
            rel = tx.get_relationship(json.loads(job.params_json)["relationship"])
            assert rel is not None
            doc = failover_record(rel)
            if doc.job == job.id:
                return doc.epoch
            epoch = rel.epoch + 1
            new = FailoverRecord(
                job=job.id,
                type=kind,
                epoch=epoch,
                epoch_before=rel.epoch,
                old_primary=rel.primary_server,
                new_primary=rel.replica_server,
                point=point,
                previous_state=rel.state.value,
                committed=False,
                fence_pending=True,
                # A planned failover's final cycle was recorded just before; a test failover
                # in place stays (its cleanup still needs the record).
                final=doc.final,
                test=doc.test,
            )
            tx.update_relationship(
                rel.id,
                self.clock.now(),
                epoch=epoch,
                state=RelationshipState.FAILOVER_IN_PROGRESS,
                failover_json=new.encode(),
            )
            return epoch

        epoch: int = await self.write(run)
        log.warning(
            "epoch raised for failover",
            extra={"fields": {"job": job.id, "epoch": epoch, "type": kind}},
        )
        return epoch

    # -- planned ----------------------------------------------------------------------------
    async def planned(self, ref: str, *, by: str, reverse: bool = False) -> Job:
        rel = await self.find(ref)
        if rel.state not in REPLICATING:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; a planned failover needs it protected"
            )
        if failover_record(rel).test:
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is in place",
                hint="clean it up first (vms cleanup-test)",
            )
        return await self.start_failover_job(
            "planned-failover", rel, by=by, params={"reverse": reverse}
        )

    def _planned_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]
        primary, replica = params["names"]["primary"], params["names"]["replica"]

        async def check(step: StepRun) -> str:
            job = step.job
            rel = await self.relationship(rel_id)
            if (
                rel.state == RelationshipState.FAILOVER_IN_PROGRESS
                and failover_record(rel).job == job.id
            ):
                return "resumed"
            if rel.state not in REPLICATING:
                raise StepFailed(f"the VM is {rel.state.value}")
            for server in (rel.primary_server, rel.replica_server):
                if not await step.wait_connected(server):
                    raise StepFailed(
                        f"host {server} is not connected; a planned failover needs both "
                        "sites (use unplanned)"
                    )
            return "both hosts connected, replication healthy"

        async def shutdown(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if failover_record(rel).job == step.job.id:
                return "done before"
            await step.send(
                rel.primary_server,
                control_pb2.Command(
                    vm_power=control_pb2.VmPower(
                        vm_id=rel.vm_id, state="off", relationship_id=rel.id, epoch=rel.epoch
                    )
                ),
            )
            return "VM off"

        async def final(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if failover_record(rel).job == step.job.id:
                return "done before"
            sent = await step.send(
                rel.primary_server,
                control_pb2.Command(
                    replication_action=control_pb2.ReplicationAction(
                        relationship_id=rel.id, action=control_pb2.ReplicationAction.FINAL_CYCLE
                    )
                ),
            )
            final = sent.replication_action
            await self.set_failover(rel_id, lambda r: replace(r, final=FinalCycle.of(final)))
            return (
                f"replica at sequence {final.sequence}, identical to the primary "
                f"({final.disks_compared} disk(s) compared)"
            )

        async def raise_epoch(step: StepRun) -> str:
            return f"epoch {await self._raise_epoch(step.job, 'planned', 'latest')}"

        steps = [
            Step("Check that the VM can fail over", check),
            Step(f"Shut down the VM on {primary}", shutdown),
            Step("Send the last changes and compare every block", final),
            Step(RAISE_EPOCH, raise_epoch),
            *self._failover_steps(
                rel_id,
                "latest",
                RelationshipState.FAILED_OVER_PLANNED,
                (f"Fail over on {replica} and start the VM", f"Fence {primary}"),
            ),
        ]
        if params.get("reverse"):
            steps += [
                self._failback.commit_step(rel_id),
                *self._failback.reverse_steps(rel_id, primary, replica),
            ]
        return steps

    def _failover_steps(
        self,
        rel_id: str,
        point: str,
        final_state: RelationshipState,
        names: tuple[str, str],
    ) -> list[Step]:
        """Fail over (``names[0]``), fence the old primary (``names[1]``), complete."""

        async def fail_over(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            vm, nets = self.vm_spec(rel)
            sent = await step.send(
                doc.new_primary,
                control_pb2.Command(
                    failover=control_pb2.Failover(
                        relationship_id=rel.id,
                        epoch=doc.epoch,
                        point=point,
                        start_vm=True,
                        vm=vm,
                        nic_networks=nets,
                    )
                ),
            )
            made = sent.failover
            await self.set_failover(rel_id, lambda r: replace(r, result=MadeVm.of(made)))
            return f"VM {made.vm_name} running from recovery point {made.point}"

        async def fence(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            old = doc.old_primary
            if await self.server_gone(old):
                await self.set_failover(rel_id, lambda r: replace(r, fence_pending=False))
                return "the old primary was removed from the vault: every host refuses it"
            if not await self.connected(old):
                return "the old primary is unreachable; it will be fenced when it reconnects"
            await step.send(
                old,
                control_pb2.Command(
                    fence=control_pb2.Fence(
                        relationship_id=rel.id, epoch=doc.epoch, vm_id=rel.vm_id
                    )
                ),
            )
            await self.set_failover(rel_id, lambda r: replace(r, fence_pending=False))
            return "replication stopped and VM off on the old primary"

        async def complete(step: StepRun) -> str:
            await self.set_fields(rel_id, state=final_state)
            return final_state.value

        return [
            Step(names[0], fail_over),
            Step(names[1], fence),
            Step("Complete the failover", complete),
        ]

    # -- unplanned --------------------------------------------------------------------------
    async def unplanned(self, ref: str, *, by: str, point: str = "latest") -> Job:
        check_point_form(point)
        rel = await self.find(ref)
        check_point_held(rel, point)
        if rel.state not in (*REPLICATING, RelationshipState.FAILOVER_IN_PROGRESS):
            raise FailedPrecondition(f"{rel.vm_name} is {rel.state.value}; it cannot fail over now")
        if failover_record(rel).test:
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is in place",
                hint="clean it up first (vms cleanup-test)",
            )
        return await self.start_failover_job(
            "unplanned-failover", rel, by=by, params={"point": point}
        )

    def _unplanned_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, point = params["relationship"], params["point"]
        replica = params["names"]["replica"]

        async def check(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if not await step.wait_connected(rel.replica_server):
                raise StepFailed(f"the recovery host {rel.replica_server} is not connected")
            status = status_of(rel.replica_status_json)
            if not status.committed_sequence:
                raise StepFailed("the replica holds no committed data yet")
            return f"replica at sequence {status.committed_sequence}"

        async def raise_epoch(step: StepRun) -> str:
            return f"epoch {await self._raise_epoch(step.job, 'unplanned', point)}"

        return [
            Step(f"Check that {replica} can fail over", check),
            Step(RAISE_EPOCH, raise_epoch),
            *self._failover_steps(
                rel_id,
                point,
                RelationshipState.FAILED_OVER_UNPLANNED,
                (
                    f"Fail over on {replica} to recovery point {point} and start the VM",
                    "Fence the old primary",
                ),
            ),
        ]

    # -- test failover ----------------------------------------------------------------------
    async def test(
        self,
        ref: str,
        *,
        by: str,
        point: str = "latest",
        network: str = "",
        prove_exact: bool = False,
    ) -> Job:
        """``network``: "" (no network), the name of an existing network, or "create". The
        arguments are checked before the job starts: a job that fails anyway is undone
        (:meth:`_undo_test`), so it never blocks the next test. ``prove_exact``: the recovery
        host proves the test VM's disks byte for byte the recovery point before starting it;
        the proof is the job's result ``{"exact": ExactProof as JSON}`` (drills read it)."""
        check_point_form(point)
        rel = await self.find(ref)
        if rel.state not in REPLICATING:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; a test failover needs it protected"
            )
        check_point_held(rel, point)
        if network and network != "create":
            offered = sorted(
                {n for _, n, _ in await self.read(lambda tx: tx.host_networks(rel.replica_server))}
            )
            if network not in offered:
                names = await self.host_names()
                raise InvalidArgument(
                    f"the recovery host {names.get(rel.replica_server, rel.replica_server)} has "
                    f"no network {network!r}; it has: {', '.join(offered) or 'none'}",
                    hint='use one of those, "" (no network) or "create" (an isolated one)',
                )
        test = failover_record(rel).test
        if test and not await self._left_by_failed_job(test):
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is already in place",
                hint=f"clean it up first: vms cleanup-test {rel.vm_name}",
            )
        return await self.start_failover_job(
            "test-failover",
            rel,
            by=by,
            params={"point": point, "network": network, "prove_exact": prove_exact},
        )

    def _test_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]
        replica = params["names"]["replica"]

        async def network(step: StepRun) -> str:
            job = step.job
            rel = await self.relationship(rel_id)
            wanted = params["network"]
            if wanted == "create":
                name = f"test-{rel.vm_name}-{job.id[-6:]}"
                test = TestFailover(network=name, created_network=True, job=job.id)
                await self.set_failover(rel_id, lambda r: replace(r, test=test))
                return f"isolated network {name} created for the test"
            chosen = TestFailover(network=wanted, created_network=False, job=job.id)
            await self.set_failover(rel_id, lambda r: replace(r, test=chosen))
            return (
                f"NICs on {wanted}"
                if wanted
                else "no network: the test VM's NICs stay disconnected"
            )

        async def create(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            test = failover_record(rel).test
            if test is None:
                raise StepFailed("the test failover's record disappeared (cleaned up meanwhile?)")
            vm, nets = self.vm_spec(rel)
            sent = await step.send(
                rel.replica_server,
                control_pb2.Command(
                    failover=control_pb2.Failover(
                        relationship_id=rel.id,
                        epoch=rel.epoch,
                        point=params["point"],
                        test=True,
                        start_vm=True,
                        vm=vm,
                        nic_networks=dict.fromkeys(nets, test.network),
                        prove_exact=bool(params.get("prove_exact")),
                    )
                ),
            )
            made = sent.failover
            made_test = replace(test, result=MadeVm.of(made))
            await self.set_failover(rel_id, lambda r: replace(r, test=made_test))
            if params.get("prove_exact"):
                proof = json_format.MessageToDict(made.exact, preserving_proto_field_name=True)
                await self.jobs.set_state(step.job.id, step.job.state, result={"exact": proof})
            return f"test VM {made.vm_name} running from recovery point {made.point}"

        async def done(step: StepRun) -> str:
            return "production replication continues; clean up with `vms cleanup-test`"

        return [
            Step("Prepare the test network", network),
            Step(f"Create the test VM on {replica} from recovery point {params['point']}", create),
            Step("Complete the test failover", done),
        ]

    async def _left_by_failed_job(self, test: TestFailover) -> bool:
        """Whether a test failover record is only what a failed job left (no test VM made):
        a broker before this one did not undo a failed test, and its record must not block."""
        if test.result is not None or not test.job:
            return False
        try:
            job = await self.jobs.get(test.job)
        except NotFound:
            return True
        return job.state in (JobState.FAILED, JobState.CANCELLED)

    async def _undo_test(self, step: StepRun) -> str:
        """A failed test-failover job leaves nothing that blocks the next one: the test VM, if
        the recovery host made one, is removed, and the test record is cleared."""
        rel_id = json.loads(step.job.params_json)["relationship"]
        rel = await self.relationship(rel_id)
        test = failover_record(rel).test
        if test is None or test.job != step.job.id:
            return "nothing to undo"
        undone = "no test VM was made"
        if test.result is not None:
            cmd = control_pb2.Command(
                failover_control=control_pb2.FailoverControl(
                    relationship_id=rel.id,
                    action=control_pb2.FailoverControl.CLEANUP_TEST,
                    epoch=rel.epoch,
                )
            )
            try:
                await asyncio.wait_for(step.send(rel.replica_server, cmd), UNDO_WAIT)
                undone = "test VM removed"
            except (StepFailed, TimeoutError) as exc:
                # The command stays queued: an offline host removes the test VM when it is back.
                undone = f"the test VM is removed when the recovery host answers ({exc or 'late'})"
        await self.set_failover(rel_id, lambda r: replace(r, test=None))
        log.warning(
            "test failover failed and was undone",
            extra={"fields": {"job": step.job.id, "relationship": rel_id, "undone": undone}},
        )
        return f"undone: {undone}; a new test failover can start"

    async def cleanup_test(self, ref: str, *, by: str, notes: str = "") -> Job:
        rel = await self.find(ref)
        if not failover_record(rel).test:
            raise FailedPrecondition(f"no test failover of {rel.vm_name} is in place")
        return await self.start_failover_job(
            "cleanup-test-failover", rel, by=by, params={"notes": notes}
        )

    def _cleanup_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def remove_vm(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            sent = await step.send(
                rel.replica_server,
                control_pb2.Command(
                    failover_control=control_pb2.FailoverControl(
                        relationship_id=rel.id,
                        action=control_pb2.FailoverControl.CLEANUP_TEST,
                        epoch=rel.epoch,
                    )
                ),
            )
            cleaned = sent.failover_control
            if not cleaned.done:
                return cleaned.reason or "no test VM to remove"
            return f"removed {cleaned.vm_name or 'the test VM'}"

        async def remove_network(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            test = failover_record(rel).test
            await self.set_failover(rel_id, lambda r: replace(r, test=None))
            if test is not None and test.created_network:
                return f"network {test.network} removed"
            return "nothing to remove"

        async def record(step: StepRun) -> str:
            await self.jobs.set_state(
                step.job.id, step.job.state, result={"notes": params.get("notes", "")}
            )
            return str(params.get("notes") or "no notes")

        return [
            Step("Remove the test VM and its disks", remove_vm),
            Step("Remove the test network", remove_network),
            Step("Record the notes", record),
        ]

    # -- fencing a returning old primary ----------------------------------------------------
    async def on_server_connected(self, server_id: str) -> None:
        rels = await self.read(lambda tx: tx.list_relationships())
        for rel in rels:
            doc = failover_record(rel)
            if (
                doc.fence_pending
                and doc.old_primary == server_id
                and rel.state in (*FAILED_OVER, RelationshipState.COMMITTED)
            ):
                jobs = await self.jobs.list(kind="fence-old-primary", limit=20)
                if any(j.target == f"vm/{rel.vm_name}" and not j.state.final for j in jobs):
                    continue
                await self.start_failover_job("fence-old-primary", rel, by="broker", params={})

    def _fence_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def fence(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = failover_record(rel)
            sent = await step.send(
                doc.old_primary,
                control_pb2.Command(
                    fence=control_pb2.Fence(
                        relationship_id=rel.id, epoch=doc.epoch, vm_id=rel.vm_id
                    )
                ),
            )
            await self.set_failover(rel_id, lambda r: replace(r, fence_pending=False))
            fenced = sent.fence
            return (
                f"replication stopped ({fenced.replication_stopped}), "
                f"VM {fenced.vm_state}; reverse replication resynchronizes it"
            )

        return [Step("Fence the returning old primary", fence)]
