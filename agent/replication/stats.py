"""What a source relationship reports: its statistics and state, a verify's and a final
cycle's outcome.

:class:`Stats` is kept by :class:`~agent.replication.engine.SourceRelationship` as its cycles
run and becomes the primary's ``RelationshipStatus``. Its ``state`` is what the last cycle
left; :meth:`Stats.reported` adds what the sender's recorded state says: paused, or
STATE_RESYNC_REQUIRED while change tracking is lost and no resync runs (the broker's
"resync-required").
"""

from __future__ import annotations

import dataclasses
from typing import TypeAlias

from agent.replication import codes
from agent.replication.state import SenderState
from sitepair.v1 import control_pb2, replication_pb2

State: TypeAlias = control_pb2.ReplicationState.ValueType

#: The states in which a relationship whose change tracking was lost reports
#: STATE_RESYNC_REQUIRED: no cycle is running (or one is about to find out it must resync).
_IDLE_STATES = (
    control_pb2.STATE_INITIAL_PENDING,
    control_pb2.STATE_REPLICATING,
    control_pb2.STATE_PROTECTED,
    control_pb2.STATE_RESYNC_REQUIRED,
)


@dataclasses.dataclass
class Stats:
    """What the broker shows per protected VM (and uses for health)."""

    state: State = control_pb2.STATE_INITIAL_PENDING
    cycles_succeeded: int = 0
    cycles_failed: int = 0
    cycles_missed: int = 0
    last_success_at: float = 0.0
    last_cut_at: float = 0.0
    last_error: str = ""
    last_error_code: codes.ErrorCode = replication_pb2.ERROR_NONE
    last_cycle_seconds: float = 0.0
    max_cycle_seconds: float = 0.0
    total_cycle_seconds: float = 0.0
    last_cycle_bytes: int = 0
    max_cycle_bytes: int = 0
    total_cycle_bytes: int = 0
    wire_bytes: int = 0
    progress_done: int = 0
    progress_total: int = 0
    committed_sequence: int = 0
    #: Application-consistent cuts the guest could not be quiesced for (a crash-consistent
    #: cycle ran instead), and the last reason.
    app_consistent_failures: int = 0
    last_app_consistent_error: str = ""

    @property
    def avg_cycle_seconds(self) -> float:
        return self.total_cycle_seconds / self.cycles_succeeded if self.cycles_succeeded else 0.0

    @property
    def avg_cycle_bytes(self) -> float:
        return self.total_cycle_bytes / self.cycles_succeeded if self.cycles_succeeded else 0.0

    def reported(self, sender: SenderState) -> State:
        """The state to report, given the sender's recorded state ``sender``: paused, or
        STATE_RESYNC_REQUIRED while change tracking is lost (``needs_resync``) and no cycle
        runs, or what the last cycle left in :attr:`state`."""
        if sender.paused:
            return control_pb2.STATE_PAUSED
        if sender.needs_resync and self.state in _IDLE_STATES:
            return control_pb2.STATE_RESYNC_REQUIRED
        return self.state


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    disks: dict[str, list[tuple[int, int]]]  # mismatching ranges per disk
    repaired: bool
    sequence: int

    @property
    def mismatched_bytes(self) -> int:
        return sum(length for ranges in self.disks.values() for _, length in ranges)


@dataclasses.dataclass(frozen=True)
class FinalCycleReport:
    """A final cycle and the comparison after it: the replica holds the VM's final state."""

    sequence: int  # what the replica holds
    final_bytes: int  # guest bytes the final cycle carried
    disks_compared: int


class CycleObserver:
    """Told of each cycle as it ends, for the agent's metrics (:mod:`agent.exporter`); this
    base class ignores everything, so replication runs the same without metrics. Called from
    the cycle's worker thread: an implementation must be thread-safe and must not block."""

    def cycle_committed(
        self,
        relationship: str,
        kind: replication_pb2.CycleKind.ValueType,
        seconds: float,
        guest: int,
        wire: int,
    ) -> None:
        """A cycle of ``kind`` of ``relationship`` committed on the replica after ``seconds``,
        having carried ``guest`` bytes of disk data in ``wire`` bytes on the network."""

    def cycle_failed(self, code: codes.ErrorCode) -> None:
        """A cycle failed for good (after its retries), for the reason ``code``."""

    def batch_received(self, wire: int) -> None:
        """Replica side: a batch of ``wire`` bytes arrived."""

    def cycle_applied(self, kind: replication_pb2.CycleKind.ValueType, applied: int) -> None:
        """Replica side: a cycle of ``kind`` committed, ``applied`` bytes written to the
        replica's disks."""


#: The observer of a relationship nobody measures.
NO_OBSERVER = CycleObserver()
