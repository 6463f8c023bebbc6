"""The dashboard's server core against a real broker: HTTPS, headers, errors, life cycle.

Every request is real HTTPS (aiohttp's client, an :class:`ssl.SSLContext` with the operator's
``admin.crt``/``admin.key`` and the vault CA) to the broker's dashboard port; the pages are
stood in for by :func:`tests.support.dashboard.test_routes`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path

import psutil
import pytest

from broker.app import Broker
from broker.web import server
from broker.web.server import CONTENT_SECURITY_POLICY
from sitepair import pki
from sitepair.errors import ConfigError, FailedPrecondition
from sitepair.v1 import admin_pb2
from tests.support import dashboard as support
from tests.support.brokers import BrokerThread, make_home
from tests.support.dashboard import (
    Dashboard,
    client_context,
    fetch,
    served_certificate,
    write_identity,
)

dashboard = support.dashboard


def _served_serial(d: Dashboard, browser: ssl.SSLContext) -> int:
    return served_certificate(d.broker.ctx.bound_dashboard, browser).serial_number


def _listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_the_dashboard_is_off_by_default_and_nothing_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(tmp_path / "broker")
    assert "[dashboard]\n" in home.config.read_text()  # init writes the section, turned off
    monkeypatch.setattr(server, "add_page_routes", support.test_routes)
    before = _listening_ports()
    broker = BrokerThread(home)
    try:
        assert broker.ctx.bound_dashboard == ""
        assert broker.broker.dashboard is None
        run = json.loads(home.run_file.read_text())
        assert "dashboard" not in run
        ports = {int(a.rsplit(":", 1)[1]) for a in (broker.control, broker.enrollment)}
        assert _listening_ports() - before == ports  # the two gRPC ports, nothing else
        with broker.admin() as admin, pytest.raises(FailedPrecondition, match="dashboard"):
            admin.call(admin.stub.CreateDashboardLogin, admin_pb2.CreateDashboardLoginRequest())
    finally:
        broker.stop()


def test_serves_https_with_the_brokers_certificate_and_says_where(dashboard: Dashboard) -> None:
    ctx = dashboard.broker.ctx
    run = json.loads(dashboard.home.run_file.read_text())
    assert run["dashboard"] == ctx.bound_dashboard
    assert ctx.bound_dashboard.startswith("127.0.0.1:") and not ctx.bound_dashboard.endswith(":0")
    reply = fetch(f"{dashboard.url}/whoami", dashboard.admin())
    assert reply.status == 200
    assert reply.json()["operator"] == "local-admin"
    served = pki.load_cert(dashboard.home.server_cert)
    assert _served_serial(dashboard, dashboard.admin()) == served.serial_number


def test_stops_with_the_broker(dashboard: Dashboard) -> None:
    host, port = dashboard.broker.ctx.bound_dashboard.rsplit(":", 1)
    dashboard.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_a_renewed_serving_certificate_is_served_without_a_restart(dashboard: Dashboard) -> None:
    first = _served_serial(dashboard, dashboard.admin())
    assert dashboard.broker.ctx.server_cert.ensure_fresh(force=True)
    renewed = pki.load_cert(dashboard.home.server_cert)
    assert renewed.serial_number != first
    assert _served_serial(dashboard, dashboard.admin()) == renewed.serial_number
    assert fetch(f"{dashboard.url}/whoami", dashboard.admin()).status == 200


def test_a_ca_rotation_s_new_ca_is_trusted_for_operator_certificates(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    ca = dashboard.broker.ctx.ca
    ca.start_rotation(time.time())
    # An operator certificate the new CA issued (as after `ca rotate activate`).
    next_key = pki.load_private_key(dashboard.home.ca_dir / "next.key")
    next_cert = pki.load_cert(dashboard.home.ca_dir / "next.crt")
    identity = pki.Identity(vault="bluevault", role=pki.Role.ADMIN, id="local-admin")
    cert, key = write_identity(tmp_path / "op", next_key, next_cert, identity)
    browser = client_context(ca.pem, cert, key)
    reply = fetch(f"{dashboard.url}/whoami", browser)
    assert reply.status == 200 and reply.json()["operator"] == "local-admin"


def test_security_headers_on_every_response(dashboard: Dashboard) -> None:
    replies = {
        "page": fetch(f"{dashboard.url}/whoami", dashboard.admin()),
        "unknown": fetch(f"{dashboard.url}/nothing-here", dashboard.admin()),
        "signed out": fetch(f"{dashboard.url}/whoami", dashboard.anonymous()),
        "refused": fetch(f"{dashboard.url}/echo", dashboard.admin(), method="POST"),
        "sign-in": fetch(f"{dashboard.url}/login", dashboard.anonymous()),
        "error": fetch(f"{dashboard.url}/fail", dashboard.admin()),
    }
    assert [r.status for r in replies.values()] == [200, 404, 401, 403, 200, 404]
    for what, reply in replies.items():
        h = reply.headers
        assert h["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, what
        assert "script-src 'self'" in h["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
        assert h["X-Content-Type-Options"] == "nosniff", what
        assert h["Referrer-Policy"] == "same-origin", what
        assert h["Cache-Control"] == "no-store", what
    static = fetch(f"{dashboard.url}/static/app.css", dashboard.admin())
    assert static.status == 200 and "Cache-Control" not in static.headers
    assert static.headers["X-Content-Type-Options"] == "nosniff"


def test_a_failed_action_shows_its_message_and_a_crash_only_a_reference(
    dashboard: Dashboard,
) -> None:
    failed = fetch(f"{dashboard.url}/fail", dashboard.admin())
    assert failed.status == 404
    assert 'id="error"' in failed.text
    assert "no protected VM &#x27;&lt;b&gt;web-1&lt;/b&gt;&#x27;" in failed.text  # escaped
    assert "<b>" not in failed.text and "see `vms list`" in failed.text
    crashed = fetch(f"{dashboard.url}/boom", dashboard.admin())
    assert crashed.status == 500
    assert "secret internals" not in crashed.text and "Traceback" not in crashed.text
    assert "reference" in crashed.text


def test_responses_are_counted_by_status(dashboard: Dashboard) -> None:
    metrics = dashboard.broker.broker.metrics
    assert metrics is not None

    def count(status: str) -> float:
        value = metrics.registry.get_sample_value(
            "sitepair_dashboard_requests_total", {"status": status}
        )
        return value or 0.0

    fetch(f"{dashboard.url}/whoami", dashboard.admin())
    fetch(f"{dashboard.url}/whoami", dashboard.anonymous())
    fetch(f"{dashboard.url}/whoami", dashboard.anonymous())
    assert count("200") == 1
    assert count("401") == 2


def test_a_certificate_of_the_operators_own_pki(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(tmp_path / "broker", vault="bluevault")
    own_key, own_ca = pki.create_ca("company-pki", now=time.time())
    served = pki.Identity(vault="company-pki", role=pki.Role.BROKER, id="dashboard")
    key = pki.generate_key()
    cert = pki.issue_certificate(
        own_key, own_ca, key.public_key(), served, common_name="dashboard", now=time.time(),
        lifetime_seconds=3600, ip_addresses=("127.0.0.1",),
    )  # fmt: skip
    pki.write_private_key(home.root / "web.key", key)
    (home.root / "web.crt").write_bytes(pki.cert_to_pem(cert))
    support.enable_dashboard(home, tls_cert='"web.crt"', tls_key=f'"{home.root / "web.key"}"')
    monkeypatch.setattr(server, "add_page_routes", support.test_routes)
    broker = BrokerThread(home)
    try:
        d = Dashboard(broker)
        # The browser trusts the company's CA; the operator's certificate is still the vault's.
        browser = client_context(
            pki.cert_to_pem(own_ca), home.admin_dir / "admin.crt", home.admin_dir / "admin.key"
        )
        reply = fetch(f"{d.url}/whoami", browser)
        assert reply.status == 200 and reply.json()["operator"] == "local-admin"
        assert _served_serial(d, browser) == cert.serial_number
    finally:
        broker.stop()


def test_a_missing_configured_certificate_stops_the_broker_with_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(tmp_path / "broker")
    support.enable_dashboard(home, tls_cert='"missing.crt"', tls_key='"missing.key"')
    monkeypatch.setattr(server, "add_page_routes", support.test_routes)
    with pytest.raises(ConfigError, match=r"tls_cert .*missing\.crt does not exist") as err:
        asyncio.run(Broker(home.root).start())
    assert err.value.hint and "tls_cert" in err.value.hint
    assert not home.run_file.exists()
    # Nothing is left behind (the home is unlocked): with a good configuration it starts.
    support.enable_dashboard(home, tls_cert='""', tls_key='""')
    Dashboard(BrokerThread(home)).stop()
