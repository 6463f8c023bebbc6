"""What the failover jobs share: the failover record on a relationship and how a job starts.

A relationship being failed over keeps a record of it (``failover_json``): the job that raised
the epoch, the old and the new primary, the recovery point, whether it was committed, whether
the old primary is still to be fenced, a test failover in place. :class:`FailoverJobs` is the
base of :class:`broker.failover.FailoverManager` and :class:`broker.failback.FailbackManager`:
it reads and updates that record, and starts their jobs with the names of the hosts their
steps show kept in the job, so a job resumed after a restart finds each step by its name.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from broker.agent_commands import AgentCommands
from broker.documents import ProtectedVm
from broker.orchestration import Orchestration, Orchestrator
from broker.reports import ReplicationReports
from broker.store.models import Job, Relationship, RelationshipState
from broker.store.sqlite import Tx
from sitepair.errors import FailedPrecondition
from sitepair.v1 import common_pb2, control_pb2

#: States of a VM failed over (and not committed yet).
FAILED_OVER = (RelationshipState.FAILED_OVER_PLANNED, RelationshipState.FAILED_OVER_UNPLANNED)
#: States from which a VM can fail over.
REPLICATING = (
    RelationshipState.PROTECTED,
    RelationshipState.RESYNC_REQUIRED,
    RelationshipState.RESYNCHRONIZING,
)


def made_vm(result: control_pb2.FailoverResult) -> dict[str, Any]:
    """What the failover document keeps of the VM a recovery host made (``vms show``)."""
    ts = result.cut_at
    return {
        "epoch": result.epoch,
        "test": result.test,
        "point": result.point,
        "cut_at": ts.seconds + ts.nanos / 1e9,
        "app_consistent": result.app_consistent,
        "vm_name": result.vm_name,
        "vm_id": result.vm_id,
        "committed": result.committed,
        "started": result.started,
    }


def final_cycle(result: control_pb2.ReplicationActionResult) -> dict[str, Any]:
    """What the failover document keeps of a planned failover's final cycle."""
    return {
        "sequence": result.sequence,
        "final_bytes": result.final_bytes,
        "disks_compared": result.disks_compared,
        "mismatched_bytes": result.mismatched_bytes,
    }


def failover_doc(rel: Relationship) -> dict[str, Any]:
    """The relationship's failover record ({} when it has none)."""
    doc = json.loads(rel.failover_json or "{}")
    return doc if isinstance(doc, dict) else {}


class FailoverJobs(Orchestrator):
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
        doc = failover_doc(rel)
        if job.kind == "reverse-replication" or doc.get("job") == job.id or doc.get("reversed"):
            primary, replica = doc.get("old_primary", ""), doc.get("new_primary", "")
        else:
            primary, replica = rel.primary_server, rel.replica_server
        names = await self.host_names()
        return {"primary": names.get(primary, primary), "replica": names.get(replica, replica)}

    async def start_failover_job(
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
        names = await self.host_names()
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

    async def find(self, ref: str) -> Relationship:
        rel: Relationship = await self.read(lambda tx: tx.find_relationship(ref))
        if rel.disabled_at is not None:
            raise FailedPrecondition(f"protection of {rel.vm_name} is disabled")
        return rel

    async def host_names(self) -> dict[str, str]:
        servers = await self.read(lambda tx: tx.list_servers(include_removed=True))
        return {s.id: s.name for s in servers}

    async def connected(self, server_id: str) -> bool:
        return self.sessions.get(server_id) is not None

    def vm_spec(self, rel: Relationship) -> tuple[common_pb2.VirtualMachine, dict[str, str]]:
        spec = ProtectedVm.decode(rel.replica_vm_json)
        vm = common_pb2.VirtualMachine(
            id=rel.vm_id,
            name=spec.name or rel.vm_name,
            generation=spec.generation,
            cpu_count=spec.cpu_count,
            memory_mb=spec.memory_mb,
            nics=[common_pb2.VmNic(name=n.name, network=n.network) for n in spec.nics],
        )
        return vm, {n.name: n.network for n in spec.nics}

    async def set_fields(self, rel_id: str, **fields: Any) -> None:
        await self.write(lambda tx: tx.update_relationship(rel_id, self.clock.now(), **fields))

    async def set_failover(self, rel_id: str, **changes: Any) -> dict[str, Any]:
        def run(tx: Tx) -> dict[str, Any]:
            rel = tx.get_relationship(rel_id)
            assert rel is not None
            doc = failover_doc(rel)
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
