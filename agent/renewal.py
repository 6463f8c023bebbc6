"""Certificate renewal at half life, with a fresh key each time, over mutual TLS, and the trust
bundle a CA rotation sends.

The current certificate authenticates the renewal; the broker signs the new public key with the
identity from its own record. If the broker cannot be reached the renewer retries with backoff;
if the certificate has already expired, mutual TLS is impossible and the agent must register
again (the log says so).

During a CA rotation (docs/security.md) the broker sends a ``TrustBundle``: the CAs to trust,
for the broker and for peers. :meth:`CertificateRenewer.apply_trust` takes it only if it holds
the CA that issued this agent's current certificate (so no broker can make the agent drop the
anchor it works with in one step) and is not older than the bundle held; it is stored with
atomic writes and used for every new connection from then on. ``renew`` asks for a certificate
of the new CA at once rather than at half life.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import grpc
import grpc.aio

from agent.identity import AgentIdentity
from sitepair import pki
from sitepair.clock import Clock, iso
from sitepair.errors import InvalidArgument, SitepairError, Unauthenticated
from sitepair.rpc import channel_options, error_from_rpc
from sitepair.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger("sitepair.agent.renewal")


class IdentityHolder:
    """The current identity, replaced on renewal; readers call :meth:`get` for each use."""

    def __init__(self, identity: AgentIdentity) -> None:
        self._identity = identity

    def get(self) -> AgentIdentity:
        return self._identity

    def set(self, identity: AgentIdentity) -> None:
        self._identity = identity


class CertificateRenewer:
    def __init__(self, home: Path, holder: IdentityHolder, clock: Clock) -> None:
        self._home = home
        self._holder = holder
        self._clock = clock
        self._stop = asyncio.Event()
        #: One renewal or trust change at a time (a rotation's commands may arrive together).
        self._lock = asyncio.Lock()
        self.renewals = 0

    async def renew_now(self) -> AgentIdentity:
        async with self._lock:
            return await self._renew()

    async def apply_trust(self, bundle: control_pb2.TrustBundle) -> control_pb2.TrustBundleResult:
        """Take a CA rotation's trust bundle (see the module docstring); refused with a reason
        the broker records."""
        async with self._lock:
            current = self._holder.get()
            if bundle.generation >= current.trust_generation:
                cas = pki.load_bundle(bundle.bundle_pem, now=self._clock.now())
                try:
                    pki.issued_by_any(current.cert, cas)
                except InvalidArgument:
                    raise InvalidArgument(
                        "the trust bundle does not hold the CA that issued this host's "
                        "certificate; kept the CAs trusted now",
                        hint="the broker must send a bundle with both the current and the new CA",
                    ) from None
                current = dataclasses.replace(
                    current, ca_pem=pki.bundle_to_pem(cas), trust_generation=bundle.generation
                )
                await asyncio.to_thread(current.save_trust, self._home)
                self._holder.set(current)
                log.info(
                    "trust bundle stored",
                    extra={"fields": {"generation": bundle.generation, "cas": len(cas)}},
                )
            else:
                log.info(
                    "older trust bundle ignored",
                    extra={
                        "fields": {
                            "generation": bundle.generation,
                            "held": current.trust_generation,
                        }
                    },
                )
            cas = current.trusted
            renewed = bundle.renew and pki.issuer_id(current.cert) != pki.key_id(cas[0])
            if renewed:
                current = await self._renew()
            return control_pb2.TrustBundleResult(
                bundle_sha256=pki.bundle_digest(cas),
                generation=current.trust_generation,
                issuer_id=pki.issuer_id(current.cert),
                renewed=renewed,
            )

    async def _renew(self) -> AgentIdentity:
        current = self._holder.get()
        if self._clock.now() >= current.not_after:
            raise Unauthenticated(
                f"this agent's certificate expired at {iso(current.not_after)}",
                hint="register the host again with a new registration key",
            )
        key = pki.generate_key()
        request = control_pb2.RenewRequest(csr_der=pki.make_csr(key, current.name))
        address = current.control_addresses[0]
        async with grpc.aio.secure_channel(
            address,
            current.channel_credentials(),
            options=channel_options(target_name=pki.BROKER_DNS_NAME),
        ) as channel:
            try:
                response = await control_pb2_grpc.ControlStub(channel).Renew(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, peer=f"broker at {address}") from None
        cert = pki.load_cert_pem(response.certificate_pem, what="renewed certificate")
        pki.issued_by_any(cert, current.trusted)
        ident = pki.identity_from_cert(cert)
        if cert.public_key() != key.public_key() or ident.id != current.host_id:
            raise SitepairError(
                "the broker returned a certificate that is not ours; kept the old one"
            )
        renewed = current.with_certificate(key, response.certificate_pem)
        await asyncio.to_thread(renewed.save_certificate, self._home)
        self._holder.set(renewed)
        self.renewals += 1
        log.info("certificate renewed", extra={"fields": {"not_after": iso(renewed.not_after)}})
        return renewed

    async def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            wait = max(0.0, self._holder.get().renew_at() - self._clock.now())
            if failures and wait == 0:
                wait = min(300.0, 2.0**failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=wait)
            if self._stop.is_set():
                return
            if self._clock.now() < self._holder.get().renew_at():
                continue
            try:
                await self.renew_now()
                failures = 0
            except Unauthenticated as exc:
                log.error(
                    "certificate expired; cannot renew", extra={"fields": {"error": str(exc)}}
                )
                failures = min(failures + 1, 10)
            except SitepairError as exc:
                failures = min(failures + 1, 10)
                log.warning("renewal failed; will retry", extra={"fields": {"error": str(exc)}})

    async def shutdown(self) -> None:
        self._stop.set()
