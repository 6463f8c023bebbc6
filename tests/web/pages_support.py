"""The dashboard's pages against a real broker and real agents, served by the real server.

:func:`serve_pages` starts the broker's own :class:`broker.web.server.DashboardServer` (HTTPS with
the broker's serving certificate, the authentication middleware, CSRF checks) on the broker's
event loop, for the ``sites`` fixture's broker, whose configuration leaves the dashboard off.
The client presents an operator's certificate, as a browser with the profile imported does, and
sends the CSRF token the middleware derives for that certificate (read back from the pages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker import operators
from broker.web.auth import csrf_key, csrf_token
from broker.web.server import DashboardServer
from sitepair import pki
from tests.protection.conftest import (
    Sites,
    sites,  # the fixture the dashboard's builds on
)
from tests.support.brokers import BrokerThread
from tests.support.dashboard import client_context

__all__ = ["Dashboard", "PagesClient", "dashboard_fixture", "sites"]


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
    """HTTPS to the dashboard at ``base``, presenting the certificate in ``tls``; ``csrf`` is
    the token the dashboard expects back in forms from that certificate."""

    base: str
    tls: ssl.SSLContext
    csrf: str

    def _open(self, req: urllib.request.Request) -> Reply:
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.tls), _NoRedirect
        )
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
        with urllib.request.urlopen(self.base + path, timeout=60, context=self.tls) as resp:
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
    """The dashboard of the ``sites`` fixture's broker, signed in as ``operator``."""

    sites: Sites
    operator: pki.Identity


@dataclasses.dataclass
class Served:
    """A dashboard served for a test, and a client signed in with one certificate."""

    server: DashboardServer
    client: PagesClient
    broker: BrokerThread

    def stop(self) -> None:
        self.broker.loop.call(self.server.stop())


def serve_pages(broker: BrokerThread, cert: Path, key: Path) -> Served:
    """The broker's dashboard on a free port (its configuration turned on here), and a client
    presenting ``cert``/``key`` and trusting the vault CA."""

    async def start() -> tuple[DashboardServer, str]:
        ctx = broker.ctx
        ctx.config = dataclasses.replace(
            ctx.config,
            dashboard=dataclasses.replace(ctx.config.dashboard, enabled=True, listen="127.0.0.1:0"),
        )
        server = DashboardServer(ctx, broker.home)
        return server, await server.start()

    server, bound = broker.loop.call(start())
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    csrf = csrf_token(csrf_key(broker.ctx), "certificate:" + hashlib.sha256(der).hexdigest())
    tls = client_context((broker.home.admin_dir / "ca.crt").read_bytes(), cert, key)
    return Served(server, PagesClient(f"https://{bound}", tls, csrf), broker)


def local_operator(broker: BrokerThread) -> pki.Identity:
    """The broker home's own operator: what ``sitepair-broker`` on the broker host signs in as."""
    return pki.Identity(
        vault=broker.ctx.config.vault, role=pki.Role.ADMIN, id=operators.LOCAL_OPERATOR
    )


def serve_as_local_operator(broker: BrokerThread) -> Served:
    admin = broker.home.admin_dir
    return serve_pages(broker, admin / "admin.crt", admin / "admin.key")


@pytest.fixture(name="dashboard")
def dashboard_fixture(sites: Sites) -> Iterator[Dashboard]:
    served = serve_as_local_operator(sites.broker)
    c = served.client
    try:
        yield Dashboard(c.base, c.tls, c.csrf, sites, local_operator(sites.broker))
    finally:
        served.stop()
