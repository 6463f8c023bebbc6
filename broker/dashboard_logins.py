"""Signing in to the web dashboard without a certificate in the browser: login tokens, sessions.

An operator who holds an admin profile runs ``sitepair-broker operators login --browser``: the
CLI calls ``CreateDashboardLogin`` over the admin API (mutual TLS, authorised like every admin
call) and gets a **login token**, a 256-bit random secret valid for :data:`LOGIN_LIFETIME` and
good for one sign-in. The browser opens ``/login?token=T``; the dashboard marks the token used
(atomically, in the store: two brokers cannot both accept it) and starts a **session**, another
256-bit secret sent back as the session cookie, for ``[dashboard] session_lifetime`` (never past
the operator certificate's own expiry).

The store holds only the SHA-256 of each secret, beside the identity of the certificate that
asked for the token; every broker of a shared PostgreSQL store accepts the session, and each
request authorises that identity again (:class:`broker.auth.BrokerAuthorizer`), so revoking the
operator ends its sessions at once. There is no password anywhere.

No aiohttp here: the admin service creates tokens, and the CLI imports the admin service.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets

from broker.store.base import Store
from broker.store.models import DashboardGrant
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.clock import Clock
from sitepair.errors import InvalidArgument

#: How long a login token may wait for its browser.
LOGIN_LIFETIME = 60.0
#: Random bytes in a token and in a session cookie (URL-safe base64 of them: 43 characters).
SECRET_BYTES = 32
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclasses.dataclass(frozen=True)
class Login:
    """A login token as the operator receives it (the only time its secret exists in clear)."""

    token: str
    expires_at: float


@dataclasses.dataclass(frozen=True)
class Session:
    """A session as the browser receives it: the cookie's secret and the stored grant."""

    secret: str
    grant: DashboardGrant


def secret_hash(secret: str) -> str:
    """What the store keeps of a token or session secret."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def well_formed(secret: str) -> bool:
    """Whether ``secret`` (from a URL or a cookie, so from anyone) could be one we made."""
    return bool(_SECRET.match(secret))


def identity_of(grant: DashboardGrant) -> pki.Identity:
    """The operator identity a grant was made for, to authorise again on each use."""
    try:
        role = pki.Role(grant.role)
        serial = int(grant.cert_serial, 16)
    except ValueError as exc:
        raise InvalidArgument(f"stored dashboard sign-in {grant.id[:12]} is malformed") from exc
    return pki.Identity(
        vault=grant.vault,
        role=role,
        id=grant.operator,
        site=grant.site,
        serial=serial,
        not_after=grant.cert_not_after,
    )


def _grant(identity: pki.Identity, secret: str, *, now: float, lifetime: float) -> DashboardGrant:
    return DashboardGrant(
        id=secret_hash(secret),
        operator=identity.id,
        vault=identity.vault,
        role=identity.role.value,
        site=identity.site,
        cert_serial=format(identity.serial, "x"),
        cert_not_after=identity.not_after,
        created_at=now,
        # Never past the certificate that asked for it.
        expires_at=min(now + lifetime, identity.not_after),
    )


async def create_login(store: Store, clock: Clock, identity: pki.Identity) -> Login:
    """A new one-time login token for ``identity`` (already authorised as an admin)."""
    token = secrets.token_urlsafe(SECRET_BYTES)
    now = clock.now()
    login = _grant(identity, token, now=now, lifetime=LOGIN_LIFETIME)

    def write(tx: Tx) -> None:
        tx.purge_dashboard_grants(now)
        tx.insert_dashboard_login(login)

    await store.writing(write)
    return Login(token=token, expires_at=login.expires_at)


async def start_session(
    store: Store, clock: Clock, token: str, *, lifetime: float
) -> Session | None:
    """Use the login token ``token`` and start a session for its operator; None if the token
    is malformed, unknown, already used or expired (the caller does not learn which)."""
    if not well_formed(token):
        return None
    secret = secrets.token_urlsafe(SECRET_BYTES)
    now = clock.now()

    def write(tx: Tx) -> DashboardGrant | None:
        login = tx.use_dashboard_login(secret_hash(token), now)
        if login is None:
            return None
        session = dataclasses.replace(
            login,
            id=secret_hash(secret),
            created_at=now,
            expires_at=min(now + lifetime, login.cert_not_after),
        )
        tx.insert_dashboard_session(session)
        return session

    grant: DashboardGrant | None = await store.writing(write)
    return None if grant is None else Session(secret=secret, grant=grant)


async def find_session(store: Store, clock: Clock, secret: str) -> DashboardGrant | None:
    """The live session whose cookie is ``secret``; None if malformed, unknown, ended or
    expired."""
    if not well_formed(secret):
        return None
    now = clock.now()
    found: DashboardGrant | None = await store.reading(
        lambda tx: tx.get_dashboard_session(secret_hash(secret), now)
    )
    return found


async def end_session(store: Store, secret: str) -> None:
    """Forget the session whose cookie is ``secret`` (signing out, on every broker)."""
    if well_formed(secret):
        await store.writing(lambda tx: tx.delete_dashboard_session(secret_hash(secret)))
