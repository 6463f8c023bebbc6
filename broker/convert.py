"""Store dataclasses to protobuf messages, for the admin API (protobuf lives at the edges).

What agents reported is bounded on arrival (:mod:`broker.bounds`), but a broker older than those
bounds may have stored more: :func:`server_to_proto` leaves out facts, metrics or an inventory
stored over their caps (or unreadable) and names them in ``Server.withheld``, so one host's
stored data can never make a response too big to send.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from broker import bounds
from broker.documents import StoredStatus, Verification
from broker.policy import Policy, validate
from broker.store.models import Job, RegistrationKey, Relationship, Server, StoredInventory
from sitepair.protoconv import seconds, timestamp
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
    server: Server,
    inventory: StoredInventory | None = None,
    *,
    with_inventory: bool = False,
    vm_count: int | None = None,
) -> admin_pb2.Server:
    """The admin view of a server. ``vm_count`` comes from the inventory tables when given;
    otherwise it is counted in ``inventory``."""
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
        clock_offset_seconds=server.clock_offset or 0.0,
        withheld=server.withheld,
    )
    for name, text, cap, target in (
        ("facts", server.facts_json, bounds.MAX_STORED_FACTS, msg.facts),
        ("metrics", server.metrics_json, bounds.MAX_STORED_METRICS, msg.metrics),
    ):
        if name in server.withheld:
            continue
        if len(text or "") > cap or not _parse_json_into(text or "{}", target):
            target.Clear()
            msg.withheld.append(name)
    if vm_count is not None:
        msg.vm_count = vm_count
    if inventory is not None and (with_inventory or vm_count is None):
        inv = common_pb2.Inventory()
        try:
            if len(inventory.payload) > bounds.MAX_STORED_INVENTORY:
                raise ValueError("over the cap")
            inv.ParseFromString(inventory.payload)
        except (ValueError, DecodeError):
            msg.withheld.append("inventory")
        else:
            msg.vm_count = len(inv.vms) if vm_count is None else vm_count
            if with_inventory:
                msg.inventory.CopyFrom(inv)
    return msg


def _parse_json_into(text: str, target: Any) -> bool:
    try:
        json_format.ParseDict(json.loads(text), target, ignore_unknown_fields=True)
    except (ValueError, TypeError, AttributeError, json_format.ParseError):
        return False
    return True


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


# -- protection ---------------------------------------------------------------------------------


def policy_to_proto(p: Policy) -> admin_pb2.Policy:
    return admin_pb2.Policy(
        copy_frequency_seconds=p.copy_frequency,
        recovery_points=p.recovery_points,
        app_consistent_hours=p.app_consistent_hours,
        compression=p.compression,
        authentication=p.authentication,
        port=p.effective_port,
        initial_method=p.initial_method,
        initial_at=timestamp(p.initial_at) if p.initial_at else None,
        export_path=p.export_path,
        import_path=p.import_path,
        delete_replica_on_disable=p.delete_replica_on_disable,
        bandwidth_limit=p.bandwidth_limit,
    )


def policy_from_proto(msg: admin_pb2.Policy) -> Policy:
    """The policy a request asks for; the copy frequency, authentication and initial method
    default to the policy defaults when unset (the CLI always sends every field)."""
    d = Policy()
    return validate(
        Policy(
            copy_frequency=msg.copy_frequency_seconds or d.copy_frequency,
            recovery_points=msg.recovery_points,
            app_consistent_hours=msg.app_consistent_hours,
            compression=msg.compression,
            authentication=msg.authentication or d.authentication,
            port=msg.port,
            initial_method=msg.initial_method or d.initial_method,
            initial_at=seconds(msg.initial_at) if msg.HasField("initial_at") else 0.0,
            export_path=msg.export_path,
            import_path=msg.import_path,
            delete_replica_on_disable=msg.delete_replica_on_disable,
            bandwidth_limit=msg.bandwidth_limit,
        )
    )


def relationship_to_proto(r: Relationship, names: dict[str, str]) -> admin_pb2.ProtectedVm:
    msg = admin_pb2.ProtectedVm(
        relationship_id=r.id,
        vm_id=r.vm_id,
        vm_name=r.vm_name,
        primary_cloud=r.primary_cloud,
        recovery_cloud=r.recovery_cloud,
        primary_server=names.get(r.primary_server, r.primary_server),
        replica_server=names.get(r.replica_server, r.replica_server),
        state=r.state.value,
        health=r.health,
        reasons=[admin_pb2.HealthReason(**x) for x in json.loads(r.health_reasons_json or "[]")],
        epoch=r.epoch,
        paused=r.paused,
        policy=policy_to_proto(Policy.from_json(r.policy_json)),
        created_at=timestamp(r.created_at),
        replica_folder=r.replica_folder,
        failover_json=r.failover_json,
    )
    for field, text in (
        ("primary_status", r.primary_status_json),
        ("replica_status", r.replica_status_json),
    ):
        stored = StoredStatus.decode(text)
        if stored is not None:
            getattr(msg, field).CopyFrom(stored.status)
    verify = Verification.decode(r.verify_json)
    if verify.at:
        msg.last_verification.CopyFrom(
            admin_pb2.Verification(
                at=timestamp(verify.at),
                job_id=verify.job_id,
                sequence=verify.sequence,
                mismatched_bytes=verify.mismatched_bytes,
                repaired=verify.repaired,
                by=verify.by,
            )
        )
    return msg
