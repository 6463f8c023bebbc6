"""Enrollment: a registration key buys one agent certificate (port 8444, server TLS).

The order of checks matters:

1. the request is well formed (name, CSR with a valid self-signature and a P-256 key);
2. the key exists and the secret matches its stored hash (constant-time); a wrong secret does
   not consume a use, so nobody can burn an operator's key by guessing;
3. one use is taken atomically (``UPDATE ... WHERE uses_remaining > 0``), *then* expiry is
   checked: an expired key is refused and its use consumed, as the design asks;
4. the server record is created with an id the broker chooses; the certificate's identity comes
   from that record, never from the CSR subject. Steps 3 and 4 are one transaction, so a refused
   name (already registered) gives the use back.

Nobody is authenticated until step 2 has passed, so every request field is bounded before it is
used, logged or echoed: a key id longer than :data:`MAX_KEY_ID` or a secret longer than
:data:`MAX_SECRET` is refused without being repeated; the facts pass
:func:`broker.bounds.accept_facts` (refused when over 16 KiB or when a field the broker acts on
breaks its rule); and whatever is logged or put in an error message from the request is cut by
:func:`sitepair.logsafe.shown` to 64 characters plus its original length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING, Any

import grpc.aio
from cryptography import x509

from broker import bounds
from broker.ca_rotation import record_issuer
from broker.store.models import Server
from sitepair import credentials, pki
from sitepair.clock import iso
from sitepair.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from sitepair.logsafe import shown
from sitepair.protoconv import timestamp
from sitepair.rpc import rpc
from sitepair.v1 import enrollment_pb2, enrollment_pb2_grpc

if TYPE_CHECKING:
    from broker.services.context import BrokerContext

log = logging.getLogger("sitepair.broker.enrollment")

#: Longest registration key id accepted (the broker makes ``key-`` + 12 hex digits).
MAX_KEY_ID = 64
#: Longest server name (:func:`sitepair.pki.check_identifier` allows 128 characters).
MAX_NAME = 128
#: Longest secret accepted, in bytes (the broker issues 32).
MAX_SECRET = 256


@dataclasses.dataclass(frozen=True)
class _Outcome:
    server: Server | None = None
    cert: x509.Certificate | None = None
    refusal: str = ""
    expires_at: float = 0.0


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self.authorizer = ctx.authorizer
        self._slots = asyncio.Semaphore(ctx.config.limits.max_concurrent_enrollments)

    @rpc(roles=None)
    async def Register(
        self,
        request: enrollment_pb2.RegisterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> enrollment_pb2.RegisterResponse:
        if self._slots.locked():
            raise ResourceExhausted("too many registrations at once", hint="retry in a moment")
        async with self._slots:
            return await self._register(request)

    async def _register(
        self, request: enrollment_pb2.RegisterRequest
    ) -> enrollment_pb2.RegisterResponse:
        ctx = self.ctx
        if len(request.name) > MAX_NAME:
            raise InvalidArgument(
                f"the server name is {len(request.name)} characters; at most {MAX_NAME} are allowed"
            )
        name = pki.check_identifier(request.name, "server name")
        if not request.key_id:
            raise InvalidArgument("registration request has no key id")
        if len(request.key_id) > MAX_KEY_ID or len(request.secret) > MAX_SECRET:
            log.warning(
                "registration refused",
                extra={
                    "fields": {
                        "key": shown(request.key_id),
                        "name": name,
                        "why": "oversized key id or secret",
                    }
                },
            )
            raise Unauthenticated(
                "the registration key id or secret is longer than any this broker issues",
                hint="check the credentials file, or create a new key",
            )
        if request.vault and request.vault != ctx.config.vault:
            raise FailedPrecondition(
                f"the credentials are for vault {shown(request.vault)!r}, but this broker "
                f"serves vault {ctx.config.vault!r}",
                hint="use a credentials file created by this broker",
            )
        public_key = pki.public_key_from_csr(request.csr_der)
        facts = bounds.accept_facts(request.facts)
        facts_json = bounds.to_json(facts)
        now = ctx.clock.now()
        lifetime = ctx.config.certificates.agent_lifetime

        # Hand-rolled rather than store.writing: the certificate is signed inside the
        # transaction (its serial is stored with the server, as the key's use is consumed), and
        # a retried transaction would sign a second one.
        def enroll() -> _Outcome:
            with ctx.store.write() as tx:
                key = tx.get_key(request.key_id)
                if key is None or not credentials.secret_matches(
                    request.key_id, request.secret, key.secret_hash
                ):
                    return _Outcome(refusal="unknown")
                if not tx.consume_key_use(key.id):
                    return _Outcome(refusal="revoked" if key.revoked_at is not None else "used up")
                if now >= key.expires_at:
                    return _Outcome(refusal="expired", expires_at=key.expires_at)  # use consumed
                host_id = f"host-{uuid.uuid4().hex[:16]}"
                cert = ctx.ca.issue_agent(
                    public_key,
                    host_id=host_id,
                    name=name,
                    site=key.site,
                    now=now,
                    lifetime=lifetime,
                )
                server = Server(
                    id=host_id,
                    name=name,
                    site=key.site,
                    registered_at=now,
                    registration_key_id=key.id,
                    cert_serial=format(cert.serial_number, "x"),
                    cert_not_after=pki.not_after(cert),
                    facts_json=facts_json,
                    agent_version=facts.agent_version,
                    cloud=facts.cloud,
                )
                tx.insert_server(server)
                record_issuer(tx, host_id, cert)
                return _Outcome(server=server, cert=cert)

        outcome = await asyncio.to_thread(enroll)
        if outcome.server is None or outcome.cert is None:
            log.warning(
                "registration refused",
                extra={
                    "fields": {"key": shown(request.key_id), "name": name, "why": outcome.refusal}
                },
            )
            if outcome.refusal == "unknown":
                raise Unauthenticated(
                    f"registration key {shown(request.key_id)!r} is unknown or its secret does "
                    "not match",
                    hint="check the credentials file, or create a new key",
                )
            if outcome.refusal == "expired":
                raise PermissionDenied(
                    f"registration key {request.key_id} expired at {iso(outcome.expires_at)}",
                    hint="create a new key with `sitepair-broker keys create`",
                )
            raise PermissionDenied(
                f"registration key {request.key_id} is {outcome.refusal}",
                hint="create a new key with `sitepair-broker keys create`",
            )
        server, cert = outcome.server, outcome.cert
        log.info(
            "server registered",
            extra={
                "fields": {
                    "server": server.id,
                    "name": server.name,
                    "site": server.site,
                    "key": server.registration_key_id,
                    "serial": server.cert_serial,
                }
            },
        )
        return enrollment_pb2.RegisterResponse(
            host_id=server.id,
            site=server.site,
            vault=ctx.config.vault,
            certificate_pem=pki.cert_to_pem(cert),
            ca_pem=ctx.ca.pem,
            control_addresses=ctx.control_addresses(),
            not_after=timestamp(server.cert_not_after),
        )
