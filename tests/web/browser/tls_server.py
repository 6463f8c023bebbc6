"""A throwaway aiohttp HTTPS server that wants a client certificate, for proving the browser.

It answers every request with the subject of the client certificate TLS verified (or "none"),
so a test sees what the browser presented. Certificates come from :mod:`sitepair.pki`, like a
vault's.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from pathlib import Path

from aiohttp import web

from sitepair import pki
from tests.support.loops import LoopThread


@dataclasses.dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCa:
    """A CA writing PEM files into ``root``: ``ca.crt``, and a cert/key pair per leaf."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.name = name
        self.key, self.cert = pki.create_ca(name, now=time.time())
        self.pem = root / "ca.crt"
        self.pem.write_bytes(pki.cert_to_pem(self.cert))

    def issue(self, name: str, role: pki.Role, *, server: bool = False) -> Issued:
        key = pki.generate_key()
        cert = pki.issue_certificate(
            self.key,
            self.cert,
            key.public_key(),
            pki.Identity(self.name, role, name),
            common_name=name,
            now=time.time(),
            lifetime_seconds=3600,
            dns_names=["localhost"] if server else [],
            ip_addresses=["127.0.0.1"] if server else [],
        )
        out = Issued(self.root / f"{name}.crt", self.root / f"{name}.key")
        out.cert.write_bytes(pki.cert_to_pem(cert))
        out.key.write_bytes(pki.key_to_pem(key))
        return out


async def _whoami(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    subject = dict(rdn[0] for rdn in peer["subject"]) if peer else {}
    who = subject.get("commonName", "none")
    return web.Response(
        text=f"<!doctype html><title>whoami</title><p id=peer>{who}</p>", content_type="text/html"
    )


class TlsServer:
    """Serves HTTPS on 127.0.0.1 (a free port) with ``serving``, verifying clients against
    ``client_ca`` with ``verify`` (ssl.CERT_REQUIRED or ssl.CERT_OPTIONAL)."""

    def __init__(self, serving: Issued, client_ca: Path, *, verify: ssl.VerifyMode) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(serving.cert, serving.key)
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = verify
        self._loop = LoopThread("tls-server")
        self._runner, port = self._loop.call(self._start(ctx))
        self.origin = f"https://127.0.0.1:{port}"

    @staticmethod
    async def _start(ctx: ssl.SSLContext) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/", _whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port: int = runner.addresses[0][1]
        return runner, port

    def close(self) -> None:
        try:
            self._loop.call(self._runner.cleanup())
        finally:
            self._loop.stop()
