"""Debian's headless Chromium, driven by Playwright, trusting one vault CA as an operator would.

How the browser reaches a dashboard that wants a client certificate:

- **The vault CA** is imported into the browser's own NSS database (``$HOME/.pki/nssdb``, made
  with ``certutil`` in a private ``HOME``, trust ``C,,``), exactly as an operator trusts a private
  CA in Chromium on Linux. Certificate errors are never ignored: a server whose certificate the
  vault CA did not issue is refused by the browser (``ERR_CERT_AUTHORITY_INVALID``).
- **The operator's certificate** is given to a browser context with Playwright's
  ``client_certificates`` option (Playwright 1.46+). Playwright implements it with a local TLS
  relay in its driver: the relay makes the TLS connection to the dashboard, presenting the
  certificate and verifying the server with Node's trust store, and hands the page to Chromium.
  Node has no per-context CA option, so the vault CA is added to the driver's trust store with
  ``NODE_EXTRA_CA_CERTS`` when the driver starts (one driver per vault); without it the relay
  refuses the broker ("self-signed certificate in certificate chain"), with it a server of
  another CA is still refused. The alternative (the certificate in the NSS database, selected by
  the ``AutoSelectCertificateForUrls`` policy) needs a machine-wide file under
  ``/etc/chromium/policies``, which a test must not write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
#: Screenshots and the benchmark use a laptop's screen.
VIEWPORT = {"width": 1280, "height": 800}


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not Path(CHROMIUM).exists():
        return (
            f"Debian's chromium is not installed ({CHROMIUM}); scripts/setup.sh installs it "
            "(apt-get install chromium libnss3-tools)"
        )
    if shutil.which("certutil") is None:
        return "certutil is not installed (apt-get install libnss3-tools)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    return None


def make_nss_db(home: Path, ca_pem: Path) -> None:
    """A fresh NSS database in ``home`` trusting the CA(s) in ``ca_pem`` to identify servers."""
    db = home / ".pki" / "nssdb"
    if db.exists():
        shutil.rmtree(db)
    db.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True)
    # certutil -A imports one certificate; a bundle (during a CA rotation) is split first.
    for n, pem in enumerate(split_pem(ca_pem.read_bytes())):
        subprocess.run(
            ["certutil", "-A", "-d", f"sql:{db}", "-n", f"sitepair vault CA {n}", "-t", "C,,"],
            input=pem,
            check=True,
        )


def split_pem(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + end + b"\n" for part in data.split(end) if part.strip()]


class Chromium:
    """One Playwright driver and one headless Chromium that trust the CA bundle ``ca_pem``."""

    def __init__(self, ca_pem: Path, workdir: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.home = workdir / "browser-home"
        make_nss_db(self.home, ca_pem)
        saved = os.environ.get("NODE_EXTRA_CA_CERTS")
        os.environ["NODE_EXTRA_CA_CERTS"] = str(ca_pem)  # read once, by the driver starting now
        try:
            self._manager = sync_playwright()
            self.playwright: Playwright = self._manager.start()
        finally:
            if saved is None:
                del os.environ["NODE_EXTRA_CA_CERTS"]
            else:
                os.environ["NODE_EXTRA_CA_CERTS"] = saved
        try:
            self.browser: Browser = self.playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                env={**os.environ, "HOME": str(self.home)},
            )
        except BaseException:
            self._manager.__exit__(None, None, None)
            raise

    def operator(self, origin: str, cert: Path, key: Path, **options: Any) -> BrowserContext:
        """A browser context presenting the certificate ``cert``/``key`` to ``origin``
        (``options``: more of Playwright's context options, e.g. ``timezone_id``)."""
        return self.context(
            client_certificates=[{"origin": origin, "certPath": str(cert), "keyPath": str(key)}],
            **options,
        )

    def context(self, **options: Any) -> BrowserContext:
        """A browser context (no client certificate unless ``client_certificates`` is given)."""
        ctx = self.browser.new_context(viewport=VIEWPORT, **options)  # type: ignore[arg-type]
        ctx.set_default_timeout(20_000)
        return ctx

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._manager.__exit__(None, None, None)


def tls_refusal(page: Page, url: str) -> str:
    """Open ``url`` expecting the TLS handshake to fail; the browser's error. A refused client
    certificate shows either as a failed navigation (the server's alert arrives after the
    handshake under TLS 1.3) or as the error page of Playwright's certificate relay; anything the
    server itself rendered fails the test."""
    from playwright.sync_api import Error

    try:
        response = page.goto(url)
    except Error as exc:
        return str(exc)
    body = page.inner_text("body")
    assert "Playwright client-certificate error" in body, (response and response.status, body)
    return body
