"""Replication health of a protected VM: Normal, Warning or Critical, with reasons to act on.

Evaluated from what the broker knows: the relationship's state, the latest status reports of
its primary and replica hosts, whether those hosts are connected, and their certificates. Each
reason names the problem and what to do; the health is the worst reason's level.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence

from broker.documents import ErrorCode, StoredStatus, Verification
from broker.policy import Policy
from broker.store.models import (
    Drill,
    DrillState,
    RecoveryPlan,
    Relationship,
    RelationshipState,
    Server,
)
from sitepair.v1 import control_pb2

NORMAL, WARNING, CRITICAL = "normal", "warning", "critical"
_LEVEL = {NORMAL: 0, WARNING: 1, CRITICAL: 2}


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    #: Warning when the last successful cycle is older than this many copy intervals...
    lag_warning_cycles: float = 3.0
    #: ...and Critical beyond this many.
    lag_critical_cycles: float = 12.0
    #: A host offline turns the VM Warning at once and Critical after this long (seconds).
    offline_critical_after: float = 300.0
    #: Warning when more than this fraction of cycles were missed within the window.
    missed_rate_warning: float = 0.2
    #: The monitoring window for the missed-cycle rate (seconds).
    window: float = 3600.0
    #: Warning when less than this fraction of a host certificate's life remains.
    certificate_warning_fraction: float = 0.25
    #: Warning when a host's clock is further than this from the broker's (seconds)...
    clock_skew_warning: float = 60.0
    #: ...and Critical beyond this: replication tickets allow 300 s, certificates are backdated
    #: 5 minutes, so past this point authentication starts to fail.
    clock_skew_critical: float = 240.0


@dataclasses.dataclass(frozen=True)
class Reason:
    level: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class CycleHistory:
    """Cumulative cycle counters reported over time, to compute rates within a window.

    Only relationships the broker holds have samples: the caller adds a relationship's samples
    only from the host that is its primary, and :meth:`retain` drops those of relationships
    that were disabled or deleted since.
    """

    def __init__(self) -> None:
        self._samples: dict[str, collections.deque[tuple[float, int, int, int]]] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, rel_id: object) -> bool:
        return rel_id in self._samples

    def forget(self, rel_id: str) -> None:
        self._samples.pop(rel_id, None)

    def retain(self, rel_ids: Iterable[str]) -> None:
        """Keep the samples of ``rel_ids`` only."""
        keep = set(rel_ids)
        for rel_id in [r for r in self._samples if r not in keep]:
            del self._samples[rel_id]

    def add(self, rel_id: str, now: float, succeeded: int, missed: int, failed: int) -> None:
        q = self._samples.setdefault(rel_id, collections.deque(maxlen=10_000))
        if q and (succeeded < q[-1][1] or missed < q[-1][2] or failed < q[-1][3]):
            q.clear()  # the agent restarted and its counters started over
        q.append((now, succeeded, missed, failed))

    def missed_rate(self, rel_id: str, now: float, window: float) -> float:
        q = self._samples.get(rel_id)
        if not q:
            return 0.0
        while len(q) > 1 and q[1][0] <= now - window:
            q.popleft()
        first, last = q[0], q[-1]
        succeeded = last[1] - first[1]
        missed = last[2] - first[2]
        failed = last[3] - first[3]
        total = succeeded + missed + failed
        return missed / total if total else 0.0


def drill_reasons(
    last_drills: Mapping[str, tuple[Drill, float]], plans: Iterable[RecoveryPlan]
) -> dict[str, list[Reason]]:
    """Relationship id -> a Warning for each plan it is in whose last drill failed (a passing
    drill of the plan clears it; a skipped drill changes nothing)."""
    out: dict[str, list[Reason]] = {}
    for plan in plans:
        last = last_drills.get(plan.name)
        if last is None or last[0].state != DrillState.FAILED:
            continue
        drill = last[0]
        reason = Reason(
            WARNING,
            "drill-failed",
            f"the last drill of recovery plan {plan.name} ({drill.id}) failed: "
            f"{drill.reason[:300]}; see `plans drill-show {drill.id}`, fix it, then "
            f"`plans drill {plan.name}` (a passing drill clears this)",
        )
        doc = json.loads(plan.doc_json)
        for group in doc.get("groups", []):
            for rel_id in group.get("vms", []):
                out.setdefault(rel_id, []).append(reason)
    return out


def evaluate(
    rel: Relationship,
    *,
    primary: Server | None,
    replica: Server | None,
    now: float,
    config: HealthConfig,
    history: CycleHistory,
    agent_lifetime: float,
    drills: Sequence[Reason] = (),
) -> tuple[str, list[Reason]]:
    """``drills``: the relationship's failed drills (:func:`drill_reasons`)."""
    reasons: list[Reason] = []
    policy = Policy.from_json(rel.policy_json)
    stored = StoredStatus.decode(rel.primary_status_json)
    status = stored.status if stored is not None else control_pb2.RelationshipStatus()
    state = rel.state
    if state == RelationshipState.DISABLED:
        return NORMAL, []
    reasons.extend(drills)
    if state == RelationshipState.COMMITTED:
        reasons.append(
            Reason(
                WARNING,
                "not-replicating",
                "failed over and committed, but nothing replicates: the VM is unprotected; "
                f"replicate back with `vms reverse {rel.vm_name}`, or disable protection and "
                "protect it again",
            )
        )

    if state in (RelationshipState.ENABLING, RelationshipState.INITIAL_REPLICATION):
        done, total = status.progress_done, status.progress_total
        progress = f" ({100 * done // total}% of {total >> 20} MiB)" if total else ""
        reasons.append(
            Reason(
                WARNING,
                "initial-replication-pending",
                f"initial replication has not completed{progress}",
            )
        )
    # The primary's STATE_RESYNC_REQUIRED moves a protected relationship to RESYNC_REQUIRED
    # (broker.reports); not a relationship still being set up or reversed, whose first cycle is
    # a resync by design.
    if state == RelationshipState.RESYNC_REQUIRED:
        reasons.append(
            Reason(
                CRITICAL,
                "resync-required",
                "change tracking was lost; a resynchronization is required "
                "(it runs by itself, or use `vms resync`)",
            )
        )
    if rel.paused:
        reasons.append(
            Reason(
                WARNING, "paused", "replication is paused by an operator (`vms resume` restarts it)"
            )
        )

    for role, server in (("primary", primary), ("replica", replica)):
        if server is None:
            reasons.append(
                Reason(CRITICAL, f"{role}-host-missing", f"the {role} host is no longer registered")
            )
            continue
        if server.removed_at is not None:
            # The relationship keeps its state (a replica whose primary was removed is what an
            # unplanned failover needs); every other host refuses the removed one's cycles.
            todo = (
                "fail the VM over (unplanned) to the recovery site, or disable its protection"
                if role == "primary"
                else "disable protection and protect the VM again: another replica host is chosen"
            )
            reasons.append(
                Reason(
                    CRITICAL,
                    f"{role}-host-removed",
                    f"the {role} host {server.name} was removed from the vault and no longer "
                    f"replicates: {todo}",
                )
            )
        elif not server.connected:
            since = server.disconnected_at or server.last_heartbeat_at or now
            away = now - since
            level = CRITICAL if away >= config.offline_critical_after else WARNING
            reasons.append(
                Reason(
                    level,
                    f"{role}-host-offline",
                    f"the {role} host {server.name} has been offline for {int(away)} s",
                )
            )
        offset = server.clock_offset
        if server.connected and offset is not None and abs(offset) > config.clock_skew_warning:
            level = CRITICAL if abs(offset) > config.clock_skew_critical else WARNING
            direction = "ahead of" if offset > 0 else "behind"
            reasons.append(
                Reason(
                    level,
                    f"{role}-host-clock",
                    f"the clock of {server.name} is {abs(offset):.0f} s {direction} the "
                    "broker's; replication tickets and certificates fail beyond "
                    f"{config.clock_skew_critical:.0f} s: fix the host's time synchronization "
                    "(NTP)",
                )
            )
        left = server.cert_not_after - now
        if left < agent_lifetime * config.certificate_warning_fraction:
            reasons.append(
                Reason(
                    WARNING,
                    "certificate-near-expiry",
                    f"the certificate of {server.name} expires in {int(max(left, 0))} s "
                    "and was not renewed: "
                    "check that the agent reaches the broker",
                )
            )

    replicating = state in (
        RelationshipState.PROTECTED,
        RelationshipState.RESYNCHRONIZING,
        RelationshipState.RESYNC_REQUIRED,
        RelationshipState.REVERSE_REPLICATING,
        RelationshipState.FAILED_OVER_TEST,
    )
    if replicating and not rel.paused:
        last = (stored.last_success_at if stored is not None else None) or 0.0
        lag = now - last if last else now - rel.updated_at
        interval = policy.copy_frequency
        if lag > interval * config.lag_critical_cycles:
            reasons.append(
                Reason(
                    CRITICAL,
                    "no-recent-cycle",
                    f"no successful cycle for {int(lag)} s (copy frequency {interval} s)",
                )
            )
        elif lag > interval * config.lag_warning_cycles:
            reasons.append(
                Reason(
                    WARNING,
                    "no-recent-cycle",
                    f"no successful cycle for {int(lag)} s (copy frequency {interval} s)",
                )
            )
        rate = history.missed_rate(rel.id, now, config.window)
        if rate > config.missed_rate_warning:
            reasons.append(
                Reason(
                    WARNING,
                    "missed-cycles",
                    f"{rate:.0%} of cycles were missed in the last {int(config.window)} s "
                    f"(more than {config.missed_rate_warning:.0%})",
                )
            )
    if replicating:
        # Even while paused: the last attempt's outcome is still true of the replica.
        code = status.last_error_code
        if code == ErrorCode.ERROR_DISK_FULL:
            where = rel.replica_folder or "its replica folder"
            name = replica.name if replica is not None else "the replica host"
            reasons.append(
                Reason(
                    CRITICAL,
                    "replica-disk-full",
                    f"{name} has no room for cycles in {where} (the last good point is kept); "
                    "free space there and replication resumes by itself",
                )
            )
        elif (
            code == ErrorCode.ERROR_STALE_EPOCH
            or status.state == control_pb2.ReplicationState.STATE_FENCED
        ):
            reasons.append(
                Reason(
                    CRITICAL,
                    "fenced",
                    "the primary host was fenced: it replicates an epoch older than the replica's",
                )
            )
    app_error = status.app_consistent_error
    if replicating and app_error and policy.app_consistent_hours:
        reasons.append(
            Reason(
                WARNING,
                "app-consistent-failing",
                f"the last application-consistent cut failed ({app_error[:300]}); recovery "
                "points are crash-consistent until the guest can be quiesced",
            )
        )
    verify = Verification.decode(rel.verify_json)
    if verify.mismatched_bytes:
        seq, n = verify.sequence, verify.mismatched_bytes
        if verify.repaired:
            reasons.append(
                Reason(
                    WARNING,
                    "replica-mismatch-repaired",
                    f"the last verification (sequence {seq}) found {n} bytes on the replica that "
                    "differed from the source and sent them again; check the replica host's "
                    "storage, then `vms verify` to clear this",
                )
            )
        else:
            reasons.append(
                Reason(
                    CRITICAL,
                    "replica-mismatch",
                    f"the last verification (sequence {seq}) found {n} bytes on the replica that "
                    "differ from the source and did not repair them; a failover now would not "
                    "be byte-exact: run `vms verify` (it repairs by default)",
                )
            )
    worst = max((r.level for r in reasons), key=lambda lv: _LEVEL[lv], default=NORMAL)
    return worst, reasons
