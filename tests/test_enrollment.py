"""Enrollment end to end against a real broker: keys, certificates, refusals."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from agent.enroll import register
from agent.identity import AgentIdentity
from broker.client import AdminClient
from sitepair import pki
from sitepair.errors import (
    ConfigError,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from sitepair.v1 import admin_pb2
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key, make_home


def test_enrollment_end_to_end(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "agent"
    ident = register_agent(credentials, home, name="hv-01")

    # The key never left the host, is private, and matches the certificate.
    key_file = home / "identity" / "agent.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = pki.load_private_key(key_file)
    cert = ident.cert
    assert cert.public_key() == key.public_key()
    pki.verify_issued_by(cert, broker.ctx.ca.cert)

    # Identity comes from the broker's record: role agent, broker-chosen id, the key's site.
    who = pki.identity_from_cert(cert)
    assert who.role == pki.Role.AGENT
    assert who.vault == "test"
    assert who.site == "site-a"
    assert who.id == ident.host_id and who.id.startswith("host-")
    assert ident.not_after - ident.not_before <= 24 * 3600 + 600  # short-lived

    servers = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
    assert [(s.name, s.site, s.id) for s in servers] == [("hv-01", "site-a", ident.host_id)]

    # The single use is gone.
    keys = admin.call(
        admin.stub.ListRegistrationKeys,
        admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
    ).keys
    assert [(k.uses_remaining, k.state) for k in keys] == [(0, "used up")]


def test_csr_subject_and_extensions_are_ignored(
    broker: BrokerThread, admin: AdminClient, credentials: Path
) -> None:
    """A CSR that asks to be the broker, with an admin identity URI, still yields only an agent
    certificate with the broker-chosen id: the broker uses nothing but the CSR's public key."""
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from sitepair import credentials as creds_mod
    from sitepair.v1 import enrollment_pb2, enrollment_pb2_grpc

    creds = creds_mod.load(credentials)
    key = pki.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pki.BROKER_DNS_NAME)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(pki.BROKER_DNS_NAME),
                    x509.UniformResourceIdentifier("sitepair://test/admin/root"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    channel = grpc.secure_channel(
        broker.enrollment,
        grpc.ssl_channel_credentials(root_certificates=creds.ca_pem),
        options=[("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)],
    )
    with channel:
        resp = enrollment_pb2_grpc.EnrollmentStub(channel).Register(
            enrollment_pb2.RegisterRequest(
                key_id=creds.key_id,
                secret=creds.secret,
                name="sneaky",
                csr_der=csr.public_bytes(serialization.Encoding.DER),
            ),
            timeout=10,
        )
    cert = pki.load_cert_pem(resp.certificate_pem)
    who = pki.identity_from_cert(cert)
    assert who.role == pki.Role.AGENT and who.id == resp.host_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert pki.BROKER_DNS_NAME not in san.get_values_for_type(x509.DNSName)
    assert san.get_values_for_type(x509.DNSName) == [pki.agent_dns_name(resp.host_id)]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sneaky"


def test_single_use_key_twenty_agents_exactly_one_wins(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    def attempt(i: int) -> str:
        try:
            register_agent(credentials, tmp_path / f"agent-{i}", name=f"hv-{i:02d}")
            return "ok"
        except PermissionDenied as exc:
            return f"refused: {exc.message}"

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    assert outcomes.count("ok") == 1
    refusals = [o for o in outcomes if o != "ok"]
    assert len(refusals) == 19
    assert all("used up" in r for r in refusals), refusals
    servers = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
    assert len(servers) == 1


def test_multi_use_key(broker: BrokerThread, admin: AdminClient, tmp_path: Path) -> None:
    creds = tmp_path / "c.json"
    create_key(admin, creds, uses=3)
    for i in range(3):
        register_agent(creds, tmp_path / f"a{i}", name=f"hv-{i}")
    with pytest.raises(PermissionDenied, match="used up"):
        register_agent(creds, tmp_path / "a3", name="hv-3")


def test_expired_key_is_refused_and_consumed(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path
) -> None:
    creds = tmp_path / "c.json"
    resp = create_key(admin, creds, uses=2, valid_seconds=3600)
    # Make the key expire in the store (the agent's own pre-check sees a valid file).
    with sqlite3.connect(broker.home.database) as db:
        db.execute("UPDATE registration_keys SET expires_at = 1 WHERE id = ?", (resp.key.id,))
    with pytest.raises(PermissionDenied, match="expired"):
        register_agent(creds, tmp_path / "a", name="hv-1")
    keys = admin.call(
        admin.stub.ListRegistrationKeys,
        admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
    ).keys
    assert keys[0].uses_remaining == 1  # the refused attempt consumed a use


def test_expired_credentials_file_refused_locally(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path
) -> None:
    creds = tmp_path / "c.json"
    create_key(admin, creds)
    doc = json.loads(creds.read_text())
    doc["expires_at"] = "2001-01-01T00:00:00Z"
    creds.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="expired"):
        register_agent(creds, tmp_path / "a", name="hv-1")


def test_revoked_key_refused(broker: BrokerThread, admin: AdminClient, tmp_path: Path) -> None:
    creds = tmp_path / "c.json"
    resp = create_key(admin, creds, uses=5)
    admin.call(
        admin.stub.RevokeRegistrationKey, admin_pb2.RevokeRegistrationKeyRequest(id=resp.key.id)
    )
    with pytest.raises(PermissionDenied, match="revoked"):
        register_agent(creds, tmp_path / "a", name="hv-1")
    with pytest.raises(FailedPrecondition, match="already revoked"):
        admin.call(
            admin.stub.RevokeRegistrationKey, admin_pb2.RevokeRegistrationKeyRequest(id=resp.key.id)
        )


def test_wrong_secret_refused_without_consuming(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path
) -> None:
    creds = tmp_path / "c.json"
    create_key(admin, creds)
    doc = json.loads(creds.read_text())
    doc["secret"] = "A" * 43  # 32 bytes, well-formed, wrong
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(Unauthenticated, match="unknown or its secret does not match"):
        register_agent(bad, tmp_path / "a", name="hv-1")
    # The right secret still works: the wrong one consumed nothing.
    register_agent(creds, tmp_path / "b", name="hv-1")


def test_unknown_key_refused(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    doc = json.loads(credentials.read_text())
    doc["key_id"] = "key-000000000000"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(Unauthenticated):
        register_agent(bad, tmp_path / "a", name="hv-1")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda text: text[: len(text) // 2], "truncated or not JSON"),
        (lambda text: "", "truncated or not JSON"),
        (lambda text: "[1, 2]", "not a JSON object"),
        (
            lambda text: text.replace('"sitepair-credentials/1"', '"other/9"'),
            "not a sitepair credentials file",
        ),
        (lambda text: text.replace('"secret"', '"secrex"'), "has no 'secret'"),
        (lambda text: text.replace("BEGIN CERTIFICATE", "BEGIN CERTIFICAT"), "CA certificate"),
    ],
)
def test_malformed_credentials_refused_clearly(
    credentials: Path, tmp_path: Path, mutate: object, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(mutate(credentials.read_text()))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        register_agent(bad, tmp_path / "a", name="hv-1")
    assert not (tmp_path / "a" / "identity").exists()


def test_short_secret_refused(credentials: Path, tmp_path: Path) -> None:
    doc = json.loads(credentials.read_text())
    doc["secret"] = "AAAA"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="shorter than 128 bits"):
        register_agent(bad, tmp_path / "a", name="hv-1")


def test_credentials_for_another_broker(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path
) -> None:
    """A credentials file from broker B used against broker A: the pinned CA does not match."""
    other_home = make_home(tmp_path / "other", vault="other")
    other = BrokerThread(other_home)
    try:
        with other.admin() as other_admin:
            creds = tmp_path / "other-creds.json"
            create_key(other_admin, creds)
        doc = json.loads(creds.read_text())
        doc["enrollment_addresses"] = [broker.enrollment]  # points at A, pins B's CA
        creds.write_text(json.dumps(doc))
        with pytest.raises(Unavailable, match="TLS"):
            register(creds, name="hv-1", home=tmp_path / "a", agent_toml="")
    finally:
        other.stop()
    assert admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers == []


def test_vault_mismatch_named(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    doc = json.loads(credentials.read_text())
    doc["vault"] = "elsewhere"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="vault 'elsewhere'"):
        register_agent(bad, tmp_path / "a", name="hv-1")


def test_duplicate_name_refused_and_use_kept(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path
) -> None:
    creds = tmp_path / "c.json"
    create_key(admin, creds, uses=2)
    register_agent(creds, tmp_path / "a", name="hv-1")
    from sitepair.errors import AlreadyExists

    with pytest.raises(AlreadyExists, match="already registered"):
        register_agent(creds, tmp_path / "b", name="hv-1")
    keys = admin.call(
        admin.stub.ListRegistrationKeys,
        admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
    ).keys
    assert keys[0].uses_remaining == 1


def test_registering_twice_in_one_home_refused(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    register_agent(credentials, home, name="hv-1")
    creds2 = tmp_path / "c2.json"
    create_key(admin, creds2)
    with pytest.raises(FailedPrecondition, match="already holds a registered agent"):
        register_agent(creds2, home, name="hv-1")
    AgentIdentity.load(home)  # the first identity is intact
