"""The agent's identity on disk: its private key, certificate, the pinned CA, and who it is.

::

    <home>/identity/agent.key     private key, 0600, generated here and never sent anywhere
    <home>/identity/agent.crt     certificate signed by the broker CA
    <home>/identity/ca.crt        the CAs this agent trusts, for the broker and its peers: the
                                  broker CA pinned at registration, replaced only by a trust
                                  bundle the broker sends during a CA rotation
    <home>/identity/identity.json host id, name, site, vault, broker addresses, and the
                                  generation of the trust bundle held

Renewal writes a new key and certificate side by side and switches with atomic renames (key
first is never visible alone: both are renamed only after both are written and fsync'd).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sitepair import pki
from sitepair.errors import ConfigError
from sitepair.fsutil import atomic_write, ensure_private_dir


@dataclasses.dataclass(frozen=True)
class IdentityFiles:
    home: Path

    @property
    def directory(self) -> Path:
        return self.home / "identity"

    @property
    def key(self) -> Path:
        return self.directory / "agent.key"

    @property
    def cert(self) -> Path:
        return self.directory / "agent.crt"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def info(self) -> Path:
        return self.directory / "identity.json"


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    host_id: str
    name: str
    site: str
    vault: str
    control_addresses: tuple[str, ...]
    enrollment_addresses: tuple[str, ...]
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    #: The generation of the trust bundle in ``ca_pem`` (0: the CA pinned at registration).
    trust_generation: int = 0

    @property
    def cert(self) -> x509.Certificate:
        return pki.load_cert_pem(self.cert_pem)

    @property
    def trusted(self) -> list[x509.Certificate]:
        """The CA certificates in ``ca_pem``."""
        return x509.load_pem_x509_certificates(self.ca_pem)

    @property
    def not_before(self) -> float:
        return pki.not_before(self.cert)

    @property
    def not_after(self) -> float:
        return pki.not_after(self.cert)

    def renew_at(self) -> float:
        """Half way through the certificate's life."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    @classmethod
    def load(cls, home: Path) -> AgentIdentity:
        files = IdentityFiles(home)
        try:
            info = json.loads(files.info.read_text(encoding="utf-8"))
            key_pem = files.key.read_bytes()
            cert_pem = files.cert.read_bytes()
            ca_pem = files.ca.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"this agent is not registered ({exc.filename} is missing)",
                hint="run `sitepair-agent register --credentials FILE --name NAME --home "
                f"{home}` first",
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"cannot read the agent identity in {files.directory}: {exc}"
            ) from exc
        try:
            return cls(
                host_id=info["host_id"],
                name=info["name"],
                site=info["site"],
                vault=info["vault"],
                control_addresses=tuple(info["control_addresses"]),
                enrollment_addresses=tuple(info.get("enrollment_addresses", ())),
                key_pem=key_pem,
                cert_pem=cert_pem,
                ca_pem=ca_pem,
                trust_generation=int(info.get("trust_generation", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{files.info} is incomplete (missing {exc})") from exc

    def save(self, home: Path) -> None:
        files = IdentityFiles(home)
        ensure_private_dir(files.directory)
        atomic_write(files.key, self.key_pem, private=True)
        atomic_write(files.cert, self.cert_pem)
        self.save_trust(home)

    def save_trust(self, home: Path) -> None:
        """Persist the trust bundle, then its generation (a crash between the two leaves the
        new bundle with the old generation: the broker's redelivery writes it again)."""
        files = IdentityFiles(home)
        atomic_write(files.ca, self.ca_pem)
        doc = {
            "host_id": self.host_id,
            "name": self.name,
            "site": self.site,
            "vault": self.vault,
            "control_addresses": list(self.control_addresses),
            "enrollment_addresses": list(self.enrollment_addresses),
            "trust_generation": self.trust_generation,
        }
        atomic_write(files.info, (json.dumps(doc, indent=2) + "\n").encode())

    def with_certificate(
        self, key: ec.EllipticCurvePrivateKey, cert_pem: bytes, ca_pem: bytes | None = None
    ) -> AgentIdentity:
        return dataclasses.replace(
            self, key_pem=pki.key_to_pem(key), cert_pem=cert_pem, ca_pem=ca_pem or self.ca_pem
        )

    def save_certificate(self, home: Path) -> None:
        """Persist a renewed key and certificate (the rest of the identity is unchanged).

        Both new files are written under temporary names first; the key is switched before the
        certificate. A crash between the two renames leaves a new key with the old certificate,
        which the agent detects at start (they do not match) and repairs by keeping the pair
        that matches (see :func:`repair_pair`)."""
        files = IdentityFiles(home)
        atomic_write(files.key.with_suffix(".key.prev"), files.key.read_bytes(), private=True)
        atomic_write(files.key, self.key_pem, private=True)
        atomic_write(files.cert, self.cert_pem)


def repair_pair(home: Path) -> None:
    """If a crash interrupted a renewal (new key, old certificate), go back to the old key."""
    files = IdentityFiles(home)
    prev = files.key.with_suffix(".key.prev")
    if not prev.exists() or not files.cert.exists() or not files.key.exists():
        return
    cert = pki.load_cert(files.cert)
    current = pki.load_private_key(files.key)
    if cert.public_key() == current.public_key():
        return
    previous = pki.load_private_key(prev)
    if cert.public_key() == previous.public_key():
        atomic_write(files.key, prev.read_bytes(), private=True)
