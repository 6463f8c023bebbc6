"""The alert rules and the Grafana dashboard in docs/examples name metrics that exist, and
promtool accepts them (and the alerts fire as tests/metrics/alert-tests.yml expects)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.metrics.test_scrape import AGENT_METRICS, BROKER_METRICS

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "examples" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "docs" / "examples" / "grafana-dashboard.json"
DOC = ROOT / "docs" / "metrics.md"
SERVED = set(BROKER_METRICS) | set(AGENT_METRICS)
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; .ci/run adds it)"
)


def _names(text: str) -> set[str]:
    names = set(re.findall(r"\bsitepair_[a-z0-9_]+", text))
    return {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names}


def _dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_rules_and_dashboard_name_only_metrics_that_are_served() -> None:
    rules = _names(RULES.read_text())
    dashboard = _names(" ".join(_dashboard_queries()))
    assert rules - SERVED == set(), "alert rules name metrics nobody serves"
    assert dashboard - SERVED == set(), "the dashboard names metrics nobody serves"
    assert {
        "sitepair_rpo_lag_seconds",
        "sitepair_health",
        "sitepair_certificate_expiry_timestamp_seconds",
        "sitepair_agent_connected",
        "sitepair_verification_mismatched_bytes",
    } <= rules
    assert {"sitepair_agent_cycle_duration_seconds", "sitepair_jobs"} <= dashboard


def test_every_served_metric_is_documented() -> None:
    rows = re.findall(r"^\| `(sitepair_[a-z0-9_]+)`", DOC.read_text(), re.MULTILINE)
    documented = {n.removesuffix("_total") for n in rows}  # counters as they are exposed
    assert SERVED - documented == set(), "docs/metrics.md misses these"
    assert documented - SERVED == set(), "docs/metrics.md lists metrics nobody serves"


@needs_promtool
def test_promtool_accepts_the_rules_and_the_alerts_fire_as_expected() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", "alert-tests.yml"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    # Grafana's variables replaced by what they stand for; each query as a recording rule, which
    # promtool parses.
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(_dashboard_queries()):
        expr = query.replace("$__rate_interval", "5m").replace("$vm", ".*")
        rules += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
