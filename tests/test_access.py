"""Who can reach what: mutual TLS on the control/admin port, roles, and hostile input."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest

from broker.client import AdminClient
from sitepair import pki
from sitepair.rpc import CONTROL_MAX_MESSAGE
from sitepair.v1 import admin_pb2, admin_pb2_grpc, control_pb2, control_pb2_grpc, enrollment_pb2
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread


def _channel(
    address: str, *, ca: bytes, key: bytes | None = None, cert: bytes | None = None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)]
    )


def _foreign_identity(role: pki.Role, id_: str = "intruder") -> tuple[bytes, bytes, bytes]:
    """Key and certificate from a CA the broker has never seen (same vault name even)."""
    ca_key, ca_cert = pki.create_ca("test", now=time.time())
    key = pki.generate_key()
    cert = pki.issue_certificate(
        ca_key,
        ca_cert,
        key.public_key(),
        pki.Identity(vault="test", role=role, id=id_),
        common_name=id_,
        now=time.time(),
        lifetime_seconds=3600,
    )
    return pki.key_to_pem(key), pki.cert_to_pem(cert), pki.cert_to_pem(ca_cert)


def _admin_ping(channel: grpc.Channel) -> admin_pb2.BrokerInfo:
    return admin_pb2_grpc.AdminStub(channel).GetBrokerInfo(
        admin_pb2.GetBrokerInfoRequest(), timeout=5
    )


def test_admin_profile_works(broker: BrokerThread, admin: AdminClient) -> None:
    info = admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
    assert info.vault == "test"
    assert info.store.startswith("sqlite:")


def test_no_client_certificate_cannot_reach_control_or_admin(broker: BrokerThread) -> None:
    with _channel(broker.control, ca=broker.ctx.ca.pem) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _admin_ping(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            control_pb2_grpc.ControlStub(ch).Renew(control_pb2.RenewRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", [pki.Role.ADMIN, pki.Role.AGENT])
def test_certificate_from_another_ca_cannot_reach(broker: BrokerThread, role: pki.Role) -> None:
    key, cert, _ = _foreign_identity(role)
    with _channel(broker.control, ca=broker.ctx.ca.pem, key=key, cert=cert) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _admin_ping(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            control_pb2_grpc.ControlStub(ch).Renew(control_pb2.RenewRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_agent_certificate_cannot_call_admin_api(
    broker: BrokerThread, credentials: Path, tmp_path: Path
) -> None:
    ident = register_agent(credentials, tmp_path / "a", name="hv-1")
    with _channel(broker.control, ca=ident.ca_pem, key=ident.key_pem, cert=ident.cert_pem) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _admin_ping(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "role 'agent' may not call this API" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminStub(ch).CreateRegistrationKey(
                admin_pb2.CreateRegistrationKeyRequest(site="x"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_admin_certificate_cannot_open_control_stream(broker: BrokerThread) -> None:
    home = broker.home.admin_dir
    with _channel(
        broker.control,
        ca=(home / "ca.crt").read_bytes(),
        key=(home / "admin.key").read_bytes(),
        cert=(home / "admin.crt").read_bytes(),
    ) as ch:
        call = control_pb2_grpc.ControlStub(ch).Connect(
            iter([control_pb2.AgentMessage(hello=control_pb2.Hello())]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_agent_pinning_another_ca_refuses_the_broker(
    broker: BrokerThread, credentials: Path, tmp_path: Path
) -> None:
    """The agent's identity pins its CA; a broker with another CA (an impostor) is refused."""
    ident = register_agent(credentials, tmp_path / "a", name="hv-1")
    _, _, other_ca = _foreign_identity(pki.Role.ADMIN)
    with _channel(broker.control, ca=other_ca, key=ident.key_pem, cert=ident.cert_pem) as ch:
        with pytest.raises(grpc.RpcError) as err:
            control_pb2_grpc.ControlStub(ch).Renew(
                control_pb2.RenewRequest(csr_der=pki.make_csr(pki.generate_key(), "x")), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_garbage_on_tls_ports_does_not_hurt(broker: BrokerThread, admin: AdminClient) -> None:
    for address in (broker.control, broker.enrollment):
        host, port = address.rsplit(":", 1)
        for payload in (
            b"\x00" * 4096,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\xff\xff" + b"A" * 2000,
        ):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(payload)
                s.settimeout(5)
                with contextlib.suppress(TimeoutError, ConnectionResetError):
                    s.recv(1024)
        # A TLS client that completes the handshake then speaks nonsense.
        ctx = ssl.create_default_context(cadata=broker.ctx.ca.pem.decode())
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        try:
            with (
                socket.create_connection((host, int(port)), timeout=5) as raw,
                ctx.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"this is not HTTP/2" * 100)
        except (ssl.SSLError, OSError):
            pass  # the control port wants a client certificate: refusing is the right answer
    assert admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()).vault == "test"


def test_malformed_protobuf_is_refused_and_broker_keeps_serving(
    broker: BrokerThread, admin: AdminClient
) -> None:
    home = broker.home.admin_dir
    with _channel(
        broker.control,
        ca=(home / "ca.crt").read_bytes(),
        key=(home / "admin.key").read_bytes(),
        cert=(home / "admin.crt").read_bytes(),
    ) as ch:
        raw = ch.unary_unary(
            "/sitepair.v1.Admin/CreateRegistrationKey",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff\x0f\x0a\x99", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in err.value.details()
    keys = admin.call(
        admin.stub.ListRegistrationKeys,
        admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
    ).keys
    assert list(keys) == []
    assert admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()).vault == "test"


def test_oversized_messages_are_refused(
    broker: BrokerThread, admin: AdminClient, credentials: Path
) -> None:
    from sitepair import credentials as creds_mod
    from sitepair.v1 import enrollment_pb2_grpc

    home = broker.home.admin_dir
    big = "x" * (CONTROL_MAX_MESSAGE + 1024)
    with _channel(
        broker.control,
        ca=(home / "ca.crt").read_bytes(),
        key=(home / "admin.key").read_bytes(),
        cert=(home / "admin.crt").read_bytes(),
    ) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateRegistrationKey(admin_pb2.CreateRegistrationKeyRequest(site=big), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    creds = creds_mod.load(credentials)
    with _channel(broker.enrollment, ca=creds.ca_pem) as ch:
        with pytest.raises(grpc.RpcError) as err:
            enrollment_pb2_grpc.EnrollmentStub(ch).Register(
                enrollment_pb2.RegisterRequest(key_id=creds.key_id, csr_der=b"\x00" * (512 * 1024)),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing was consumed or created, and the broker still answers.
    keys = admin.call(admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()).keys
    assert [k.uses_remaining for k in keys] == [1]


def test_garbage_csr_refused_without_consuming(
    broker: BrokerThread, admin: AdminClient, credentials: Path
) -> None:
    from sitepair import credentials as creds_mod
    from sitepair.v1 import enrollment_pb2_grpc

    creds = creds_mod.load(credentials)
    with _channel(broker.enrollment, ca=creds.ca_pem) as ch:
        with pytest.raises(grpc.RpcError) as err:
            enrollment_pb2_grpc.EnrollmentStub(ch).Register(
                enrollment_pb2.RegisterRequest(
                    key_id=creds.key_id, secret=creds.secret, name="hv-1", csr_der=b"not a csr"
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "PKCS#10" in err.value.details()
    keys = admin.call(admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()).keys
    assert [k.uses_remaining for k in keys] == [1]


def test_invalid_admin_arguments_get_clear_errors(broker: BrokerThread, admin: AdminClient) -> None:
    from sitepair.errors import InvalidArgument, NotFound

    with pytest.raises(InvalidArgument, match="site 'bad site'"):
        admin.call(
            admin.stub.CreateRegistrationKey,
            admin_pb2.CreateRegistrationKeyRequest(site="bad site"),
        )
    with pytest.raises(InvalidArgument, match="at most 90 days"):
        admin.call(
            admin.stub.CreateRegistrationKey,
            admin_pb2.CreateRegistrationKeyRequest(site="s", valid_seconds=365 * 86400),
        )
    with pytest.raises(NotFound, match="no server"):
        admin.call(admin.stub.GetServer, admin_pb2.GetServerRequest(server="nope"))
    with pytest.raises(NotFound, match="no job"):
        admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id="job-x"))
