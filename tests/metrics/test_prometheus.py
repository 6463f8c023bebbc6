"""A real Prometheus scrapes a real broker and agents, over HTTP and over mutual TLS, and
evaluates docs/examples/prometheus-alerts.yml against what they serve."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.home import BrokerHome
from tests.metrics.conftest import Pair, enable_metrics, protect_vm
from tests.metrics.test_endpoint import _issue
from tests.support.brokers import BrokerThread

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "prometheus-alerts.yml"
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus; .ci/run)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus server with ``scrape_configs`` and our alert rules, on a free port."""

    def __init__(self, folder: Path, scrape_configs: list[dict[str, Any]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": scrape_configs,
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.address = f"127.0.0.1:{_free_port()}"
        self.log = folder / "prometheus.log"
        assert PROMETHEUS is not None
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={self.address}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://{self.address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def wait(self, query: str, *, timeout: float = 30) -> list[dict[str, Any]]:
        """The result of ``query`` once it is not empty."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                result = self.api("query", query=query)["result"]
            except OSError:
                result = []  # not listening yet
            if result:
                return result
            time.sleep(0.3)
        targets = self.api("targets")
        raise AssertionError(f"no result for {query}; targets: {targets}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_folder(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "prometheus"


def test_prometheus_scrapes_broker_and_agents_and_evaluates_the_alert_rules(
    pair: Pair, prometheus_folder: Path
) -> None:
    p = pair
    protect_vm(p)
    prom = Prometheus(
        prometheus_folder,
        [
            {"job_name": "sitepair-broker", "static_configs": [{"targets": [p.broker_metrics]}]},
            {
                "job_name": "sitepair-agent",
                "static_configs": [
                    {"targets": [p.agent_metrics("hv-a1"), p.agent_metrics("hv-b1")]}
                ],
            },
        ],
    )
    try:
        up = prom.wait('sum(up{job=~"sitepair.*"}) == 3')
        assert float(up[0]["value"][1]) == 3
        lag = prom.wait('sitepair_rpo_lag_seconds{vm="web01"}')
        assert 0 <= float(lag[0]["value"][1]) < 600
        sent = prom.wait("sitepair_agent_sent_guest_bytes_total > 0")
        assert sent[0]["metric"]["instance"] == p.agent_metrics("hv-a1")
        # Every rule of the file is loaded and evaluates without error against real series.
        deadline = time.monotonic() + 30
        while True:
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules):
                break
            assert time.monotonic() < deadline, rules
            time.sleep(0.3)
        assert len(rules) == RULES.read_text().count("- alert:")
        assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]
        # A healthy pair: none of them fires.
        firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
        assert firing == []
    finally:
        prom.stop()


def test_prometheus_scrapes_over_mutual_tls(
    broker_home: BrokerHome, tmp_path: Path, prometheus_folder: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = _issue(certs / "ca", "scrapers", ca=True)
    _issue(broker_home.root / "metrics", "broker metrics", server=True)
    _issue(certs / "prometheus", "prometheus", issuer=ca)
    enable_metrics(
        broker_home.config,
        f'tls_cert = "metrics.crt"\ntls_key = "metrics.key"\nclient_ca = "{certs / "ca.crt"}"',
    )
    broker = BrokerThread(broker_home)
    prom = None
    try:
        tls = {"ca_file": str(broker_home.root / "metrics.crt")}
        prom = Prometheus(
            prometheus_folder,
            [
                {
                    "job_name": "sitepair-broker",
                    "scheme": "https",
                    "tls_config": {
                        **tls,
                        "cert_file": str(certs / "prometheus.crt"),
                        "key_file": str(certs / "prometheus.key"),
                    },
                    "static_configs": [{"targets": [broker.broker.metrics_address]}],
                },
                {  # no client certificate: refused in the handshake
                    "job_name": "sitepair-anonymous",
                    "scheme": "https",
                    "tls_config": tls,
                    "static_configs": [{"targets": [broker.broker.metrics_address]}],
                },
            ],
        )
        prom.wait('up{job="sitepair-broker"} == 1')
        prom.wait('up{job="sitepair-anonymous"} == 0')
        assert prom.wait('sitepair_agents{state="connected"}')[0]["value"][1] == "0"
    finally:
        if prom is not None:
            prom.stop()
        broker.stop()
