"""The broker's Prometheus metrics: protected VMs, hosts, jobs, drills, the store, control streams.

Most of what an operator watches is state the store holds: each relationship's last statuses
from its two hosts, health, verification, each host's certificate and connection, the jobs. Those
are read from the store at scrape time by :class:`StoreCollector`, in one read transaction, so a
scrape shows what ``vms list`` would show at that moment, the same on every broker sharing a
PostgreSQL store, and right after a broker restart (nothing to rebuild from events). The store
is the truth for them; counting events in this process would miss what the other brokers saw.

Two numbers exist only in this process, so they are kept as events happen: how long store
transactions take (:attr:`Store.on_transaction <broker.store.base.Store.on_transaction>` feeds a
histogram) and how many agents hold a control stream to this broker (read from the session
registry at scrape time). docs/metrics.md lists every metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker import documents, health
from broker.documents import StoredStatus, Verification
from broker.policy import Policy
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.models import (
    Drill,
    DrillState,
    JobState,
    Relationship,
    RelationshipState,
    Server,
)
from broker.store.repository import Tx
from sitepair.clock import Clock
from sitepair.errors import SitepairError
from sitepair.metrics import MetricsConfig, MetricsServer

#: ``sitepair_health``'s values, by the health the broker stores.
HEALTH_VALUES = {health.NORMAL: 0, health.WARNING: 1, health.CRITICAL: 2}

#: Store transactions take milliseconds on SQLite, tens of them on a remote PostgreSQL.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_VM = ("vm", "relationship")


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What one scrape reads from the store, in one transaction."""

    relationships: list[Relationship]
    servers: list[Server]
    jobs: dict[tuple[str, JobState], int]
    #: Each existing plan's last drill that ran, and when its last passing drill started.
    drills: dict[str, tuple[Drill, float]]


def _snapshot(tx: Tx) -> _Snapshot:
    plans = {p.name for p in tx.list_plans()}
    drills = {plan: last for plan, last in tx.last_drills().items() if plan in plans}
    return _Snapshot(tx.list_relationships(), tx.list_servers(), tx.job_counts(), drills)


def last_cut_at(rel: Relationship) -> float | None:
    """:func:`broker.documents.committed_cut_at` of ``rel``."""
    return documents.committed_cut_at(rel.replica_status_json, rel.primary_status_json)


def rpo_lag(rel: Relationship, cut_at: float | None, now: float) -> float:
    """Seconds of changes a failover now would lose: ``now`` minus the latest committed cut
    (:func:`last_cut_at`, passed in so a scrape decodes the statuses once; the same value as
    :func:`broker.documents.rpo_lag`); before the first point, everything since the VM was
    protected (the metric is always a number)."""
    return max(0.0, now - (cut_at if cut_at is not None else rel.created_at))


def _copy_frequency(rel: Relationship) -> float:
    try:
        return float(Policy.from_json(rel.policy_json).copy_frequency)
    except (ValueError, TypeError, SitepairError):
        return 0.0  # unreadable policy: health reports it; the lag is still served


def pending_bytes(rel: Relationship) -> int:
    """Bytes the running cycle has still to send (0 between cycles), from the primary."""
    stored = StoredStatus.decode(rel.primary_status_json)
    if stored is None:
        return 0
    st = stored.status
    return max(st.pending_bytes, st.progress_total - st.progress_done, 0)


class StoreCollector(Collector):
    """The store-backed metrics, read at scrape time (the scrape's HTTP thread blocks on the
    store; the event loop does not)."""

    def __init__(
        self, store: Store, clock: Clock, sessions: SessionRegistry, agent_lifetime: float
    ) -> None:
        self.store = store
        self.clock = clock
        self.sessions = sessions
        self.agent_lifetime = agent_lifetime

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no description before the first scrape: never read the store at register

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.store.transact(_snapshot, write=False)
        now = self.clock.now()
        yield from self._relationships(snap.relationships, now)
        yield from self._servers(snap.servers)
        jobs = GaugeMetricFamily(
            "sitepair_jobs", "Jobs in the store, by kind and state.", labels=("kind", "state")
        )
        for (kind, state), count in sorted(snap.jobs.items()):
            jobs.add_metric((kind, state.value), count)
        yield jobs
        yield from self._drills(snap.drills)
        yield GaugeMetricFamily(
            "sitepair_control_streams",
            "Agents holding a control stream to this broker process.",
            value=len(self.sessions),
        )

    def _relationships(self, rels: list[Relationship], now: float) -> Iterator[GaugeMetricFamily]:
        frequency = GaugeMetricFamily(
            "sitepair_copy_frequency_seconds",
            "The policy's seconds between cycles (alert rules compare the RPO lag with it).",
            labels=_VM,
        )
        lag = GaugeMetricFamily(
            "sitepair_rpo_lag_seconds",
            "Now minus the cut time of the latest committed recovery point (since protection "
            "began, before the first one).",
            labels=_VM,
        )
        cut = GaugeMetricFamily(
            "sitepair_last_cut_timestamp_seconds",
            "Cut time of the latest committed recovery point (unix seconds).",
            labels=_VM,
        )
        health_g = GaugeMetricFamily(
            "sitepair_health",
            "Health of a protected VM: 0 normal, 1 warning, 2 critical.",
            labels=_VM,
        )
        state = GaugeMetricFamily(
            "sitepair_relationship_state",
            "1 for the relationship's current state, 0 for the others.",
            labels=(*_VM, "state"),
        )
        paused = GaugeMetricFamily(
            "sitepair_replication_paused", "1 while an operator has paused replication.", labels=_VM
        )
        pending = GaugeMetricFamily(
            "sitepair_pending_bytes", "Bytes the running cycle has still to send.", labels=_VM
        )
        resync = GaugeMetricFamily(
            "sitepair_resync_required",
            "1 while the relationship needs or runs a resynchronization.",
            labels=_VM,
        )
        mismatch = GaugeMetricFamily(
            "sitepair_verification_mismatched_bytes",
            "Bytes that differed between replica and source at the last verification.",
            labels=_VM,
        )
        verified = GaugeMetricFamily(
            "sitepair_verification_timestamp_seconds",
            "When the last verification finished (unix seconds; 0 = never).",
            labels=_VM,
        )
        resync_states = (RelationshipState.RESYNC_REQUIRED, RelationshipState.RESYNCHRONIZING)
        for rel in rels:
            labels = (rel.vm_name, rel.id)
            at = last_cut_at(rel)
            lag.add_metric(labels, rpo_lag(rel, at, now))
            frequency.add_metric(labels, _copy_frequency(rel))
            if at is not None:
                cut.add_metric(labels, at)
            health_g.add_metric(labels, HEALTH_VALUES.get(rel.health, 2))
            for s in RelationshipState:
                state.add_metric((*labels, s.value), 1 if rel.state == s else 0)
            paused.add_metric(labels, 1 if rel.paused else 0)
            pending.add_metric(labels, pending_bytes(rel))
            resync.add_metric(labels, 1 if rel.state in resync_states else 0)
            v = Verification.decode(rel.verify_json)
            mismatch.add_metric(labels, v.mismatched_bytes)
            verified.add_metric(labels, v.at)
        yield from (
            lag,
            frequency,
            cut,
            health_g,
            state,
            paused,
            pending,
            resync,
            mismatch,
            verified,
        )

    def _drills(self, drills: dict[str, tuple[Drill, float]]) -> Iterator[GaugeMetricFamily]:
        result = GaugeMetricFamily(
            "sitepair_drill_last_result",
            "The last drill of a recovery plan that ran: 1 passed, 0 failed (skipped drills "
            "do not count).",
            labels=("plan",),
        )
        run = GaugeMetricFamily(
            "sitepair_drill_last_run_timestamp_seconds",
            "When the last drill of a recovery plan that ran started (unix seconds).",
            labels=("plan",),
        )
        success = GaugeMetricFamily(
            "sitepair_drill_last_success_timestamp_seconds",
            "When the last passing drill of a recovery plan started (unix seconds; 0 = never).",
            labels=("plan",),
        )
        for plan, (drill, passed_at) in sorted(drills.items()):
            result.add_metric((plan,), 1 if drill.state == DrillState.PASSED else 0)
            run.add_metric((plan,), drill.started_at)
            success.add_metric((plan,), passed_at)
        yield from (result, run, success)

    def _servers(self, servers: list[Server]) -> Iterator[GaugeMetricFamily]:
        expiry = GaugeMetricFamily(
            "sitepair_certificate_expiry_timestamp_seconds",
            "When a host's certificate expires (unix seconds); agents renew at half life.",
            labels=("server", "site"),
        )
        connected = GaugeMetricFamily(
            "sitepair_agent_connected",
            "1 while the host's agent is connected to a broker of this store.",
            labels=("server", "site"),
        )
        by_state = GaugeMetricFamily(
            "sitepair_agents", "Registered hosts by connection state.", labels=("state",)
        )
        counts = {"connected": 0, "disconnected": 0}
        for s in servers:
            expiry.add_metric((s.name, s.site), s.cert_not_after)
            connected.add_metric((s.name, s.site), 1 if s.connected else 0)
            counts["connected" if s.connected else "disconnected"] += 1
        for name, n in counts.items():
            by_state.add_metric((name,), n)
        yield from (expiry, connected, by_state)
        yield GaugeMetricFamily(
            "sitepair_agent_certificate_lifetime_seconds",
            "Lifetime of the certificates this broker issues to hosts ([certificates] "
            "agent_lifetime); hosts renew at half of it.",
            value=self.agent_lifetime,
        )


class _BrokerCertificates(Collector):
    """The broker's own certificates: its serving certificate and the vault's CA."""

    def __init__(self, serving: Callable[[], float], ca_not_after: Callable[[], float]) -> None:
        self.serving = serving
        self.ca_not_after = ca_not_after

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "sitepair_broker_certificate_expiry_timestamp_seconds",
            "When the broker's serving certificate and the vault's CA expire (unix seconds).",
            labels=("certificate",),
        )
        g.add_metric(("serving",), self.serving())
        g.add_metric(("ca",), self.ca_not_after())  # the issuing CA: a rotation changes it
        yield g


class BrokerMetrics:
    """The broker's registry and, when ``[metrics] enabled``, its endpoint."""

    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        sessions: SessionRegistry,
        serving_not_after: Callable[[], float],
        ca_cert_not_after: Callable[[], float],
        agent_lifetime: float,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.store_seconds = Histogram(
            "sitepair_store_transaction_seconds",
            "Time a store transaction took, by kind (read or write), retries counted apart.",
            labelnames=("kind",),
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        for kind in ("read", "write"):
            self.store_seconds.labels(kind)  # present from the start, at zero
        #: Responses of the web dashboard (:mod:`broker.web.server`), refusals included.
        self.dashboard_requests = Counter(
            "sitepair_dashboard_requests",
            "Responses of this broker's web dashboard, by HTTP status.",
            labelnames=("status",),
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store, clock, sessions, agent_lifetime))
        self.registry.register(_BrokerCertificates(serving_not_after, ca_cert_not_after))
        self.store = store
        store.on_transaction = self._observe
        self.server: MetricsServer | None = None

    def _observe(self, kind: str, seconds: float) -> None:
        self.store_seconds.labels(kind).observe(seconds)

    def serve(self, config: MetricsConfig, base: Path) -> str:
        """Start the endpoint (blocking while it binds); returns the bound address."""
        self.server = MetricsServer(config, self.registry, base=base)
        return self.server.start()

    def shutdown(self) -> None:
        """Stop the endpoint and the store hook (idempotent; blocking)."""
        if self.store.on_transaction == self._observe:
            self.store.on_transaction = None
        if self.server is not None:
            self.server.shutdown()
