"""The registration credentials file that ``sitepair-broker keys create`` writes.

An operator carries it to a host and runs ``sitepair-agent register --credentials FILE``. It holds
everything the agent needs to reach the right broker safely: the vault name, the broker's
enrollment addresses, the broker CA certificate to pin (so a man in the middle cannot pose as the
broker), the key id and its secret (256 random bits; the broker keeps only a hash), the expiry and
how many hosts may use it. It is JSON so an operator can read it; treat it like a password.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509

from sitepair import pki
from sitepair.clock import iso
from sitepair.errors import ConfigError, InvalidArgument

FORMAT = "sitepair-credentials/1"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16  # 128 bits: the floor the design sets
MAX_FILE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Credentials:
    vault: str
    site: str
    enrollment_addresses: tuple[str, ...]
    ca_pem: bytes
    key_id: str
    secret: bytes
    expires_at: float
    uses: int

    @property
    def ca_cert(self) -> x509.Certificate:
        return pki.load_cert_pem(self.ca_pem, what="CA certificate in the credentials file")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "vault": self.vault,
            "site": self.site,
            "enrollment_addresses": list(self.enrollment_addresses),
            "ca_certificate": self.ca_pem.decode("ascii"),
            "ca_fingerprint_sha256": pki.fingerprint(self.ca_cert),
            "key_id": self.key_id,
            "secret": base64.urlsafe_b64encode(self.secret).decode("ascii").rstrip("="),
            "expires_at": iso(self.expires_at),
            "uses": self.uses,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def hash_secret(key_id: str, secret: bytes) -> bytes:
    """What the broker stores instead of the secret. The secret has 256 bits of entropy, so a
    single keyed hash is enough (a slow KDF protects low-entropy passwords, not random keys)."""
    return hmac.new(key_id.encode(), secret, hashlib.sha256).digest()


def secret_matches(key_id: str, secret: bytes, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(key_id, secret), stored_hash)


def _field(doc: dict[str, Any], name: str, kind: type, path: Path) -> Any:
    if name not in doc:
        raise ConfigError(
            f"credentials file {path} has no {name!r}",
            hint="it is incomplete; create a new one with `sitepair-broker keys create`",
        )
    value = doc[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"credentials file {path}: {name!r} must be a {kind.__name__}")
    return value


def load(path: Path) -> Credentials:
    """Read and check a credentials file; every problem is a ConfigError naming the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than 64 KiB: not a sitepair credentials file")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"credentials file {path} is truncated or not JSON ({exc})",
            hint="copy the whole file again from the machine where `keys create` wrote it",
        ) from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"credentials file {path} is not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ConfigError(
            f"{path} is not a sitepair credentials file (format {fmt!r}, expected {FORMAT!r})"
        )
    addresses = _field(doc, "enrollment_addresses", list, path)
    if not addresses or not all(isinstance(a, str) and a for a in addresses):
        raise ConfigError(f"credentials file {path}: 'enrollment_addresses' must list addresses")
    secret_text = _field(doc, "secret", str, path)
    try:
        secret = base64.urlsafe_b64decode(secret_text + "=" * (-len(secret_text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"credentials file {path}: 'secret' is not base64") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"credentials file {path}: 'secret' is shorter than 128 bits")
    expires_text = _field(doc, "expires_at", str, path)
    try:
        expires = dt.datetime.fromisoformat(expires_text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"credentials file {path}: 'expires_at' is not a date") from exc
    ca_pem = _field(doc, "ca_certificate", str, path).encode("ascii", "replace")
    try:
        ca = pki.load_cert_pem(ca_pem, what="CA certificate")
    except InvalidArgument as exc:
        raise ConfigError(f"credentials file {path}: {exc.message}") from exc
    want_fp = doc.get("ca_fingerprint_sha256")
    if want_fp is not None and want_fp != pki.fingerprint(ca):
        raise ConfigError(
            f"credentials file {path}: the CA certificate does not match its fingerprint",
            hint="the file was altered; create a new one with `sitepair-broker keys create`",
        )
    try:
        vault = pki.check_vault_name(_field(doc, "vault", str, path))
        site = pki.check_identifier(_field(doc, "site", str, path), "site")
        key_id = pki.check_identifier(_field(doc, "key_id", str, path), "key id")
    except InvalidArgument as exc:
        raise ConfigError(f"credentials file {path}: {exc.message}") from exc
    uses = _field(doc, "uses", int, path)
    return Credentials(
        vault=vault,
        site=site,
        enrollment_addresses=tuple(addresses),
        ca_pem=ca_pem,
        key_id=key_id,
        secret=secret,
        expires_at=expires.timestamp(),
        uses=uses,
    )
