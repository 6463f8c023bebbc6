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
from collections.abc import Callable
from typing import Any

from broker.agent_commands import AgentCommands
from broker.documents import ProtectedVm
from broker.failover_record import FailoverRecord
from broker.orchestration import Orchestration, Orchestrator, StepFailed
from broker.reports import ReplicationReports
from broker.store.models import Job, Relationship, RelationshipState
from broker.store.sqlite import Tx
from sitepair.errors import FailedPrecondition
from sitepair.v1 import common_pb2

#: States of a VM failed over (and not committed yet).
FAILED_OVER = (RelationshipState.FAILED_OVER_PLANNED, RelationshipState.FAILED_OVER_UNPLANNED)
#: States from which a VM can fail over.
REPLICATING = (
    RelationshipState.PROTECTED,
    RelationshipState.RESYNC_REQUIRED,
    RelationshipState.RESYNCHRONIZING,
)


def failover_record(rel: Relationship) -> FailoverRecord:
    """The relationship's failover record (the empty record when it has none)."""
    return FailoverRecord.decode(rel.failover_json)


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
        doc = failover_record(rel)
        if job.kind == "reverse-replication" or doc.job == job.id or doc.reversed:
            primary, replica = doc.old_primary, doc.new_primary
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

    async def set_failover(
        self, rel_id: str, change: Callable[[FailoverRecord], FailoverRecord]
    ) -> FailoverRecord:
        """Change the relationship's failover record in one transaction; returns the new one."""

        def run(tx: Tx) -> FailoverRecord:
            rel = tx.get_relationship(rel_id)
            if rel is None:
                raise StepFailed(f"relationship {rel_id} disappeared")
            record = change(failover_record(rel))
            tx.update_relationship(rel_id, self.clock.now(), failover_json=record.encode())
            return record

        return await self.write(run)
