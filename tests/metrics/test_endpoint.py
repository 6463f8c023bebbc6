"""The endpoint's settings: loopback unless TLS, TLS and mutual TLS over real sockets."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from agent import config as agent_config
from broker import config as broker_config
from broker.app import Broker
from broker.home import BrokerHome
from sitepair.errors import ConfigError
from sitepair.metrics import MetricsConfig, MetricsServer
from tests.metrics.conftest import enable_metrics, scrape, value
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerThread, python_env


def _issue(
    path: Path,
    name: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate and key written as PEM to ``path``.crt and ``path``.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


BROKER_TOML = 'vault = "test"\n[metrics]\nenabled = true\nlisten = "{listen}"\n{extra}'


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.10:9464", "metrics.example:9464"])
def test_a_listen_address_off_loopback_needs_tls(listen: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a loopback address") as caught:
        broker_config.parse(BROKER_TOML.format(listen=listen, extra=""))
    assert "tls_cert" in (caught.value.hint or "")
    with pytest.raises(ConfigError, match="not a loopback address"):
        agent_config.parse(f'[metrics]\nenabled = true\nlisten = "{listen}"\n', tmp_path)
    # With TLS it is accepted; switched off, the address does not matter.
    extra = 'tls_cert = "m.crt"\ntls_key = "m.key"\n'
    assert broker_config.parse(BROKER_TOML.format(listen=listen, extra=extra)).metrics.tls_cert
    off = BROKER_TOML.format(listen=listen, extra="").replace("enabled = true", "enabled = false")
    assert not broker_config.parse(off).metrics.enabled


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('tls_cert = "m.crt"\n', "tls_cert and tls_key go together"),
        ('client_ca = "ca.crt"\n', "client_ca needs tls_cert"),
        ("enabled = 1\n", "enabled must be true or false"),
        ("port = 9464\n", "unknown setting"),
    ],
)
def test_bad_settings_are_refused_in_words(extra: str, message: str, tmp_path: Path) -> None:
    text = BROKER_TOML.format(listen="127.0.0.1:9464", extra="").replace("enabled = true\n", "")
    with pytest.raises(ConfigError, match=message):
        broker_config.parse(text + extra)
    with pytest.raises(ConfigError, match=message):
        agent_config.parse(text.replace('vault = "test"\n', "") + extra, tmp_path)


def test_off_by_default(broker_home: BrokerHome) -> None:
    assert not broker_config.load(broker_home.config).metrics.enabled
    assert broker_config.load(broker_home.config).metrics.listen == "127.0.0.1:9464"
    assert agent_config.AgentConfig(home=Path()).metrics.listen == "127.0.0.1:9465"
    b = BrokerThread(broker_home)
    try:
        assert b.broker.metrics_address == ""
    finally:
        b.stop()


def test_broker_serves_metrics_over_tls_with_its_configured_certificate(
    broker_home: BrokerHome, tmp_path: Path
) -> None:
    _issue(broker_home.root / "metrics", "sitepair metrics", server=True)
    enable_metrics(broker_home.config, 'tls_cert = "metrics.crt"\ntls_key = "metrics.key"')
    b = BrokerThread(broker_home)
    try:
        context = ssl.create_default_context(cafile=str(broker_home.root / "metrics.crt"))
        families = scrape(b.broker.metrics_address, context=context)
        assert value(families, "sitepair_agents", state="connected") == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(b.broker.metrics_address)  # plain HTTP is not served
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            scrape(b.broker.metrics_address, context=ssl.create_default_context())
    finally:
        b.stop()


def test_client_ca_requires_a_scraper_certificate(tmp_path: Path) -> None:
    ca = _issue(tmp_path / "ca", "scrapers", ca=True)
    _issue(tmp_path / "server", "endpoint", server=True)
    _issue(tmp_path / "prometheus", "prometheus", issuer=ca)
    _issue(tmp_path / "stranger", "stranger")
    registry = CollectorRegistry()
    Counter("probe", "A probe.", registry=registry).inc()
    config = MetricsConfig(
        enabled=True,
        listen="127.0.0.1:0",
        tls_cert="server.crt",
        tls_key="server.key",
        client_ca="ca.crt",
    )
    server = MetricsServer(config, registry, base=tmp_path)
    address = server.start()
    try:

        def context(client: str | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
            if client:
                ctx.load_cert_chain(tmp_path / f"{client}.crt", tmp_path / f"{client}.key")
            return ctx

        assert value(scrape(address, context=context("prometheus")), "probe", "_total") == 1
        for who in (None, "stranger"):
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
                scrape(address, context=context(who))
    finally:
        server.shutdown()
        server.shutdown()  # idempotent


def test_missing_certificate_file_and_busy_port_are_config_errors(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    missing = MetricsConfig(enabled=True, listen="127.0.0.1:0", tls_cert="no.crt", tls_key="k")
    with pytest.raises(ConfigError, match=r"tls_cert .*no\.crt does not exist"):
        MetricsServer(missing, registry, base=tmp_path).start()
    _issue(tmp_path / "one", "one", server=True)
    _issue(tmp_path / "two", "two", server=True)
    mismatched = MetricsConfig(
        enabled=True, listen="127.0.0.1:0", tls_cert="one.crt", tls_key="two.key"
    )
    with pytest.raises(ConfigError, match="cannot use the TLS certificate or key"):
        MetricsServer(mismatched, registry, base=tmp_path).start()
    first = MetricsServer(
        MetricsConfig(enabled=True, listen="127.0.0.1:0"), registry, base=tmp_path
    )
    address = first.start()
    try:
        taken = MetricsConfig(enabled=True, listen=address)
        with pytest.raises(ConfigError, match="cannot listen on"):
            MetricsServer(taken, registry, base=tmp_path).start()
    finally:
        first.shutdown()


def test_a_broker_whose_metrics_port_is_taken_refuses_to_start(
    broker_home: BrokerHome, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    squatter = MetricsServer(
        MetricsConfig(enabled=True, listen="127.0.0.1:0"), registry, base=tmp_path
    )
    address = squatter.start()
    try:
        enable_metrics(broker_home.config)
        text = broker_home.config.read_text().replace('"127.0.0.1:0"\ntls', f'"{address}"\ntls')
        broker_home.config.write_text(text)
        with pytest.raises(ConfigError, match="cannot listen on"):
            asyncio.run(Broker(broker_home.root).start())
        # It shut down what it had started: the home is free for a broker that can start.
        broker_home.config.write_text(
            broker_home.config.read_text().replace(f'"{address}"', '"127.0.0.1:0"')
        )
        b = BrokerThread(broker_home)
        assert b.broker.metrics_address.startswith("127.0.0.1:")
        b.stop()
    finally:
        squatter.shutdown()


def test_an_agent_whose_metrics_port_is_taken_refuses_to_run_and_frees_its_home(
    broker: BrokerThread, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "hv-a1"
    register_agent(credentials, home, name="hv-a1")
    squatter = MetricsServer(
        MetricsConfig(enabled=True, listen="127.0.0.1:0"), CollectorRegistry(), base=tmp_path
    )
    address = squatter.start()
    try:
        enable_metrics(home / "agent.toml")
        config = home / "agent.toml"
        config.write_text(config.read_text().replace('"127.0.0.1:0"', f'"{address}"', 1))
        agent = AgentThread(home)
        try:
            with pytest.raises(ConfigError, match=f"cannot listen on {address}"):
                agent.wait_connected()
        finally:
            agent.stop()
    finally:
        squatter.shutdown()
    # The port is free again: the same home runs, with its endpoint where it was configured.
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        assert agent.daemon.metrics_address == address
        assert "sitepair_agent_cycle_duration_seconds" in scrape(address)
    finally:
        agent.stop()


def test_the_operator_sees_why_serve_refuses_a_public_listen_without_tls(
    broker_home: BrokerHome,
) -> None:
    enable_metrics(broker_home.config)
    config = broker_home.config
    config.write_text(config.read_text().replace('"127.0.0.1:0"\ntls', '"0.0.0.0:9464"\ntls'))
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--home", str(broker_home.root), "serve"],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "not a loopback address" in proc.stderr and "hint:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not broker_home.run_file.exists()  # it never started
