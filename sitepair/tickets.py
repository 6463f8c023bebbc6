"""Replication tickets for port 8083: the broker plays the Kerberos KDC, with Ed25519 signatures.

In ticket mode the replica's port presents a normal TLS server certificate (its agent
certificate, so the sender still knows it reached the right host), but the sender presents no
client certificate. Instead it sends a ticket in the ``sitepair-ticket`` metadata: a statement
signed by the broker's ticket key that binds

    source host, replica host, relationship, VM, epoch, issue time, expiry, nonce

The receiver checks the signature with the broker's public ticket key (given to it with the
replication grant), that every bound field matches what it is about to accept, that the ticket is
inside its validity window allowing for clock skew, and that its nonce was never seen before
(replay cache): a ticket authorizes one connection, once. Tickets only ever travel inside TLS.
Nothing here is home-made cryptography: Ed25519 from ``cryptography``, JSON for the statement.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sitepair.errors import ConfigError, PermissionDenied, Unauthenticated

METADATA_KEY = "sitepair-ticket"
#: How far apart two hosts' clocks may be before tickets stop working.
DEFAULT_SKEW = 300.0
#: Tickets are short-lived: one is asked for each connection.
DEFAULT_LIFETIME = 600.0
_MAX_TICKET = 4096


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write_signing_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    from sitepair.fsutil import atomic_write

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, private=True)


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read ticket signing key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def public_key_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclasses.dataclass(frozen=True)
class Ticket:
    source_host: str
    replica_host: str
    relationship: str
    vm: str
    epoch: int
    issued_at: float
    expires_at: float
    nonce: str


def issue(
    key: ed25519.Ed25519PrivateKey,
    *,
    source_host: str,
    replica_host: str,
    relationship: str,
    vm: str,
    epoch: int,
    now: float,
    lifetime: float = DEFAULT_LIFETIME,
) -> str:
    """A signed ticket, as the text that travels in the metadata."""
    ticket = Ticket(
        source_host=source_host,
        replica_host=replica_host,
        relationship=relationship,
        vm=vm,
        epoch=epoch,
        issued_at=now,
        expires_at=now + lifetime,
        nonce=secrets.token_hex(16),
    )
    body = json.dumps(dataclasses.asdict(ticket), sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(body)
    return _b64(body) + "." + _b64(sig)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TicketVerifier:
    """Verifies tickets for one replica host and remembers nonces until they expire.

    ``remember(nonce, expires_at, now)`` records a nonce durably and returns False if it was
    already known; without it nonces are remembered in memory only (a restart forgets them)."""

    def __init__(
        self,
        replica_host: str,
        *,
        skew: float = DEFAULT_SKEW,
        remember: Callable[[str, float, float], bool] | None = None,
    ) -> None:
        self.replica_host = replica_host
        self.skew = skew
        self._remember = remember
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def verify(
        self,
        text: str,
        *,
        public_key: bytes,
        relationship: str,
        vm: str,
        source_host: str,
        epoch: int,
        now: float,
    ) -> Ticket:
        """Check ``text`` authorizes this connection; raise Unauthenticated/PermissionDenied."""
        if not text or len(text) > _MAX_TICKET or text.count(".") != 1:
            raise Unauthenticated("no valid replication ticket was presented")
        body_text, sig_text = text.split(".")
        try:
            body, sig = _unb64(body_text), _unb64(sig_text)
        except (binascii.Error, ValueError) as exc:
            raise Unauthenticated("the replication ticket is not well formed") from exc
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(sig, body)
        except (InvalidSignature, ValueError) as exc:
            raise Unauthenticated(
                "the replication ticket's signature does not verify with the broker's key"
            ) from exc
        try:
            doc = json.loads(body)
            ticket = Ticket(**doc)
        except (ValueError, TypeError) as exc:
            raise Unauthenticated("the replication ticket's content is malformed") from exc
        if ticket.replica_host != self.replica_host:
            raise PermissionDenied("the replication ticket was issued for another replica host")
        if (ticket.relationship, ticket.vm, ticket.source_host) != (relationship, vm, source_host):
            raise PermissionDenied(
                "the replication ticket does not name this relationship, VM and source host"
            )
        if ticket.epoch != epoch:
            raise PermissionDenied(
                f"the replication ticket is for epoch {ticket.epoch}, the cycle is for {epoch}"
            )
        if now + self.skew < ticket.issued_at:
            raise Unauthenticated(
                "the replication ticket was issued in the future: check the clocks of the "
                "broker and this host (more than "
                f"{self.skew:.0f} s apart)"
            )
        if now - self.skew > ticket.expires_at:
            raise Unauthenticated(
                f"the replication ticket expired {now - ticket.expires_at:.0f} s ago by this "
                "host's clock; the sender asks for a new one, and if fresh tickets keep failing, "
                f"this host's clock is more than {self.skew:.0f} s ahead of the broker's"
            )
        if self._remember is not None:
            fresh = self._remember(ticket.nonce, ticket.expires_at + self.skew, now)
        else:
            with self._lock:
                for nonce, until in list(self._seen.items()):
                    if until < now - self.skew:
                        del self._seen[nonce]
                fresh = ticket.nonce not in self._seen
                self._seen[ticket.nonce] = ticket.expires_at
        if not fresh:
            raise Unauthenticated("the replication ticket was already used (replay refused)")
        return ticket
