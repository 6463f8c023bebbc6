"""Store dataclasses to protobuf messages, for the admin API (protobuf lives at the edges)."""

from __future__ import annotations

import json

from google.protobuf import json_format

from broker.store.models import Job, RegistrationKey, Server, StoredInventory
from sitepair.protoconv import timestamp
from sitepair.v1 import admin_pb2, common_pb2


def key_to_proto(key: RegistrationKey, now: float) -> admin_pb2.RegistrationKey:
    return admin_pb2.RegistrationKey(
        id=key.id,
        site=key.site,
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        uses_total=key.uses_total,
        uses_remaining=key.uses_remaining,
        revoked=key.revoked_at is not None,
        created_by=key.created_by,
        state=key.state(now),
    )


def server_to_proto(
    server: Server, inventory: StoredInventory | None = None, *, with_inventory: bool = False
) -> admin_pb2.Server:
    msg = admin_pb2.Server(
        id=server.id,
        name=server.name,
        site=server.site,
        state=server.state,
        registered_at=timestamp(server.registered_at),
        last_heartbeat_at=timestamp(server.last_heartbeat_at),
        certificate_not_after=timestamp(server.cert_not_after),
        connected_since=timestamp(server.connected_since if server.connected else None),
        agent_version=server.agent_version,
        cloud=server.cloud,
    )
    json_format.ParseDict(
        json.loads(server.facts_json or "{}"), msg.facts, ignore_unknown_fields=True
    )
    json_format.ParseDict(
        json.loads(server.metrics_json or "{}"), msg.metrics, ignore_unknown_fields=True
    )
    if inventory is not None:
        inv = common_pb2.Inventory()
        inv.ParseFromString(inventory.payload)
        msg.vm_count = len(inv.vms)
        if with_inventory:
            msg.inventory.CopyFrom(inv)
    return msg


def job_to_proto(job: Job) -> admin_pb2.Job:
    return admin_pb2.Job(
        id=job.id,
        kind=job.kind,
        target=job.target,
        state=job.state.value,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        finished_at=timestamp(job.finished_at),
        error=job.error,
        created_by=job.created_by,
        result_json=job.result_json,
        steps=[
            admin_pb2.JobStep(
                index=s.index,
                name=s.name,
                state=s.state.value,
                started_at=timestamp(s.started_at),
                finished_at=timestamp(s.finished_at),
                message=s.message,
                progress_done=s.progress_done,
                progress_total=s.progress_total,
            )
            for s in job.steps
        ],
    )
