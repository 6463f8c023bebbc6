"""The statuses an agent reports to the broker: one ``RelationshipStatus`` per relationship.

As primary, a relationship's statistics and the state its engine reports
(:meth:`~agent.replication.stats.Stats.reported`); as replica, what its replica store holds:
STATE_WAITING_FOR_INITIAL before the first commit, STATE_REPLICA after, STATE_REPLICA_ERROR
when the store cannot be read.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.replication.engine import SourceRelationship
from agent.replication.receiver import ReplicaRegistry
from agent.replication.state import ReplicationState, SenderState
from sitepair.errors import SitepairError
from sitepair.protoconv import timestamp
from sitepair.v1 import control_pb2


def replication_report(
    sources: Sequence[SourceRelationship], state: ReplicationState, registry: ReplicaRegistry
) -> control_pb2.ReplicationReport:
    """The status of each source relationship in ``sources`` and of each replica this host
    holds (blocking: it reads the state store and the replica stores)."""
    out = control_pb2.ReplicationReport()
    for rel in sources:
        rel_id = rel.relationship
        st = rel.stats
        found = state.source(rel_id)
        sender = found[1] if found is not None else SenderState()
        out.relationships.add(
            relationship_id=rel_id,
            role=control_pb2.ROLE_PRIMARY,
            vm_id=rel.config.vm_id,
            state=rel.reported_state(sender),
            epoch=rel.config.epoch,
            committed_sequence=st.committed_sequence,
            cycles_succeeded=st.cycles_succeeded,
            cycles_failed=st.cycles_failed,
            cycles_missed=st.cycles_missed,
            last_success_at=timestamp(st.last_success_at) if st.last_success_at else None,
            last_cycle_seconds=st.last_cycle_seconds,
            avg_cycle_seconds=st.avg_cycle_seconds,
            max_cycle_seconds=st.max_cycle_seconds,
            last_cycle_bytes=st.last_cycle_bytes,
            avg_cycle_bytes=int(st.avg_cycle_bytes),
            max_cycle_bytes=st.max_cycle_bytes,
            progress_done=st.progress_done,
            progress_total=st.progress_total,
            last_error=st.last_error,
            last_error_code=st.last_error_code,
            app_consistent_error=st.last_app_consistent_error,
            app_consistent_failures=st.app_consistent_failures,
            last_cut_at=timestamp(st.last_cut_at) if st.last_cut_at else None,
            paused=sender.paused,
        )
    for grant in state.grants():
        try:
            store = registry.store(grant)
        except SitepairError as exc:
            out.relationships.add(
                relationship_id=grant.relationship,
                role=control_pb2.ROLE_REPLICA,
                state=control_pb2.STATE_REPLICA_ERROR,
                last_error=str(exc),
            )
            continue
        s = store.state
        status = out.relationships.add(
            relationship_id=grant.relationship,
            role=control_pb2.ROLE_REPLICA,
            vm_id=grant.vm_id,
            state=control_pb2.STATE_REPLICA
            if s.committed_sequence
            else control_pb2.STATE_WAITING_FOR_INITIAL,
            epoch=max(s.epoch, grant.epoch),
            committed_sequence=s.committed_sequence,
            last_success_at=timestamp(s.committed_at) if s.committed_at else None,
            last_cut_at=timestamp(s.cut_at) if s.cut_at else None,
        )
        for p in s.points:
            status.points.add(
                sequence=p.sequence,
                cut_at=timestamp(p.cut_at),
                app_consistent=p.app_consistent,
                pinned=bool(p.pins),
            )
    return out
