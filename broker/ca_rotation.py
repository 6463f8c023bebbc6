"""A CA rotation as the running broker carries it out: phases, the hosts' trust, the gates.

:class:`broker.ca.CertificateAuthority` keeps the CAs and the phase on disk; this module tells
everyone else. Each phase sends every host that is not removed a ``TrustBundle`` command (stored,
so a host offline now gets it when it reconnects; :meth:`CaRotation.on_connected` sends it again
to a host that has not confirmed the bundle, whatever it missed). A host's answer is what the
gates read, kept in the store's ``meta`` table beside the host's id:

* ``ca.bundle.<host>``: the digest of the bundle the host confirmed holding
  (:func:`sitepair.pki.bundle_digest`); ``ca.bundle_error.<host>`` why it refused the last one;
* ``ca.issuer.<host>``: the key id of the CA that issued the host's certificate, written by the
  broker itself each time it issues one (enrollment, renewal), never taken from the host;
* ``ca.held.<host>``: the issuer of the certificate the host says it holds, from its answer to
  the last ``TrustBundle``. A certificate counts as the new CA's only when both agree: the
  broker may have issued one that the host never stored (it crashed before the write), and a
  host that claims a certificate the broker never issued to it gains nothing.

``activate`` is refused while a host has not confirmed the bundle: the new CA's certificates
(the broker's first) would be refused by it. ``finish`` is refused while a host holds a
certificate of the old CA: it would be refused from then on. Both name the hosts; ``force``
goes on anyway (those hosts must register again).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from broker.ca import CertificateAuthority, Phase, ServerCertificate, refresh_local_operator
from broker.home import BrokerHome
from broker.store.base import Store
from broker.store.models import Server
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.logsafe import shown
from sitepair.protoconv import timestamp
from sitepair.v1 import admin_pb2, control_pb2

if TYPE_CHECKING:
    from cryptography import x509

    from broker.commands import CommandDispatcher
    from broker.sessions import SessionRegistry

log = logging.getLogger("sitepair.broker.ca")

META_BUNDLE = "ca.bundle."
META_BUNDLE_ERROR = "ca.bundle_error."
META_ISSUER = "ca.issuer."
META_HELD = "ca.held."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A CA's key id (sitepair.pki.key_id: a SHA-1 subject key identifier, or longer).
_KEY_ID = re.compile(r"^[0-9a-f]{40,128}$")
#: How much of an agent's refusal is kept.
MAX_ERROR = 500
#: How many hosts a refused phase names (``ca status`` lists them all).
MAX_NAMED = 20
#: What the store holds of one host's trust: the bundle digest it confirmed, the key id of the
#: CA that issued its certificate (when the broker's record and the host's answer agree), why it
#: refused the last bundle ("" each when none).
HostTrust: TypeAlias = tuple[str, str, str]


def _issuer(issued: str | None, held: str | None) -> str:
    """The CA of a host's certificate, known only when what the broker issued is what the host
    says it holds ("" otherwise)."""
    return issued if issued and issued == held else ""


def record_issuer(tx: Tx, server_id: str, cert: x509.Certificate) -> None:
    """Remember which CA issued a host's certificate (in the transaction that stores it)."""
    tx.set_meta(META_ISSUER + server_id, pki.issuer_id(cert))


class CaRotation:
    def __init__(
        self,
        *,
        home: BrokerHome,
        ca: CertificateAuthority,
        server_cert: ServerCertificate,
        store: Store,
        dispatcher: CommandDispatcher,
        sessions: SessionRegistry,
        clock: Clock,
        operator_lifetime: float,
    ) -> None:
        self._home = home
        self._ca = ca
        self._server_cert = server_cert
        self._store = store
        self._dispatcher = dispatcher
        self._sessions = sessions
        self._clock = clock
        self._operator_lifetime = operator_lifetime
        self._lock = asyncio.Lock()

    # -- phases -----------------------------------------------------------------------------
    async def rotate(self, phase: int, *, force: bool, by: str) -> admin_pb2.CaStatus:
        """Run one phase (``admin_pb2.RotateCaRequest.Phase``) and return the status after it."""
        Request = admin_pb2.RotateCaRequest
        async with self._lock:
            ca = self._ca
            if phase == Request.START:
                await asyncio.to_thread(ca.start_rotation, self._clock.now())
                await asyncio.to_thread(self._refresh_local_operator)
                note = (
                    "every host is asked to trust the new CA beside the current one. Operators "
                    "with a profile from `operators add`: write the bundle into it "
                    "(`sitepair-broker ca bundle --out PROFILE/ca.crt --profile PROFILE`). "
                    "Next: `sitepair-broker ca status` until every host confirmed the bundle, "
                    "then `sitepair-broker ca rotate activate`"
                )
            elif phase == Request.ACTIVATE:
                await self._gate(
                    lambda trust: trust[0] != ca.bundle_digest,
                    "have not confirmed the new trust bundle",
                    force=force,
                    hint="connect them and wait (`sitepair-broker ca status`), remove the "
                    "servers that are gone, or pass --force (those hosts will refuse the "
                    "broker's new certificate and must register again)",
                )
                await asyncio.to_thread(ca.activate_rotation)
                await asyncio.to_thread(self._server_cert.ensure_fresh, force=True)
                await asyncio.to_thread(self._refresh_local_operator)
                note = (
                    "the new CA issues; every host is asked to renew its certificate now. "
                    "Operators with a profile from `operators add`: get a new one "
                    "(`operators add`) before the rotation finishes. Next: "
                    "`sitepair-broker ca rotate finish` once every host holds a certificate of "
                    "the new CA (`ca status`)"
                )
            elif phase == Request.FINISH:
                left_behind = await self._gate(
                    lambda trust: trust[1] != ca.id,
                    "still hold a certificate of the old CA",
                    force=force,
                    hint="connect them and wait for their renewal (`sitepair-broker ca "
                    "status`), remove the servers that are gone, or pass --force (those hosts "
                    "are refused from then on and must register again)",
                )
                archived = await asyncio.to_thread(ca.finish_rotation)
                await asyncio.to_thread(self._refresh_local_operator)
                # Their streams were authenticated by the old CA: end them; a new handshake
                # with that certificate is refused.
                for s in left_behind:
                    self._sessions.close(
                        s.id,
                        control_pb2.Goodbye(
                            reason=control_pb2.Goodbye.SHUTTING_DOWN,
                            message="the vault's CA was rotated and this host's certificate is "
                            "of the old CA: register the host again",
                        ),
                    )
                note = (
                    f"the old CA is no longer trusted; its key is archived in {archived}. "
                    "If the rotation was because that key leaked, delete the folder"
                )
            else:
                raise InvalidArgument("name the phase: start, activate or finish")
            sent = await self._push(renew=phase == Request.ACTIVATE)
        log.warning(
            "CA rotation phase done",
            extra={"fields": {"phase": ca.phase.value, "by": by, "hosts_told": sent}},
        )
        status = await self.status()
        status.note = note
        status.commands_sent = sent
        return status

    async def _gate(
        self, pending: Callable[[HostTrust], bool], what: str, *, force: bool, hint: str
    ) -> list[Server]:
        """Refuse the phase, naming the hosts whose trust ``pending`` picks (the first
        :data:`MAX_NAMED`), unless ``force``: then return them."""
        hosts = await self._hosts()
        late = [s for s, trust in hosts if pending(trust)]
        if not late:
            return []
        names = ", ".join(f"{s.name} ({s.id})" for s in late[:MAX_NAMED])
        if len(late) > MAX_NAMED:
            names += f" and {len(late) - MAX_NAMED} more (see `sitepair-broker ca status`)"
        if not force:
            raise FailedPrecondition(f"{len(late)} host(s) {what}: {names}", hint=hint)
        log.warning(
            "CA rotation forced past hosts", extra={"fields": {"why": what, "hosts": names}}
        )
        return late

    def _refresh_local_operator(self) -> None:
        refresh_local_operator(
            self._home, self._ca, now=self._clock.now(), lifetime=self._operator_lifetime
        )

    def _trust_command(self, *, renew: bool) -> control_pb2.Command:
        return control_pb2.Command(
            trust_bundle=control_pb2.TrustBundle(
                bundle_pem=self._ca.pem, generation=self._ca.generation, renew=renew
            )
        )

    async def _push(self, *, renew: bool) -> int:
        """The current bundle to every host not removed (stored: offline ones get it later)."""
        servers: list[Server] = await self._store.reading(lambda tx: tx.list_servers())
        body = self._trust_command(renew=renew)
        for s in servers:
            await self._dispatcher.submit(s.id, body)
        return len(servers)

    # -- what hosts say ---------------------------------------------------------------------
    async def on_connected(self, server_id: str) -> None:
        """A host connected: if a rotation ever happened and it has not confirmed the current
        bundle and has no bundle waiting, send one (a host registered from an older
        credentials file, or whose commands were cancelled)."""
        ca = self._ca
        if ca.generation == 0:
            return

        def read(tx: Tx) -> tuple[str | None, str, bool]:
            waiting = any(c.kind == "trust_bundle" for c in tx.open_commands(server_id))
            return (
                tx.get_meta(META_BUNDLE + server_id),
                _issuer(tx.get_meta(META_ISSUER + server_id), tx.get_meta(META_HELD + server_id)),
                waiting,
            )

        confirmed, issuer, waiting = await self._store.reading(read)
        if waiting or (confirmed == ca.bundle_digest and issuer == ca.id):
            return
        renew = ca.phase == Phase.ACTIVATED and issuer != ca.id
        await self._dispatcher.submit(server_id, self._trust_command(renew=renew))

    async def on_ack(self, server_id: str, ack: control_pb2.CommandAck) -> None:
        """Record a host's answer to a ``TrustBundle`` command (already accepted by the
        dispatcher as this host's)."""
        if ack.state == control_pb2.CommandAck.SUCCEEDED:
            digest = ack.result.trust_bundle.bundle_sha256
            held = ack.result.trust_bundle.issuer_id
            if not _HEX64.match(digest) or not _KEY_ID.match(held):
                log.warning(
                    "trust bundle confirmation without a digest or issuer ignored",
                    extra={
                        "fields": {
                            "server": server_id,
                            "digest": shown(digest),
                            "held": shown(held),
                        }
                    },
                )
                return

            def confirmed(tx: Tx) -> None:
                tx.set_meta(META_BUNDLE + server_id, digest)
                tx.set_meta(META_HELD + server_id, held)
                tx.set_meta(META_BUNDLE_ERROR + server_id, "")

            await self._store.writing(confirmed)
        elif ack.state == control_pb2.CommandAck.FAILED:
            error = ack.error[:MAX_ERROR]
            log.warning(
                "a host refused the trust bundle",
                extra={"fields": {"server": server_id, "error": shown(error, 200)}},
            )
            await self._store.writing(lambda tx: tx.set_meta(META_BUNDLE_ERROR + server_id, error))

    # -- status -----------------------------------------------------------------------------
    async def _hosts(self) -> list[tuple[Server, HostTrust]]:
        """Every host not removed, with what is stored of its trust."""

        def read(tx: Tx) -> list[tuple[Server, HostTrust]]:
            return [
                (
                    s,
                    (
                        tx.get_meta(META_BUNDLE + s.id) or "",
                        _issuer(tx.get_meta(META_ISSUER + s.id), tx.get_meta(META_HELD + s.id)),
                        tx.get_meta(META_BUNDLE_ERROR + s.id) or "",
                    ),
                )
                for s in tx.list_servers()
            ]

        hosts: list[tuple[Server, HostTrust]] = await self._store.reading(read)
        return hosts

    async def status(self) -> admin_pb2.CaStatus:
        ca = self._ca
        digest = ca.bundle_digest
        status = admin_pb2.CaStatus(
            phase=ca.phase.value,
            generation=ca.generation,
            bundle_sha256=digest,
            bundle_pem=ca.pem,
        )
        for cert in ca.bundle:
            status.certificates.append(
                admin_pb2.CaCertificate(
                    id=pki.key_id(cert),
                    subject=cert.subject.rfc4514_string(),
                    fingerprint_sha256=pki.fingerprint(cert),
                    not_before=timestamp(pki.not_before(cert)),
                    not_after=timestamp(pki.not_after(cert)),
                    issuing=cert == ca.cert,
                )
            )
        for s, (bundle, issuer, error) in await self._hosts():
            status.hosts.append(
                admin_pb2.CaHost(
                    id=s.id,
                    name=s.name,
                    site=s.site,
                    bundle_sha256=bundle,
                    bundle_current=bundle == digest,
                    issuer_id=issuer,
                    issuer_current=issuer == ca.id,
                    certificate_not_after=timestamp(s.cert_not_after),
                    error=error,
                    connected=s.connected,
                )
            )
        return status
