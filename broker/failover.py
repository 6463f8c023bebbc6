"""Failover: planned, unplanned and test; commit, cancel; reverse replication; fencing.

Every failover raises the relationship's **epoch** before the recovery host makes a VM of the
replica, and every command carries the epoch, so agents refuse anything older (fencing): the old
primary's cycles are refused by the replica, and when the old primary comes back it is told to
stop replicating and power its VM off. At most one writable primary per VM, always.

Each operation is a job of idempotent steps; a job interrupted by a broker or agent restart is
resumed from its first unfinished step (commands already sent are found again, not resent), so
no failover stays "in progress" forever.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from broker.orchestration import Orchestrator, Step, StepFailed, StepRun
from broker.protection import ProtectionManager
from broker.store.models import Job, Relationship, RelationshipState
from broker.store.sqlite import Tx
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.v1 import common_pb2, control_pb2

log = logging.getLogger("sitepair.broker.failover")

FAILED_OVER = (RelationshipState.FAILED_OVER_PLANNED, RelationshipState.FAILED_OVER_UNPLANNED)
REPLICATING = (
    RelationshipState.PROTECTED,
    RelationshipState.RESYNC_REQUIRED,
    RelationshipState.RESYNCHRONIZING,
)

#: The name of the step that raises the epoch (in planned and unplanned failovers).
RAISE_EPOCH = "Raise the epoch"


def _failover(rel: Relationship) -> dict[str, Any]:
    doc = json.loads(rel.failover_json or "{}")
    return doc if isinstance(doc, dict) else {}


class FailoverManager(Orchestrator):
    def __init__(self, protection: ProtectionManager) -> None:
        p = protection
        super().__init__(
            store=p.store,
            clock=p.clock,
            jobs=p.jobs,
            dispatcher=p.dispatcher,
            sessions=p.sessions,
            spawn=p.spawn,
            command_timeout=p.command_timeout,
        )
        self.protection = protection
        self.declare("planned-failover", self._planned_steps)
        self.declare("unplanned-failover", self._unplanned_steps)
        self.declare("test-failover", self._test_steps)
        self.declare("cleanup-test-failover", self._cleanup_steps)
        self.declare("commit-failover", self._commit_steps)
        self.declare("cancel-failover", self._cancel_steps)
        self.declare("reverse-replication", self._reverse_job_steps)
        self.declare("fence-old-primary", self._fence_steps)

    async def resume(self, job: Job) -> bool:
        params = json.loads(job.params_json)
        if "names" not in params:
            # A job of a broker that did not keep the hosts' names its steps show: the names
            # as that broker found them, so each step is found again by its name.
            params["names"] = await self._legacy_names(job, params)
            job = dataclasses.replace(job, params_json=json.dumps(params, sort_keys=True))
        return await super().resume(job)

    async def _legacy_names(self, job: Job, params: dict[str, Any]) -> dict[str, str]:
        rel = await self.relationship(params["relationship"])
        doc = _failover(rel)
        if job.kind == "reverse-replication" or doc.get("job") == job.id or doc.get("reversed"):
            primary, replica = doc.get("old_primary", ""), doc.get("new_primary", "")
        else:
            primary, replica = rel.primary_server, rel.replica_server
        names = await self._names()
        return {"primary": names.get(primary, primary), "replica": names.get(replica, replica)}

    async def _start(
        self,
        kind: str,
        rel: Relationship,
        *,
        by: str,
        params: dict[str, Any],
        primary: str = "",
        replica: str = "",
    ) -> Job:
        """Start a failover job for ``rel``; ``primary`` and ``replica`` are the servers whose
        names its steps show (the relationship's own by default)."""
        names = await self._names()
        primary, replica = primary or rel.primary_server, replica or rel.replica_server
        return await self.start_job(
            kind,
            f"vm/{rel.vm_name}",
            {
                "relationship": rel.id,
                "names": {
                    "primary": names.get(primary, primary),
                    "replica": names.get(replica, replica),
                },
                **params,
            },
            by=by,
        )

    async def _find(self, ref: str) -> Relationship:
        rel: Relationship = await self.read(lambda tx: tx.find_relationship(ref))
        if rel.disabled_at is not None:
            raise FailedPrecondition(f"protection of {rel.vm_name} is disabled")
        return rel

    async def _names(self) -> dict[str, str]:
        servers = await self.read(lambda tx: tx.list_servers(include_removed=True))
        return {s.id: s.name for s in servers}

    async def _connected(self, server_id: str) -> bool:
        return self.sessions.get(server_id) is not None

    def _vm_spec(self, rel: Relationship) -> tuple[common_pb2.VirtualMachine, dict[str, str]]:
        spec = json.loads(rel.replica_vm_json)
        vm = common_pb2.VirtualMachine(
            id=rel.vm_id,
            name=spec.get("name", rel.vm_name),
            generation=int(spec.get("generation", 2)),
            cpu_count=int(spec.get("cpu_count", 1)),
            memory_mb=int(spec.get("memory_mb", 1024)),
            nics=[
                common_pb2.VmNic(name=n["name"], network=n.get("network", ""))
                for n in spec.get("nics", [])
            ],
        )
        return vm, {n["name"]: n.get("network", "") for n in spec.get("nics", [])}

    async def _set(self, rel_id: str, **fields: Any) -> None:
        await self.write(lambda tx: tx.update_relationship(rel_id, self.clock.now(), **fields))

    async def _set_failover(self, rel_id: str, **changes: Any) -> dict[str, Any]:
        def run(tx: Tx) -> dict[str, Any]:
            rel = tx.get_relationship(rel_id)
            assert rel is not None
            doc = _failover(rel)
            for k, v in changes.items():
                if v is None:
                    doc.pop(k, None)
                else:
                    doc[k] = v
            tx.update_relationship(
                rel_id, self.clock.now(), failover_json=json.dumps(doc, sort_keys=True)
            )
            return doc

        return await self.write(run)

    async def _raise_epoch(self, job: Job, kind: str, point: str) -> int:
        """Raise the epoch once per job (a resumed job finds it raised already)."""

        def run(tx: Tx) -> int:
            rel = tx.get_relationship(json.loads(job.params_json)["relationship"])
            assert rel is not None
            doc = _failover(rel)
            if doc.get("job") == job.id:
                return int(doc["epoch"])
            epoch = rel.epoch + 1
            new = {
                "job": job.id,
                "type": kind,
                "epoch": epoch,
                "epoch_before": rel.epoch,
                "old_primary": rel.primary_server,
                "new_primary": rel.replica_server,
                "point": point,
                "previous_state": rel.state.value,
                "committed": False,
                "fence_pending": True,
            }
            if "test" in doc:
                new["test"] = doc["test"]
            tx.update_relationship(
                rel.id,
                self.clock.now(),
                epoch=epoch,
                state=RelationshipState.FAILOVER_IN_PROGRESS,
                failover_json=json.dumps(new, sort_keys=True),
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
        rel = await self._find(ref)
        if rel.state not in REPLICATING:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; a planned failover needs it protected"
            )
        if _failover(rel).get("test"):
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is in place",
                hint="clean it up first (vms cleanup-test)",
            )
        return await self._start("planned-failover", rel, by=by, params={"reverse": reverse})

    def _planned_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]
        primary, replica = params["names"]["primary"], params["names"]["replica"]

        async def check(step: StepRun) -> str:
            job = step.job
            rel = await self.relationship(rel_id)
            if (
                rel.state == RelationshipState.FAILOVER_IN_PROGRESS
                and _failover(rel).get("job") == job.id
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
            if _failover(rel).get("job") == step.job.id:
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
            if _failover(rel).get("job") == step.job.id:
                return "done before"
            result = await step.send(
                rel.primary_server,
                control_pb2.Command(
                    replication_action=control_pb2.ReplicationAction(
                        relationship_id=rel.id, action=control_pb2.ReplicationAction.FINAL_CYCLE
                    )
                ),
            )
            await self._set_failover(rel_id, final=result)
            return (
                f"replica at sequence {result.get('sequence')}, identical to the primary "
                f"({result.get('disks_compared')} disk(s) compared)"
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
            steps += [self._commit_step(rel_id), *self._reverse_steps(rel_id, primary, replica)]
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
            doc = _failover(rel)
            vm, nets = self._vm_spec(rel)
            result = await step.send(
                doc["new_primary"],
                control_pb2.Command(
                    failover=control_pb2.Failover(
                        relationship_id=rel.id,
                        epoch=int(doc["epoch"]),
                        point=point,
                        start_vm=True,
                        vm=vm,
                        nic_networks=nets,
                    )
                ),
            )
            await self._set_failover(rel_id, result=result)
            return f"VM {result.get('vm_name')} running from recovery point {result.get('point')}"

        async def fence(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = _failover(rel)
            old = doc["old_primary"]
            if await self.server_gone(old):
                await self._set_failover(rel_id, fence_pending=False)
                return "the old primary was removed from the vault: every host refuses it"
            if not await self._connected(old):
                return "the old primary is unreachable; it will be fenced when it reconnects"
            await step.send(
                old,
                control_pb2.Command(
                    fence=control_pb2.Fence(
                        relationship_id=rel.id, epoch=int(doc["epoch"]), vm_id=rel.vm_id
                    )
                ),
            )
            await self._set_failover(rel_id, fence_pending=False)
            return "replication stopped and VM off on the old primary"

        async def complete(step: StepRun) -> str:
            await self._set(rel_id, state=final_state)
            return final_state.value

        return [
            Step(names[0], fail_over),
            Step(names[1], fence),
            Step("Complete the failover", complete),
        ]

    # -- unplanned --------------------------------------------------------------------------
    async def unplanned(self, ref: str, *, by: str, point: str = "latest") -> Job:
        if point not in ("latest", "latest-app-consistent") and not point.isdigit():
            raise InvalidArgument(
                f"--point must be latest, latest-app-consistent or a sequence number, not {point!r}"
            )
        rel = await self._find(ref)
        if rel.state not in (*REPLICATING, RelationshipState.FAILOVER_IN_PROGRESS):
            raise FailedPrecondition(f"{rel.vm_name} is {rel.state.value}; it cannot fail over now")
        if _failover(rel).get("test"):
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is in place",
                hint="clean it up first (vms cleanup-test)",
            )
        return await self._start("unplanned-failover", rel, by=by, params={"point": point})

    def _unplanned_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, point = params["relationship"], params["point"]
        replica = params["names"]["replica"]

        async def check(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            if not await step.wait_connected(rel.replica_server):
                raise StepFailed(f"the recovery host {rel.replica_server} is not connected")
            status = json.loads(rel.replica_status_json or "{}")
            if not int(status.get("committed_sequence", 0)):
                raise StepFailed("the replica holds no committed data yet")
            return f"replica at sequence {status.get('committed_sequence')}"

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
    async def test(self, ref: str, *, by: str, point: str = "latest", network: str = "") -> Job:
        """``network``: "" (no network), the name of an existing network, or "create"."""
        rel = await self._find(ref)
        if rel.state not in REPLICATING:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; a test failover needs it protected"
            )
        if _failover(rel).get("test"):
            raise FailedPrecondition(
                f"a test failover of {rel.vm_name} is already in place", hint="clean it up first"
            )
        return await self._start(
            "test-failover", rel, by=by, params={"point": point, "network": network}
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
                await self._set_failover(
                    rel_id, test={"network": name, "created_network": True, "job": job.id}
                )
                return f"isolated network {name} created for the test"
            await self._set_failover(
                rel_id, test={"network": wanted, "created_network": False, "job": job.id}
            )
            return (
                f"NICs on {wanted}"
                if wanted
                else "no network: the test VM's NICs stay disconnected"
            )

        async def create(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            test = _failover(rel)["test"]
            vm, nets = self._vm_spec(rel)
            result = await step.send(
                rel.replica_server,
                control_pb2.Command(
                    failover=control_pb2.Failover(
                        relationship_id=rel.id,
                        epoch=rel.epoch,
                        point=params["point"],
                        test=True,
                        start_vm=True,
                        vm=vm,
                        nic_networks=dict.fromkeys(nets, test["network"]),
                    )
                ),
            )
            await self._set_failover(rel_id, test={**test, "result": result})
            return (
                f"test VM {result.get('vm_name')} running from recovery point {result.get('point')}"
            )

        async def done(step: StepRun) -> str:
            return "production replication continues; clean up with `vms cleanup-test`"

        return [
            Step("Prepare the test network", network),
            Step(f"Create the test VM on {replica} from recovery point {params['point']}", create),
            Step("Complete the test failover", done),
        ]

    async def cleanup_test(self, ref: str, *, by: str, notes: str = "") -> Job:
        rel = await self._find(ref)
        if not _failover(rel).get("test"):
            raise FailedPrecondition(f"no test failover of {rel.vm_name} is in place")
        return await self._start("cleanup-test-failover", rel, by=by, params={"notes": notes})

    def _cleanup_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def remove_vm(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            result = await step.send(
                rel.replica_server,
                control_pb2.Command(
                    failover_control=control_pb2.FailoverControl(
                        relationship_id=rel.id,
                        action=control_pb2.FailoverControl.CLEANUP_TEST,
                        epoch=rel.epoch,
                    )
                ),
            )
            return (
                f"removed {result.get('vm_name', 'the test VM')}"
                if result.get("cleaned")
                else str(result.get("reason"))
            )

        async def remove_network(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            test = _failover(rel).get("test") or {}
            await self._set_failover(rel_id, test=None)
            if test.get("created_network"):
                return f"network {test['network']} removed"
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

    # -- commit and cancel ------------------------------------------------------------------
    def _commit_step(self, rel_id: str) -> Step:
        async def commit(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = _failover(rel)
            if doc.get("committed"):
                return "committed before"
            await step.send(
                doc["new_primary"],
                control_pb2.Command(
                    failover_control=control_pb2.FailoverControl(
                        relationship_id=rel.id,
                        action=control_pb2.FailoverControl.COMMIT,
                        epoch=rel.epoch,
                    )
                ),
            )
            await self._set_failover(rel_id, committed=True)
            await self._set(rel_id, state=RelationshipState.COMMITTED)
            return "committed: other recovery points discarded"

        return Step("Commit the failover", commit)

    async def commit(self, ref: str, *, by: str) -> Job:
        rel = await self._find(ref)
        doc = _failover(rel)
        if rel.state not in FAILED_OVER:
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; only a failed-over VM can be committed"
            )
        if doc.get("committed"):
            raise FailedPrecondition(f"the failover of {rel.vm_name} is already committed")
        return await self._start("commit-failover", rel, by=by, params={})

    def _commit_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        return [self._commit_step(params["relationship"])]

    async def cancel(self, ref: str, *, by: str) -> Job:
        rel = await self._find(ref)
        doc = _failover(rel)
        if doc.get("committed") or rel.state in (
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
        return await self._start("cancel-failover", rel, by=by, params={})

    def _cancel_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def undo(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = _failover(rel)
            await step.send(
                doc["new_primary"],
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
            doc = _failover(rel)
            await step.send(
                doc["old_primary"],
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
            await step.send(rel.replica_server, self.protection._configure_replica_cmd(rel))
            await step.send(rel.primary_server, await self.protection._configure_source_cmd(rel))
            await self._set(rel_id, state=RelationshipState.PROTECTED, failover_json="{}")
            return f"replicating again at epoch {rel.epoch}"

        return [
            Step("Remove the failed-over VM, keep the replica", undo),
            Step("Restart the VM on the original primary", restart),
            Step("Resume replication", resume),
        ]

    # -- reverse replication ----------------------------------------------------------------
    async def reverse(self, ref: str, *, by: str) -> Job:
        rel = await self._find(ref)
        if rel.state not in (*FAILED_OVER, RelationshipState.COMMITTED):
            raise FailedPrecondition(
                f"{rel.vm_name} is {rel.state.value}; reverse replication follows a failover"
            )
        doc = _failover(rel)
        return await self._start(
            "reverse-replication",
            rel,
            by=by,
            params={},
            primary=doc["old_primary"],
            replica=doc["new_primary"],
        )

    def _reverse_job_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id, names = params["relationship"], params["names"]
        return [
            self._commit_step(rel_id),
            *self._reverse_steps(rel_id, names["primary"], names["replica"]),
        ]

    def _reverse_steps(self, rel_id: str, old_primary: str, new_primary: str) -> list[Step]:
        """Replicate back from the new primary to the old one (names as shown)."""

        async def prepare(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = _failover(rel)
            if doc.get("reversed"):
                return "done before"
            old, new = doc["old_primary"], doc["new_primary"]
            if await self.server_gone(old):
                raise StepFailed(
                    "the old primary was removed from the vault; there is nothing to replicate "
                    "back to: disable protection and protect the VM again from where it runs"
                )
            if not await self._connected(old):
                raise StepFailed(
                    "the old primary is not connected; it must come back before replicating to it"
                )
            # The relationship now runs the other way round; the NIC mapping too.
            spec = json.loads(rel.replica_vm_json)
            for nic in spec.get("nics", []):
                nic["network"], nic["source_network"] = (
                    nic.get("source_network", ""),
                    nic.get("network", ""),
                )
            await self._set(
                rel_id,
                primary_server=new,
                replica_server=old,
                primary_cloud=rel.recovery_cloud,
                recovery_cloud=rel.primary_cloud,
                replica_folder="",
                replica_vm_json=json.dumps(spec),
                state=RelationshipState.REVERSE_REPLICATING,
                primary_status_json="{}",
                replica_status_json="{}",
            )
            await self._set_failover(rel_id, reversed=True, fence_pending=False)
            rel = await self.relationship(rel_id)
            cmd = self.protection._configure_replica_cmd(rel)
            cmd.configure_replica.from_vm = rel.vm_id
            cmd.configure_replica.from_sequence = 1
            result = await step.send(old, cmd)
            await self._set(rel_id, replica_folder=str(result.get("folder", "")))
            seq = result.get("committed_sequence")
            return f"the old VM's disks are the replica, at sequence {seq}"

        async def enable(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            cmd = await self.protection._configure_source_cmd(rel)
            cmd.configure_source.resync_first = True
            await step.send(rel.primary_server, cmd)
            return await self.protection.wait_first_cycle(step, rel_id)

        async def complete(step: StepRun) -> str:
            await self._set(rel_id, state=RelationshipState.PROTECTED, failover_json="{}")
            return "protected, in the reverse direction"

        return [
            Step(f"Prepare {old_primary} as the replica (its VM's disks are kept)", prepare),
            Step(
                f"Replicate from {new_primary}: checksum resync, only differing blocks travel",
                enable,
            ),
            Step("Complete reverse replication", complete),
        ]

    # -- fencing a returning old primary ----------------------------------------------------
    async def on_server_connected(self, server_id: str) -> None:
        rels = await self.read(lambda tx: tx.list_relationships())
        for rel in rels:
            doc = _failover(rel)
            if (
                doc.get("fence_pending")
                and doc.get("old_primary") == server_id
                and rel.state in (*FAILED_OVER, RelationshipState.COMMITTED)
            ):
                jobs = await self.jobs.list(kind="fence-old-primary", limit=20)
                if any(j.target == f"vm/{rel.vm_name}" and not j.state.final for j in jobs):
                    continue
                await self._start("fence-old-primary", rel, by="broker", params={})

    def _fence_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        rel_id = params["relationship"]

        async def fence(step: StepRun) -> str:
            rel = await self.relationship(rel_id)
            doc = _failover(rel)
            result = await step.send(
                doc["old_primary"],
                control_pb2.Command(
                    fence=control_pb2.Fence(
                        relationship_id=rel.id, epoch=int(doc["epoch"]), vm_id=rel.vm_id
                    )
                ),
            )
            await self._set_failover(rel_id, fence_pending=False)
            return (
                f"replication stopped ({result.get('replication_stopped')}), "
                f"VM {result.get('vm_state')}; reverse replication resynchronizes it"
            )

        return [Step("Fence the returning old primary", fence)]
