"""The web dashboard for tests: a real broker serving it, and a real HTTPS client.

:func:`enable_dashboard` turns ``[dashboard]`` on in the broker.toml ``init`` wrote (port 0, so
the bound address is read from the broker). :func:`test_routes` stands in for the pages
(``broker.web.pages``) so the server core is tested on its own: tests put it in place of
:func:`broker.web.server.add_page_routes`. :func:`fetch` is one HTTPS request with
``aiohttp.ClientSession`` and an :class:`ssl.SSLContext` that trusts the vault CA and, when
given, presents a client certificate; cookies are sent and read by hand (the tests assert their
flags, and aiohttp's jar refuses cookies of IP hosts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.client import AdminClient, Profile
from broker.home import BrokerHome
from broker.web import CSRF, OPERATOR, SESSION_COOKIE, server
from sitepair import pki
from sitepair.clock import SYSTEM_CLOCK, Clock
from sitepair.errors import NotFound
from sitepair.v1 import admin_pb2
from tests.support.brokers import BrokerThread, make_home


def enable_dashboard(home: BrokerHome, **settings: str) -> None:
    """``[dashboard] enabled = true`` on a free port, plus ``settings`` (name = TOML value)."""
    text = home.config.read_text()
    head, sep, section = text.partition("[dashboard]")
    assert sep, "init wrote no [dashboard] section"
    section = section.replace("enabled = false", "enabled = true", 1)
    section = re.sub(r'listen = "[^"]*"', 'listen = "127.0.0.1:0"', section, count=1)
    for name, value in settings.items():
        section, n = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value}", section, count=1)
        assert n == 1, name
    home.config.write_text(head + sep + section)


def test_routes(app: web.Application) -> None:
    """What the core tests use instead of the pages."""

    async def whoami(request: web.Request) -> web.Response:
        identity: pki.Identity = request[OPERATOR]
        return web.json_response({"operator": identity.id, "csrf": request[CSRF]})

    async def echo(request: web.Request) -> web.Response:
        form = await request.post()
        return web.Response(text=f"done {form.get('what', '')}")

    async def fail(request: web.Request) -> web.Response:
        raise NotFound("no protected VM '<b>web-1</b>'", hint="see `vms list`")

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    async def static(request: web.Request) -> web.Response:
        return web.Response(text="body {}", content_type="text/css")

    app.router.add_get("/whoami", whoami)
    app.router.add_post("/echo", echo)
    app.router.add_get("/fail", fail)
    app.router.add_get("/boom", boom)
    app.router.add_get("/static/app.css", static)


test_routes.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def client_context(
    ca_pem: bytes, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A browser's TLS: trusts ``ca_pem``; presents ``cert``/``key`` when given."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def operator_context(profile: Path) -> ssl.SSLContext:
    """A browser with an operator profile's certificate imported."""
    return client_context(
        (profile / "ca.crt").read_bytes(), profile / "admin.crt", profile / "admin.key"
    )


def write_identity(
    folder: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    identity: pki.Identity,
) -> tuple[Path, Path]:
    """A certificate for ``identity`` signed by the given CA, written as cert.pem and key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    key = pki.generate_key()
    cert = pki.issue_certificate(
        ca_key,
        ca_cert,
        key.public_key(),
        identity,
        common_name=identity.id,
        now=time.time(),
        lifetime_seconds=3600,
    )
    pki.write_private_key(folder / "key.pem", key)
    (folder / "cert.pem").write_bytes(pki.cert_to_pem(cert))
    return folder / "cert.pem", folder / "key.pem"


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    set_cookies: list[str]
    text: str

    def cookie(self, name: str) -> str | None:
        """The value the server set for cookie ``name`` (None if it set none)."""
        for line in self.set_cookies:
            key, _, rest = line.partition("=")
            if key.strip() == name:
                return rest.split(";", 1)[0]
        return None

    def json(self) -> Any:
        return json.loads(self.text)


async def _fetch(
    method: str,
    url: str,
    context: ssl.SSLContext,
    headers: dict[str, str] | None,
    data: dict[str, str] | None,
    cookie: str | None,
) -> Reply:
    send = dict(headers or {})
    if cookie is not None:
        send["Cookie"] = cookie
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.request(
            method, url, ssl=context, headers=send, data=data, allow_redirects=False
        ) as response,
    ):
        text = await response.text()
        return Reply(
            status=response.status,
            headers={k: v for k, v in response.headers.items() if k.lower() != "set-cookie"},
            set_cookies=response.headers.getall("Set-Cookie", []),
            text=text,
        )


def served_certificate(address: str, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a TLS handshake with ``address`` (HOST:PORT) is served."""
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def fetch(
    url: str,
    context: ssl.SSLContext,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: dict[str, str] | None = None,
    cookie: str | None = None,
) -> Reply:
    """One HTTPS request, redirects not followed."""
    return asyncio.run(_fetch(method, url, context, headers, data, cookie))


class Dashboard:
    """A real broker serving the dashboard (with :func:`test_routes` for pages)."""

    def __init__(self, broker: BrokerThread) -> None:
        self.broker = broker
        self.home = broker.home
        self.url = f"https://{broker.ctx.bound_dashboard}"
        self.ca_pem = (self.home.admin_dir / "ca.crt").read_bytes()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.broker.stop()

    def admin(self) -> ssl.SSLContext:
        """A browser with the home's own operator certificate."""
        return operator_context(self.home.admin_dir)

    def anonymous(self) -> ssl.SSLContext:
        """A browser without a client certificate."""
        return client_context(self.ca_pem)

    def login_token(self, profile: Path | None = None) -> str:
        """A login token from the admin API, as ``operators login --browser`` gets it."""
        client = (
            AdminClient(Profile.load(profile, run_file=self.home.run_file))
            if profile is not None
            else self.broker.admin()
        )
        with client:
            login = client.call(
                client.stub.CreateDashboardLogin, admin_pb2.CreateDashboardLoginRequest()
            )
        return str(login.token)

    def sign_in(self, profile: Path | None = None) -> str:
        """A session cookie (``Cookie`` header value) of a browser signed in with a token."""
        reply = fetch(f"{self.url}/login?token={self.login_token(profile)}", self.anonymous())
        assert reply.status == 303, reply.text
        secret = reply.cookie(SESSION_COOKIE)
        assert secret
        return f"{SESSION_COOKIE}={secret}"


def start_dashboard(
    home: BrokerHome, monkeypatch: pytest.MonkeyPatch, *, clock: Clock = SYSTEM_CLOCK
) -> Dashboard:
    """Enable the dashboard of ``home`` (test routes for pages) and start its broker."""
    enable_dashboard(home)
    monkeypatch.setattr(server, "add_page_routes", test_routes)
    return Dashboard(BrokerThread(home, clock=clock))


@pytest.fixture
def dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dashboard]:
    """A broker (vault "bluevault") serving the dashboard."""
    home = make_home(tmp_path / "broker", vault="bluevault", log_file=tmp_path / "broker.log")
    d = start_dashboard(home, monkeypatch)
    try:
        yield d
    finally:
        d.stop()
