"""What the store returns: plain frozen dataclasses, never rows or protobuf messages."""

from __future__ import annotations

import dataclasses
import enum


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # waiting for an operator (a manual action) or for an agent to return
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class StepState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class CommandState(enum.StrEnum):
    PENDING = "pending"  # stored, not yet handed to a connected agent
    DELIVERED = "delivered"  # written to the agent's stream; redelivered until acknowledged
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def open(self) -> bool:
        return self in (CommandState.PENDING, CommandState.DELIVERED)


@dataclasses.dataclass(frozen=True)
class RegistrationKey:
    id: str
    site: str
    secret_hash: bytes
    created_at: float
    expires_at: float
    uses_total: int
    uses_remaining: int
    revoked_at: float | None
    created_by: str

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.uses_remaining <= 0:
            return "used up"
        if now >= self.expires_at:
            return "expired"
        return "active"


@dataclasses.dataclass(frozen=True)
class Server:
    id: str
    name: str
    site: str
    registered_at: float
    registration_key_id: str
    cert_serial: str
    cert_not_after: float
    facts_json: str = "{}"
    agent_version: str = ""
    cloud: str = ""
    connected: bool = False
    connected_since: float | None = None
    disconnected_at: float | None = None
    last_heartbeat_at: float | None = None
    last_heartbeat_sent_at: float | None = None
    last_heartbeat_seq: int | None = None
    metrics_json: str = "{}"
    removed_at: float | None = None
    #: Columns a page query left out (read as "") because their stored value is over the
    #: broker's cap: ``facts``, ``metrics`` (see :mod:`broker.bounds`).
    withheld: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        if self.removed_at is not None:
            return "removed"
        return "connected" if self.connected else "disconnected"

    @property
    def clock_offset(self) -> float | None:
        """How far the host's clock is ahead of the broker's (negative: behind), from the last
        heartbeat: its send time by the host's clock minus its arrival by the broker's. Network
        delay makes it read a little low; seconds of error, not minutes."""
        if self.last_heartbeat_sent_at is None or self.last_heartbeat_at is None:
            return None
        return self.last_heartbeat_sent_at - self.last_heartbeat_at


@dataclasses.dataclass(frozen=True)
class StoredInventory:
    server_id: str
    digest: str
    collected_at: float
    received_at: float
    payload: bytes


@dataclasses.dataclass(frozen=True)
class Operator:
    id: str
    name: str
    created_at: float
    cert_serial: str
    cert_not_after: float
    removed_at: float | None = None


@dataclasses.dataclass(frozen=True)
class JobStep:
    job_id: str
    index: int
    name: str
    state: StepState
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""
    progress_done: int = 0
    progress_total: int = 0


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    kind: str
    target: str
    state: JobState
    created_at: float
    updated_at: float
    created_by: str
    finished_at: float | None = None
    error: str = ""
    params_json: str = "{}"
    result_json: str = ""
    steps: tuple[JobStep, ...] = ()
    #: The broker running the job (its id in the ``brokers`` table); "" before anyone claimed it.
    owner: str = ""


@dataclasses.dataclass(frozen=True)
class Command:
    id: str
    server_id: str
    kind: str
    payload: bytes
    state: CommandState
    created_at: float
    delivered_at: float | None = None
    deliveries: int = 0
    completed_at: float | None = None
    result_json: str = ""
    error: str = ""
    job_id: str | None = None
    job_step: int | None = None
    #: The name of the job step that sent it (the key a resumed job finds it by).
    job_step_name: str = ""


@dataclasses.dataclass(frozen=True)
class BrokerMember:
    """A broker using the store, as its lease row says (times are the store's clock)."""

    id: str
    description: str
    started_at: float
    expires_at: float


@dataclasses.dataclass(frozen=True)
class HeartbeatRecord:
    """One heartbeat, as the batched writer stores it."""

    server_id: str
    seq: int
    sent_at: float
    received_at: float
    metrics_json: str


# -- protection management ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InventoryVm:
    server_id: str
    vm_id: str
    name: str
    generation: int
    cpu_count: int
    memory_mb: int
    state: str
    disks_json: str
    nics_json: str
    updated_at: float
    #: Columns a page query left out (read as "[]") because their stored value is over the
    #: broker's cap: ``disks``, ``nics`` (see :mod:`broker.bounds`).
    withheld: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HostStorage:
    server_id: str
    name: str
    path: str
    total_bytes: int
    free_bytes: int


@dataclasses.dataclass(frozen=True)
class Cloud:
    name: str
    site: str
    description: str
    created_at: float


@dataclasses.dataclass(frozen=True)
class CloudPair:
    primary_cloud: str
    recovery_cloud: str
    policy_json: str
    created_at: float
    updated_at: float


@dataclasses.dataclass(frozen=True)
class Mapping:
    source: str
    target: str
    created_at: float


class RelationshipState(enum.StrEnum):
    ENABLING = "enabling"
    INITIAL_REPLICATION = "initial-replication"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync-required"
    RESYNCHRONIZING = "resynchronizing"
    FAILOVER_IN_PROGRESS = "failover-in-progress"
    FAILED_OVER_TEST = "failed-over-test"
    FAILED_OVER_PLANNED = "failed-over-planned"
    FAILED_OVER_UNPLANNED = "failed-over-unplanned"
    COMMITTED = "committed"
    REVERSE_REPLICATING = "reverse-replicating"
    DISABLED = "disabled"


@dataclasses.dataclass(frozen=True)
class Relationship:
    id: str
    vm_id: str
    vm_name: str
    primary_cloud: str
    recovery_cloud: str
    primary_server: str
    replica_server: str
    state: RelationshipState
    epoch: int
    policy_json: str
    replica_folder: str = ""
    replica_vm_json: str = "{}"
    primary_status_json: str = "{}"
    replica_status_json: str = "{}"
    health: str = "normal"
    health_reasons_json: str = "[]"
    paused: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    disabled_at: float | None = None
    failover_json: str = "{}"
    #: The last verification: at, job, sequence, mismatched_bytes, repaired, error.
    verify_json: str = "{}"


@dataclasses.dataclass(frozen=True)
class RecoveryPlan:
    name: str
    description: str
    doc_json: str
    created_at: float
    updated_at: float


class DrillState(enum.StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class Drill:
    """A disaster-recovery drill of a recovery plan (see :mod:`broker.drills`)."""

    id: str
    plan: str
    job_id: str
    state: DrillState
    reason: str
    started_by: str
    started_at: float
    finished_at: float | None
    #: What the drill found (:class:`broker.drills.Evidence`, as JSON).
    evidence_json: str = "{}"


@dataclasses.dataclass(frozen=True)
class DrillSchedule:
    """How often a plan is drilled, and when next (the leader broker's scheduler runs it)."""

    plan: str
    every_seconds: float
    next_at: float
    set_by: str
    updated_at: float


@dataclasses.dataclass(frozen=True)
class DashboardGrant:
    """A way into the web dashboard (:mod:`broker.web.logins`): a one-time login token, or the
    browser session it became. The store keeps only the hash of its secret, and the identity of
    the operator's certificate, which is authorised again on every use."""

    #: SHA-256 (hex) of the secret (the token, or the session cookie).
    id: str
    operator: str
    vault: str
    role: str
    site: str
    #: The operator certificate's serial number (hex) and expiry.
    cert_serial: str
    cert_not_after: float
    created_at: float
    expires_at: float
