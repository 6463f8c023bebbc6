"""The agent's Prometheus metrics: its cycles as they end, the bytes it sends and receives.

(Not to be confused with :mod:`agent.metrics`, the host's CPU and memory sampled for the
heartbeat.) Cycle durations, bytes and failures are events: :class:`AgentMetrics` is the
:class:`~agent.replication.stats.CycleObserver` of every source relationship and of the replica
receiver, and counts them as they happen. Counters start at zero when the agent starts;
Prometheus's ``rate()`` and ``increase()`` are made for such resets.

What a relationship is doing now (bytes its running cycle has left, whether it owes a resync or
is paused) and the agent's certificate are read at scrape time from the runners, the state store
and the identity, so they are never stale. The broker's metrics show the same per VM from the
statuses agents report; these are for watching one host. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.identity import AgentIdentity
from agent.replication import codes
from agent.replication.engine import KIND_NAMES
from agent.replication.service import ReplicationService
from agent.replication.stats import CycleObserver
from sitepair.metrics import MetricsConfig, MetricsServer
from sitepair.v1 import replication_pb2

#: Cycles take from a second (a small delta) to many hours (an initial copy).
CYCLE_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


def kind_name(kind: replication_pb2.CycleKind.ValueType) -> str:
    return KIND_NAMES.get(kind, f"kind-{int(kind)}")


def _code_names() -> list[str]:
    return [
        codes.code_name(v)
        for v in replication_pb2.ErrorCode.values()
        if v != replication_pb2.ERROR_NONE
    ]


class AgentMetrics(CycleObserver):
    """The agent's registry and, when ``[metrics] enabled``, its endpoint."""

    def __init__(
        self, replication: ReplicationService, identity: Callable[[], AgentIdentity]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.cycle_seconds = Histogram(
            "sitepair_agent_cycle_duration_seconds",
            "Time a committed cycle took, by kind (initial, delta, resync, final).",
            labelnames=("kind",),
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.sent_wire = Counter(
            "sitepair_agent_sent_wire_bytes",
            "Bytes committed cycles sent on the network (after compression).",
            registry=r,
        )
        self.sent_guest = Counter(
            "sitepair_agent_sent_guest_bytes",
            "Bytes of disk data committed cycles carried (before compression).",
            registry=r,
        )
        self.failed = Counter(
            "sitepair_agent_cycles_failed",
            "Cycles that failed for good (after their retries), by error code.",
            labelnames=("code",),
            registry=r,
        )
        self.resyncs = Counter(
            "sitepair_agent_resyncs",
            "Resynchronization cycles committed, by source relationship.",
            labelnames=("relationship",),
            registry=r,
        )
        self.received_wire = Counter(
            "sitepair_agent_received_wire_bytes",
            "Replica side: bytes of block batches received from primaries.",
            registry=r,
        )
        self.applied = Counter(
            "sitepair_agent_applied_bytes",
            "Replica side: bytes committed cycles wrote to replica disks.",
            registry=r,
        )
        self.replica_cycles = Counter(
            "sitepair_agent_replica_cycles",
            "Replica side: cycles committed, by kind.",
            labelnames=("kind",),
            registry=r,
        )
        for name in KIND_NAMES.values():  # every series present from the start, at zero
            self.cycle_seconds.labels(name)
            self.replica_cycles.labels(name)
        for name in _code_names():
            self.failed.labels(name)
        r.register(_NowCollector(replication, identity))
        replication.runners.observer = self
        for servicer in replication.receiver.servicers.values():
            servicer.observer = self
        self.server: MetricsServer | None = None

    # -- CycleObserver (called from cycle threads; prometheus_client is thread-safe) --------
    def cycle_committed(
        self,
        relationship: str,
        kind: replication_pb2.CycleKind.ValueType,
        seconds: float,
        guest: int,
        wire: int,
    ) -> None:
        self.cycle_seconds.labels(kind_name(kind)).observe(seconds)
        self.sent_guest.inc(guest)
        self.sent_wire.inc(wire)
        if kind == replication_pb2.RESYNC:
            self.resyncs.labels(relationship).inc()

    def cycle_failed(self, code: codes.ErrorCode) -> None:
        self.failed.labels(codes.code_name(code) or "none").inc()

    def batch_received(self, wire: int) -> None:
        self.received_wire.inc(wire)

    def cycle_applied(self, kind: replication_pb2.CycleKind.ValueType, applied: int) -> None:
        self.applied.inc(applied)
        self.replica_cycles.labels(kind_name(kind)).inc()

    # -- endpoint ---------------------------------------------------------------------------
    def serve(self, config: MetricsConfig, base: Path) -> str:
        """Start the endpoint (blocking while it binds); returns the bound address."""
        self.server = MetricsServer(config, self.registry, base=base)
        return self.server.start()

    def shutdown(self) -> None:
        """Stop the endpoint (idempotent; blocking)."""
        if self.server is not None:
            self.server.shutdown()


class _NowCollector(Collector):
    """What the source relationships are doing now, and the agent's certificate."""

    def __init__(
        self, replication: ReplicationService, identity: Callable[[], AgentIdentity]
    ) -> None:
        self.replication = replication
        self.identity = identity

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ("relationship", "vm_id")
        pending = GaugeMetricFamily(
            "sitepair_agent_pending_bytes",
            "Bytes the running cycle of a source relationship has still to send.",
            labels=labels,
        )
        resync = GaugeMetricFamily(
            "sitepair_agent_resync_needed",
            "1 while a source relationship's change tracking is lost (its next cycle resyncs).",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "sitepair_agent_replication_paused",
            "1 while an operator has paused a source relationship.",
            labels=labels,
        )
        state = self.replication.state
        for rel in list(self.replication.sources.values()):
            key = (rel.relationship, rel.config.vm_id)
            st = rel.stats
            pending.add_metric(key, max(0, st.progress_total - st.progress_done))
            found = state.source(rel.relationship)
            sender = found[1] if found is not None else None
            resync.add_metric(key, 1 if sender is not None and sender.needs_resync else 0)
            paused.add_metric(key, 1 if sender is not None and sender.paused else 0)
        yield from (pending, resync, paused)
        ident = self.identity()
        expiry = GaugeMetricFamily(
            "sitepair_certificate_expiry_timestamp_seconds",
            "When this host's certificate expires (unix seconds); renewed at half life.",
            labels=("server", "site"),
        )
        expiry.add_metric((ident.name, ident.site), ident.not_after)
        yield expiry
