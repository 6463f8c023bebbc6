"""Certificates and keys: the broker CA, agent/operator/broker certificates, identities.

Identity lives in one URI subject-alternative name of the form::

    sitepair://<vault>/<role>/<id>[?site=<site>]

with ``role`` one of ``agent``, ``admin``, ``broker``. Servers authorize every RPC from that URI
in the *verified* peer certificate (``sitepair.rpc.peer_identity``), never from request fields.
Agent certificates also carry the DNS name ``<host-id>.agent.sitepair`` so that an agent can act
as a TLS server (the replication receiver) and its peers can check they reached the right host;
the broker's certificate carries ``broker.sitepair``, which agents use as the TLS target name
while pinning the broker CA. Nothing is home-made: keys are ECDSA P-256, signatures
ECDSA-SHA256, all from ``cryptography``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import ipaddress
import re
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sitepair.errors import InvalidArgument, Unauthenticated
from sitepair.fsutil import atomic_write

BROKER_DNS_NAME = "broker.sitepair"
AGENT_DNS_SUFFIX = ".agent.sitepair"
#: Certificates start this long before issue, so a peer whose clock is a little behind accepts them.
BACKDATE = dt.timedelta(minutes=5)

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Role(enum.StrEnum):
    AGENT = "agent"
    ADMIN = "admin"
    BROKER = "broker"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is (after the chain has been verified)."""

    vault: str
    role: Role
    id: str
    site: str = ""
    serial: int = 0
    not_after: float = 0.0

    @property
    def uri(self) -> str:
        uri = f"sitepair://{self.vault}/{self.role.value}/{quote(self.id, safe='')}"
        if self.site:
            uri += f"?site={quote(self.site, safe='')}"
        return uri

    def __str__(self) -> str:
        return f"{self.role.value} {self.id}" + (f" (site {self.site})" if self.site else "")


def check_vault_name(name: str) -> str:
    """Vault names are DNS labels: lowercase letters, digits and dashes, at most 63."""
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"vault name {name!r} is not valid",
            hint="use 1-63 lowercase letters, digits and dashes, starting and ending with a "
            "letter or digit",
        )
    return name


def check_identifier(value: str, what: str) -> str:
    """Names of sites, servers, operators: printable, no separators that would confuse paths."""
    if not _ID_RE.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is not valid",
            hint="use up to 128 letters, digits, dots, dashes and underscores, "
            "starting with a letter or digit",
        )
    return value


def agent_dns_name(host_id: str) -> str:
    return f"{host_id}{AGENT_DNS_SUFFIX}"


# -- keys and requests ------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key readable only by its owner (0600 from creation)."""
    atomic_write(path, key_to_pem(key), private=True)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{path}: expected an EC private key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PKCS#10 request (DER). The broker uses only its public key."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def public_key_from_csr(csr_der: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a CSR, check its self-signature, and return the public key; the subject is ignored."""
    if len(csr_der) > 16384:
        raise InvalidArgument("certificate request is larger than 16 KiB")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError as exc:
        raise InvalidArgument(f"certificate request is not a valid DER PKCS#10: {exc}") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("certificate request signature does not verify")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise InvalidArgument("certificate request must carry an ECDSA P-256 public key")
    return pub


# -- certificates -----------------------------------------------------------------------------


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not a valid PEM certificate: {exc}") from exc


def load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read certificate {path}: {exc.strerror}") from exc
    return load_cert_pem(data, what=str(path))


def create_ca(
    vault: str, *, now: float, years: int = 10
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = generate_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sitepair"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sitepair CA {vault}"),
        ]
    )
    start = dt.datetime.fromtimestamp(now, tz=dt.UTC) - BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    *,
    common_name: str,
    now: float,
    lifetime_seconds: float,
    dns_names: list[str] | tuple[str, ...] = (),
    ip_addresses: list[str] | tuple[str, ...] = (),
) -> x509.Certificate:
    """Sign a leaf certificate for ``identity``; the subject and SANs are ours, never the CSR's."""
    start = dt.datetime.fromtimestamp(now, tz=dt.UTC) - BACKDATE
    end = dt.datetime.fromtimestamp(now + lifetime_seconds, tz=dt.UTC)
    end = min(end, ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.role in (Role.AGENT, Role.BROKER):
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"sitepair vault {identity.vault}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """The sitepair identity in a certificate whose chain has already been verified."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise Unauthenticated("peer certificate carries no sitepair identity") from exc
    uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    ours = [u for u in uris if u.startswith("sitepair://")]
    if len(ours) != 1:
        raise Unauthenticated("peer certificate must carry exactly one sitepair identity URI")
    parts = urlsplit(ours[0])
    segments = parts.path.strip("/").split("/")
    if len(segments) != 2 or not parts.hostname:
        raise Unauthenticated(f"malformed sitepair identity {ours[0]!r}")
    try:
        role = Role(segments[0])
    except ValueError as exc:
        raise Unauthenticated(f"unknown role {segments[0]!r} in peer certificate") from exc
    site = parse_qs(parts.query).get("site", [""])[0]
    return Identity(
        vault=parts.hostname,
        role=role,
        id=segments[1],
        site=site,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Check ``cert`` was signed by ``ca_cert`` (used on files, where TLS has not checked it)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidArgument("certificate was not issued by the expected CA") from exc


def not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


def not_before(cert: x509.Certificate) -> float:
    return cert.not_valid_before_utc.timestamp()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex with colons (what operators compare by eye)."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# -- trust bundles (CA rotation) --------------------------------------------------------------

#: At most this many CA certificates in a trust bundle (a rotation needs two).
MAX_BUNDLE_CERTS = 4
#: And at most this many bytes of PEM.
MAX_BUNDLE_BYTES = 64 * 1024


def key_id(cert: x509.Certificate) -> str:
    """A CA's key identifier (hex): what the certificates it signs name as their issuer
    (:func:`issuer_id`)."""
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return ski.digest.hex()
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()


def issuer_id(cert: x509.Certificate) -> str:
    """The key identifier of the CA that signed ``cert`` ("" when it does not say)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return aki.key_identifier.hex() if aki.key_identifier else ""


def bundle_to_pem(cas: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(cert_to_pem(c) for c in cas)


def bundle_digest(cas: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> str:
    """SHA-256 over the bundle's set of certificates: the same CAs in another order (the issuing
    one first changes with a rotation's phase) are the same bundle."""
    fingerprints = sorted(c.fingerprint(hashes.SHA256()).hex() for c in cas)
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def load_bundle(data: bytes, *, what: str = "trust bundle", now: float) -> list[x509.Certificate]:
    """Parse and check a trust bundle: 1 to :data:`MAX_BUNDLE_CERTS` self-signed CA
    certificates, each valid at ``now``."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidArgument(f"{what} is larger than {MAX_BUNDLE_BYTES // 1024} KiB")
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid PEM: {exc}") from exc
    if not 1 <= len(cas) <= MAX_BUNDLE_CERTS:
        raise InvalidArgument(
            f"{what} holds {len(cas)} certificates; 1 to {MAX_BUNDLE_CERTS} are allowed"
        )
    for ca in cas:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise InvalidArgument(f"{what} holds a certificate that is not a CA")
        try:
            ca.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise InvalidArgument(f"{what} holds a CA certificate that is not self-signed") from exc
        if not not_before(ca) <= now < not_after(ca):
            raise InvalidArgument(f"{what} holds a CA certificate that is not valid now")
    return cas


def issued_by_any(cert: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate:
    """The CA of ``cas`` that signed ``cert``; refused when none did."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    raise InvalidArgument("certificate was not issued by any CA of the trust bundle")
