"""Every metric, scraped over real HTTP from a real broker and two real agents."""

from __future__ import annotations

import time

from tests.metrics.conftest import Pair, eventually, protect_vm, scrape, value, write_guest

BROKER_METRICS = {
    # name: type, as prometheus_client's parser reports it
    "sitepair_rpo_lag_seconds": "gauge",
    "sitepair_copy_frequency_seconds": "gauge",
    "sitepair_agent_certificate_lifetime_seconds": "gauge",
    "sitepair_last_cut_timestamp_seconds": "gauge",
    "sitepair_health": "gauge",
    "sitepair_relationship_state": "gauge",
    "sitepair_replication_paused": "gauge",
    "sitepair_pending_bytes": "gauge",
    "sitepair_resync_required": "gauge",
    "sitepair_verification_mismatched_bytes": "gauge",
    "sitepair_verification_timestamp_seconds": "gauge",
    "sitepair_certificate_expiry_timestamp_seconds": "gauge",
    "sitepair_agent_connected": "gauge",
    "sitepair_agents": "gauge",
    "sitepair_jobs": "gauge",
    "sitepair_control_streams": "gauge",
    "sitepair_store_transaction_seconds": "histogram",
    "sitepair_broker_certificate_expiry_timestamp_seconds": "gauge",
    # one sample per recovery plan that was drilled (tests/drills scrapes them)
    "sitepair_drill_last_result": "gauge",
    "sitepair_drill_last_run_timestamp_seconds": "gauge",
    "sitepair_drill_last_success_timestamp_seconds": "gauge",
    # served with no sample until the web dashboard answers (tests/web counts them)
    "sitepair_dashboard_requests": "counter",
}

AGENT_METRICS = {
    "sitepair_agent_cycle_duration_seconds": "histogram",
    "sitepair_agent_sent_wire_bytes": "counter",
    "sitepair_agent_sent_guest_bytes": "counter",
    "sitepair_agent_cycles_failed": "counter",
    "sitepair_agent_resyncs": "counter",
    "sitepair_agent_received_wire_bytes": "counter",
    "sitepair_agent_applied_bytes": "counter",
    "sitepair_agent_replica_cycles": "counter",
    "sitepair_agent_pending_bytes": "gauge",
    "sitepair_agent_resync_needed": "gauge",
    "sitepair_agent_replication_paused": "gauge",
    "sitepair_certificate_expiry_timestamp_seconds": "gauge",
}


def test_every_metric_is_served_with_plausible_values(pair: Pair) -> None:
    p = pair
    protect_vm(p)
    rel = p.protected("web01").relationship_id
    vm = {"vm": "web01", "relationship": rel}
    # The replica's status (with its last cut) reaches the broker with the next report.
    eventually(
        lambda: (
            "sitepair_last_cut_timestamp_seconds" in (f := scrape(p.broker_metrics))
            and f["sitepair_last_cut_timestamp_seconds"].samples
        ),
        what="a committed point in the broker's metrics",
    )
    b = scrape(p.broker_metrics)
    for name, kind in BROKER_METRICS.items():
        assert name in b, f"broker does not serve {name}"
        assert b[name].type == kind, (name, b[name].type)
    now = time.time()
    lag = value(b, "sitepair_rpo_lag_seconds", **vm)
    cut = value(b, "sitepair_last_cut_timestamp_seconds", **vm)
    assert 0 <= lag < 600 and now - 600 < cut <= now
    assert value(b, "sitepair_health", **vm) in (0, 1, 2)
    assert value(b, "sitepair_copy_frequency_seconds", **vm) == 300
    assert value(b, "sitepair_agent_certificate_lifetime_seconds") == 86400
    assert value(b, "sitepair_relationship_state", state="protected", **vm) == 1
    assert value(b, "sitepair_relationship_state", state="disabled", **vm) == 0
    assert value(b, "sitepair_replication_paused", **vm) == 0
    assert value(b, "sitepair_pending_bytes", **vm) == 0
    assert value(b, "sitepair_resync_required", **vm) == 0
    assert value(b, "sitepair_verification_timestamp_seconds", **vm) == 0  # never verified
    for host, site in (("hv-a1", "site-a"), ("hv-b1", "site-b")):
        expiry = value(b, "sitepair_certificate_expiry_timestamp_seconds", server=host, site=site)
        assert now < expiry < now + 2 * 86400  # agent certificates last 24 h
        assert value(b, "sitepair_agent_connected", server=host) == 1
    assert value(b, "sitepair_agents", state="connected") == 2
    assert value(b, "sitepair_agents", state="disconnected") == 0
    assert value(b, "sitepair_control_streams") == 2
    assert value(b, "sitepair_jobs", kind="enable-protection", state="succeeded") == 1
    assert value(b, "sitepair_store_transaction_seconds", "_count", kind="write") > 0
    assert value(b, "sitepair_store_transaction_seconds", "_count", kind="read") > 0
    assert value(b, "sitepair_broker_certificate_expiry_timestamp_seconds", certificate="ca") > now

    # A verification: its time and its mismatches (none) per VM.
    p.action("web01", "verify")
    b = scrape(p.broker_metrics)
    assert value(b, "sitepair_verification_timestamp_seconds", **vm) > 0
    assert value(b, "sitepair_verification_mismatched_bytes", **vm) == 0

    # The agents: the primary sent the initial cycle, the replica received and applied it.
    primary, replica = scrape(p.agent_metrics("hv-a1")), scrape(p.agent_metrics("hv-b1"))
    for families in (primary, replica):
        for name, kind in AGENT_METRICS.items():
            assert name in families, f"agent does not serve {name}"
            assert families[name].type == kind, (name, families[name].type)
    assert value(primary, "sitepair_agent_cycle_duration_seconds", "_count", kind="initial") == 1
    guest = value(primary, "sitepair_agent_sent_guest_bytes", "_total")
    wire = value(primary, "sitepair_agent_sent_wire_bytes", "_total")
    assert guest >= 300_000 and 0 < wire < guest  # what was written, compressed on the wire
    assert value(primary, "sitepair_agent_cycles_failed", "_total", code="stale-epoch") == 0
    assert value(primary, "sitepair_agent_pending_bytes", relationship=rel) == 0
    assert value(primary, "sitepair_agent_resync_needed", relationship=rel) == 0
    assert value(replica, "sitepair_agent_replica_cycles", "_total", kind="initial") == 1
    assert value(replica, "sitepair_agent_received_wire_bytes", "_total") == wire
    assert value(replica, "sitepair_agent_applied_bytes", "_total") >= 300_000
    assert value(replica, "sitepair_agent_cycle_duration_seconds", "_count", kind="initial") == 0
    expiry = value(primary, "sitepair_certificate_expiry_timestamp_seconds", server="hv-a1")
    assert now < expiry < now + 2 * 86400

    # A resync is counted as one.
    p.action("web01", "resync")
    primary = scrape(p.agent_metrics("hv-a1"))
    assert value(primary, "sitepair_agent_resyncs", "_total", relationship=rel) == 1
    assert value(primary, "sitepair_agent_cycle_duration_seconds", "_count", kind="resync") == 1


def test_rpo_lag_follows_cycles_and_grows_while_paused(pair: Pair) -> None:
    p = pair
    protect_vm(p)
    rel = p.protected("web01").relationship_id
    vm = {"vm": "web01", "relationship": rel}

    def cut_after(previous: float) -> float:
        b = scrape(p.broker_metrics)
        if not b["sitepair_last_cut_timestamp_seconds"].samples:
            return 0.0
        cut = value(b, "sitepair_last_cut_timestamp_seconds", **vm)
        return cut if cut > previous else 0.0

    first_cut = float(eventually(lambda: cut_after(0), what="first committed point"))  # type: ignore[arg-type]
    b = scrape(p.broker_metrics)
    lag_before = value(b, "sitepair_rpo_lag_seconds", **vm)

    # A cycle commits a newer point: the lag is measured from it, not from the first one.
    write_guest(p, "web01", 3 << 20, b"\x11" * 65536)
    p.action("web01", "cycle")
    second_cut = float(eventually(lambda: cut_after(first_cut), what="a newer point"))  # type: ignore[arg-type]
    b = scrape(p.broker_metrics)
    scraped_at = time.time()
    lag_after = value(b, "sitepair_rpo_lag_seconds", **vm)
    assert second_cut > first_cut
    assert lag_after != lag_before
    assert 0 <= lag_after <= scraped_at - second_cut + 1  # now minus the newer cut

    # Paused: no cycle runs, so the lag only grows.
    p.action("web01", "pause")
    eventually(
        lambda: value(scrape(p.broker_metrics), "sitepair_replication_paused", **vm) == 1,
        what="paused in metrics",
    )
    primary = scrape(p.agent_metrics("hv-a1"))
    assert value(primary, "sitepair_agent_replication_paused", relationship=rel) == 1
    lag1 = value(scrape(p.broker_metrics), "sitepair_rpo_lag_seconds", **vm)
    time.sleep(1.1)
    lag2 = value(scrape(p.broker_metrics), "sitepair_rpo_lag_seconds", **vm)
    assert lag2 > lag1
    p.action("web01", "resume")
