"""``sitepair-agent register``: trade a registration key for this host's certificate.

The private key is generated here and never leaves the host (written 0600). The request goes
over TLS to the broker's enrollment port, and the broker's certificate must chain to the CA in
the credentials file (pinned; the system's trust store is not used). The answer is checked
before anything is saved: the certificate must be signed by that CA, carry our public key, and
name the vault of the credentials and the role ``agent``.

The home is locked (:mod:`sitepair.homelock`) from before the configuration is written until the
identity is saved: an agent running on the home (whose identity folder an operator removed to
register again) refuses the registration before the registration key is used, and two
registrations on one home cannot interleave.

A failed registration leaves no half-made home: the configuration ``register`` renders from its
options is checked in memory first (a bad port or name is refused before anything is written),
and it is written, with the VM folder, only once the broker has answered. A retry with other
options therefore applies them. A home holding an ``agent.toml`` already (written by hand, or
left by an older version's failed attempt) keeps it, unless the options ask for another one:
then the registration is refused with the command that removes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from cryptography import x509

from agent import config as config_mod
from agent.facts import host_facts
from agent.identity import AgentIdentity, IdentityFiles
from sitepair import credentials, pki
from sitepair.clock import SYSTEM_CLOCK, Clock, iso
from sitepair.errors import (
    ConfigError,
    FailedPrecondition,
    SitepairError,
    Unavailable,
)
from sitepair.fsutil import atomic_write, ensure_private_dir
from sitepair.homelock import HomeLock
from sitepair.rpc import channel_options, error_from_rpc
from sitepair.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger("sitepair.agent.enroll")


def register(
    credentials_path: Path,
    *,
    name: str,
    home: Path,
    agent_toml: str | None = None,
    options_given: bool = True,
    clock: Clock = SYSTEM_CLOCK,
    timeout: float = 30.0,
) -> AgentIdentity:
    """Register this host; returns the saved identity. ``agent_toml`` is the configuration the
    options make; a home without one gets it. A home with another one keeps its own when
    ``options_given`` is false (no configuration option was given) and is refused otherwise."""
    name = pki.check_identifier(name, "server name")
    creds = credentials.load(credentials_path)
    if clock.now() >= creds.expires_at:
        raise ConfigError(
            f"registration key {creds.key_id} expired at {iso(creds.expires_at)}",
            hint="ask an operator for a new one: sitepair-broker keys create",
        )
    _check_unregistered(home)
    new_config = _configuration(home, agent_toml, options_given=options_given)
    ensure_private_dir(home)
    with HomeLock.acquire(home, what="agent home", holder="sitepair-agent register"):
        _check_unregistered(home)  # again, under the lock: another register may have just ended
        return _register_locked(creds, name=name, home=home, new_config=new_config, timeout=timeout)


def _configuration(home: Path, agent_toml: str | None, *, options_given: bool) -> str | None:
    """The configuration text to write on success (None: the home's own is used), checked."""
    path = home / "agent.toml"
    if path.exists():
        config_mod.load(home)  # a broken one is refused now, naming its problem
        if agent_toml is None or not options_given:
            return None
        if path.read_text(encoding="utf-8") != agent_toml:
            raise FailedPrecondition(
                f"{path} exists (written by hand, or by an earlier registration that failed) "
                "and differs from what these options would write",
                hint=f"to apply the options, remove it and register again: rm {path}; "
                "to keep it, register without configuration options",
            )
        return None
    if agent_toml is None:
        raise ConfigError(f"no agent configuration at {path}")
    config_mod.parse(agent_toml, home, source="the configuration these options make")
    return agent_toml


def _check_unregistered(home: Path) -> None:
    files = IdentityFiles(home)
    if files.info.exists():
        raise FailedPrecondition(
            f"{home} already holds a registered agent",
            hint=f"remove {files.directory} first if this host must register again",
        )


def _register_locked(
    creds: credentials.Credentials,
    *,
    name: str,
    home: Path,
    new_config: str | None,
    timeout: float,
) -> AgentIdentity:
    """The registration proper: call the broker, then write the configuration, the VM folder and
    the identity (nothing is written before the broker answered)."""
    cfg = config_mod.load(home) if new_config is None else config_mod.parse(new_config, home)

    key = pki.generate_key()
    request = enrollment_pb2.RegisterRequest(
        key_id=creds.key_id,
        secret=creds.secret,
        name=name,
        csr_der=pki.make_csr(key, name),
        facts=host_facts(backend=cfg.backend.kind, cloud=cfg.cloud),
        vault=creds.vault,
    )
    response = _call(creds, request, timeout)

    cert = pki.load_cert_pem(response.certificate_pem, what="certificate from the broker")
    # The credentials' CA, or during a CA rotation either CA of the bundle they carry.
    pki.issued_by_any(cert, x509.load_pem_x509_certificates(creds.ca_pem))
    if cert.public_key() != key.public_key():
        raise SitepairError("the broker returned a certificate for another key; nothing saved")
    identity = pki.identity_from_cert(cert)
    if (
        identity.role != pki.Role.AGENT
        or identity.vault != creds.vault
        or identity.id != response.host_id
    ):
        raise SitepairError(
            f"the broker returned a certificate for {identity.uri}, not an agent of vault "
            f"{creds.vault}; nothing saved"
        )
    agent = AgentIdentity(
        host_id=response.host_id,
        name=name,
        site=response.site,
        vault=creds.vault,
        control_addresses=tuple(response.control_addresses),
        enrollment_addresses=creds.enrollment_addresses,
        key_pem=pki.key_to_pem(key),
        cert_pem=response.certificate_pem,
        ca_pem=creds.ca_pem,
    )
    if new_config is not None:
        atomic_write(home / "agent.toml", new_config.encode())
    # The folder VMs live in (and whose volume the host reports): made now, like the other
    # folders of the home, so the host reports its storage from its first connection.
    ensure_private_dir(cfg.backend.vm_root)
    agent.save(home)
    log.info(
        "registered",
        extra={"fields": {"host_id": agent.host_id, "site": agent.site, "vault": agent.vault}},
    )
    return agent


def _call(
    creds: credentials.Credentials, request: enrollment_pb2.RegisterRequest, timeout: float
) -> enrollment_pb2.RegisterResponse:
    tls = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem)
    last: SitepairError | None = None
    for address in creds.enrollment_addresses:
        with grpc.secure_channel(
            address, tls, options=channel_options(target_name=pki.BROKER_DNS_NAME)
        ) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            try:
                response: enrollment_pb2.RegisterResponse = stub.Register(request, timeout=timeout)
                return response
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, peer=f"broker at {address}")
                if not isinstance(err, Unavailable):
                    raise err from None
                last = err
    assert last is not None
    raise last
