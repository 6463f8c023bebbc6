"""The dashboard's pages against a real broker and real agents, served by a small aiohttp app.

The app here is the pages' routes behind :func:`standin_auth`, a STAND-IN for the core helper's
authentication middleware (``broker/web/auth.py``, branch ``webcore``): it lets every request in
as the broker's local operator and checks a fixed CSRF token on POSTs. The lead's merge replaces
this app with ``broker.web.server.create_app`` (TLS, certificates, sessions); the pages and
their tests stay as they are. Plain HTTP on loopback, because TLS is core's part.

The app runs on the broker's own event loop, as the real dashboard does, so the pages call the
admin API's handlers exactly where the gRPC server calls them.
"""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from email.message import Message

import pytest
from aiohttp import web

from broker import operators
from broker.web import CONTEXT
from broker.web.pages import add_routes
from sitepair import pki
from tests.protection.conftest import (
    Sites,
    sites,  # the fixture the dashboard's builds on
)
from tests.support.brokers import BrokerThread

__all__ = ["CSRF", "Dashboard", "PagesClient", "dashboard_fixture", "sites"]

#: The CSRF token the stand-in hands to pages and wants back in every POST.
CSRF = "stand-in-csrf-token"


def standin_auth(identity: pki.Identity) -> Callable[..., Awaitable[web.StreamResponse]]:
    """STAND-IN for core's middleware: sets ``request["operator"]`` and ``request["csrf"]`` as
    the contract says, and refuses a POST without the token (403) as core does."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request["operator"] = identity
        request["csrf"] = CSRF
        if request.method == "POST" and (await request.post()).get("csrf") != CSRF:
            raise web.HTTPForbidden(text="the form's CSRF token is missing or wrong")
        return await handler(request)

    return middleware


@dataclasses.dataclass
class Reply:
    status: int
    headers: Message
    body: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the test looks at the redirect itself


@dataclasses.dataclass
class PagesClient:
    """HTTP to the pages' app at ``base``."""

    base: str

    def _open(self, req: urllib.request.Request) -> Reply:
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=30) as resp:
                return Reply(resp.status, resp.headers, resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read().decode())

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self._open(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, form: dict[str, str]) -> Reply:
        data = urllib.parse.urlencode(form).encode()
        return self._open(urllib.request.Request(self.base + path, data=data, method="POST"))

    def stream(self, path: str) -> Iterator[str]:
        """The server-sent events of ``path``: each event's data, until the server ends it."""
        with urllib.request.urlopen(self.base + path, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            data: list[str] = []
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    data.append(line[len("data: ") :])
                elif not line and data:
                    yield "\n".join(data)
                    data = []


@dataclasses.dataclass
class Dashboard(PagesClient):
    """The pages of the ``sites`` fixture's broker, signed in as ``operator``."""

    sites: Sites
    operator: pki.Identity


def serve_pages(broker: BrokerThread, identity: pki.Identity) -> tuple[web.AppRunner, str]:
    """The pages' app on the broker's loop; returns its runner and base URL."""

    async def start() -> tuple[web.AppRunner, str]:
        app = web.Application(middlewares=[standin_auth(identity)])
        app[CONTEXT] = broker.ctx
        add_routes(app)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    return broker.loop.call(start())


def local_operator(broker: BrokerThread) -> pki.Identity:
    """The broker home's own operator: what ``sitepair-broker`` on the broker host signs in as."""
    return pki.Identity(
        vault=broker.ctx.config.vault, role=pki.Role.ADMIN, id=operators.LOCAL_OPERATOR
    )


@pytest.fixture(name="dashboard")
def dashboard_fixture(sites: Sites) -> Iterator[Dashboard]:
    identity = local_operator(sites.broker)
    runner, base = serve_pages(sites.broker, identity)
    try:
        yield Dashboard(base, sites, identity)
    finally:
        sites.broker.loop.call(runner.cleanup())
