"""The commands that set up replication on the agents, built from a relationship.

A replica host gets a grant (:func:`configure_replica`): from which host, how authenticated,
and the VM's disks as the broker's inventory knows them; a primary host gets where to replicate
and how (:func:`configure_source`). Protection, failover (cancel, reverse) and a policy change
all send the same two, built here. :class:`AgentCommands` binds what they need besides the
relationship: the ticket public key the replica host checks tickets with, and the replica
host's advertised endpoint from the store.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.documents import ProtectedVm, decode_facts
from broker.orchestration import StepFailed
from broker.policy import Policy
from broker.store.base import Store
from broker.store.models import Relationship, RelationshipState, Server
from sitepair import addresses, tickets
from sitepair.protoconv import timestamp
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.agent_commands")

#: States in which the primary replicates to the replica (a test failover leaves it running):
#: the hosts of such a relationship hold its commands, and get them again when its policy or
#: the replica host's address changes.
REPLICATING = (
    RelationshipState.INITIAL_REPLICATION,
    RelationshipState.PROTECTED,
    RelationshipState.RESYNC_REQUIRED,
    RelationshipState.RESYNCHRONIZING,
    RelationshipState.FAILED_OVER_TEST,
)

_AUTH_MODES = {
    "certificate": control_pb2.AUTH_CERTIFICATE,
    "ticket": control_pb2.AUTH_TICKET,
}
_INITIAL_METHODS = {
    "network": control_pb2.InitialReplication.NETWORK,
    "scheduled": control_pb2.InitialReplication.SCHEDULED,
    "offline": control_pb2.InitialReplication.OFFLINE,
}


class AgentCommands:
    """Builds the replication commands of a relationship (see the module docstring)."""

    def __init__(self, *, store: Store, ticket_key: ed25519.Ed25519PrivateKey) -> None:
        self._store = store
        self._ticket_public_key = tickets.public_key_bytes(ticket_key)

    def configure_replica(self, rel: Relationship) -> control_pb2.Command:
        return configure_replica(rel, ticket_public_key=self._ticket_public_key)

    async def configure_source(self, rel: Relationship) -> control_pb2.Command:
        """The primary's command, to the replica host's endpoint as it reports it now."""
        replica = await self._store.reading(lambda tx: tx.get_server(rel.replica_server))
        if replica is None:
            raise StepFailed(f"the replica host {rel.replica_server} is not registered")
        return configure_source(rel, replica)


def configure_replica(rel: Relationship, *, ticket_public_key: bytes) -> control_pb2.Command:
    """The replica host's grant: from which host, how authenticated, and the VM's disks as
    the broker's inventory knows them (the only disk ids its cycles may name)."""
    policy = Policy.from_json(rel.policy_json)
    replica_vm = ProtectedVm.decode(rel.replica_vm_json)
    return control_pb2.Command(
        configure_replica=control_pb2.ConfigureReplica(
            relationship_id=rel.id,
            vm_id=rel.vm_id,
            vm_name=rel.vm_name,
            source_host=rel.primary_server,
            epoch=rel.epoch,
            folder=rel.replica_folder,
            auth=auth_mode(policy.authentication),
            ticket_public_key=ticket_public_key,
            recovery_points=policy.recovery_points,
            point_interval_seconds=3600,
            adopt=replica_vm.adopt,
            disks=granted_disks(replica_vm),
        )
    )


def configure_source(rel: Relationship, replica: Server) -> control_pb2.Command:
    """The primary host's command: replicate ``rel`` to ``replica``, as the policy says."""
    policy = Policy.from_json(rel.policy_json)
    host, certificate_port, ticket_port = replication_endpoint(replica.facts_json)
    port = certificate_port if policy.authentication == "certificate" else ticket_port
    if policy.port and port != policy.port and port:
        log.info(
            "replica host listens on another port than the policy's",
            extra={"fields": {"host": replica.name, "policy_port": policy.port, "port": port}},
        )
    if not port:
        raise StepFailed(f"{replica.name} reports no {policy.authentication} replication listener")
    return control_pb2.Command(
        configure_source=control_pb2.ConfigureSource(
            relationship_id=rel.id,
            vm_id=rel.vm_id,
            replica_host=rel.replica_server,
            address=addresses.join(host, port),  # [v6]:port for an IPv6 address
            epoch=rel.epoch,
            auth=auth_mode(policy.authentication),
            compression=policy.compression,
            copy_frequency_seconds=policy.copy_frequency,
            app_consistent_interval_seconds=policy.app_consistent_hours * 3600,
            bandwidth_limit=policy.bandwidth_limit,
            initial=control_pb2.InitialReplication(
                method=_INITIAL_METHODS[policy.initial_method],
                start_at=timestamp(policy.initial_at) if policy.initial_at else None,
                export_path=policy.export_path,
            ),
            resync_first=ProtectedVm.decode(rel.replica_vm_json).adopt,
        )
    )


def auth_mode(authentication: str) -> control_pb2.AuthMode.ValueType:
    """The wire's name for a policy's authentication ("certificate" or "ticket")."""
    return _AUTH_MODES[authentication]


def replication_endpoint(facts_json: str) -> tuple[str, int, int]:
    """Where a host's receivers listen, from its facts: (host, certificate port, ticket port)."""
    facts = decode_facts(facts_json)
    return (
        facts.replication_host or "127.0.0.1",
        facts.certificate_port,
        facts.ticket_port,
    )


def granted_disks(replica_vm: ProtectedVm) -> list[control_pb2.GrantedDisk]:
    """The disks a replica host accepts for a VM, from the VM's inventory at protection."""
    return [
        control_pb2.GrantedDisk(disk_id=d.id, virtual_size=d.virtual_size, format=d.format)
        for d in replica_vm.disks
    ]
