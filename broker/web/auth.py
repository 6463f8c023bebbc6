"""Who may use the dashboard, checked on every request before any page handler runs.

Two ways in, never a password:

1. **The operator's certificate** (mutual TLS): the browser presents the ``admin.crt`` of a
   sitepair profile; TLS has verified it against the vault's trust bundle
   (:mod:`broker.web.tls`), and its identity is authorised exactly as the admin API authorises a
   call (``authorizer.authorize(identity, {admin})``): another vault's, an agent's or a revoked
   operator's certificate is refused (403).
2. **A session** (cookie ``sitepair_session``) that a one-time login token started
   (``GET /login?token=T``, :mod:`broker.dashboard_logins`). The stored identity is authorised
   again on every request, so revoking the operator ends its sessions at once, on every broker.

A presented certificate decides alone (a refused one is not rescued by a session cookie).
Without either, a page gets 401 and a page that says how to sign in, nothing else.

Requests that change something (any method but GET, HEAD, OPTIONS) must also come from the
dashboard itself: an ``Origin`` header, when the browser sends one, must be the dashboard's own,
and the CSRF token of the request (``request["csrf"]``, put in each form by the pages) must come
back in the ``csrf`` form field or the ``X-CSRF-Token`` header. The token is an HMAC of the way
in (the certificate's fingerprint, or the session) under a key derived from the vault's ticket
signing key, which every broker of the vault holds: a form rendered by one broker posts to
another, and no token is stored. Both checks refuse with 403 before the handler runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker import dashboard_logins
from broker.services.context import BrokerContext
from broker.web import CONTEXT, CSRF, CSRF_FIELD, CSRF_HEADER, OPERATOR, SESSION_COOKIE, notices
from sitepair import pki
from sitepair.errors import SitepairError
from sitepair.logsafe import shown

log = logging.getLogger("sitepair.broker.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN = frozenset({pki.Role.ADMIN})
#: Methods that change nothing: no Origin or CSRF check.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The one path open without signing in (it is how one signs in).
LOGIN_PATH = "/login"


class Refused(Exception):
    """A way in was presented and is not accepted (403)."""


def csrf_key(ctx: BrokerContext) -> bytes:
    """The vault's CSRF key: the same on every broker of the vault, secret to them."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"sitepair dashboard csrf"
    ).derive(ctx.ticket_key.private_bytes_raw())


def csrf_token(key: bytes, way_in: str) -> str:
    digest = hmac.new(key, way_in.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate TLS verified (DER), or None if the browser presented none."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


class Authenticator:
    """The authentication middleware and the sign-in and sign-out routes."""

    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self._csrf_key = csrf_key(ctx)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(LOGIN_PATH, self.login)
        app.router.add_post("/logout", self.logout)

    async def _way_in(self, request: web.Request) -> tuple[pki.Identity, str] | None:
        """The operator and what their CSRF token is derived from; None without a way in."""
        der = _peer_certificate(request)
        if der is not None:
            try:
                identity = pki.identity_from_cert(x509.load_der_x509_certificate(der))
                self.ctx.authorizer.authorize(identity, ADMIN)
            except SitepairError as exc:
                raise Refused(str(exc)) from exc
            return identity, "certificate:" + hashlib.sha256(der).hexdigest()
        secret = request.cookies.get(SESSION_COOKIE)
        if not secret:
            return None
        grant = await dashboard_logins.find_session(self.ctx.store, self.ctx.clock, secret)
        if grant is None:
            return None
        try:
            identity = dashboard_logins.identity_of(grant)
            self.ctx.authorizer.authorize(identity, ADMIN)
        except SitepairError as exc:
            raise Refused(str(exc)) from exc
        return identity, "session:" + grant.id

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.path == LOGIN_PATH
            and "token" in request.query
            and _peer_certificate(request) is None
        ):
            # A new sign-in replaces whatever session the browser had (a revoked one too).
            return await handler(request)
        try:
            found = await self._way_in(request)
        except Refused as exc:
            _refusal(request, str(exc))
            return notices.refused(notices.NOT_AN_OPERATOR)
        if found is None:
            if request.path == LOGIN_PATH:
                return await handler(request)
            return notices.sign_in()
        identity, way_in = found
        token = csrf_token(self._csrf_key, way_in)
        request[OPERATOR] = identity
        request[CSRF] = token
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"https://{request.host}":
                _refusal(request, f"foreign origin {shown(origin)!r}")
                return notices.refused(notices.BAD_ORIGIN)
            sent = request.headers.get(CSRF_HEADER)
            if sent is None:
                form = await request.post()
                field = form.get(CSRF_FIELD)
                sent = field if isinstance(field, str) else ""
            if not hmac.compare_digest(sent.encode(), token.encode()):
                _refusal(request, "missing or wrong CSRF token")
                return notices.refused(notices.BAD_CSRF)
        return await handler(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``GET /login?token=T``: use a one-time login token, start a session, go to ``/``.
        Without a token: how to sign in (or ``/`` for a browser already signed in)."""
        token = request.query.get("token")
        if token is None:
            if OPERATOR in request:
                return _see_other("/")
            return notices.sign_in(status=200)
        ctx = request.app[CONTEXT]
        session = await dashboard_logins.start_session(
            ctx.store, ctx.clock, token, lifetime=ctx.config.dashboard.session_lifetime
        )
        if session is None:
            _refusal(request, "login token unknown, used or expired")
            return notices.sign_in(
                note="That sign-in link is not valid: it was used already, or more than a "
                "minute has passed. Ask for a new one."
            )
        identity = dashboard_logins.identity_of(session.grant)
        log.info(
            "dashboard session started",
            extra={"fields": {"operator": identity.id, "session": session.grant.id[:12]}},
        )
        response = _see_other("/")
        response.set_cookie(
            SESSION_COOKIE,
            session.secret,
            max_age=max(1, int(session.grant.expires_at - session.grant.created_at)),
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """``POST /logout``: end this browser's session (on every broker of the store)."""
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            await dashboard_logins.end_session(request.app[CONTEXT].store, secret)
        response = _see_other(LOGIN_PATH)
        response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _refusal(request: web.Request, why: str) -> None:
    log.warning(
        "dashboard request refused",
        extra={
            "fields": {
                "method": request.method,
                "path": shown(request.path),
                "peer": request.remote,
                "why": shown(why, 256),
            }
        },
    )
