"""The browser fixture itself, against a throwaway HTTPS server that wants client certificates:
the operator's certificate reaches the server, the vault CA is trusted the way an operator trusts
it (and only it), and nothing ignores a certificate error."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from sitepair import pki
from tests.web.browser.chromium import Chromium, missing, tls_refusal
from tests.web.browser.tls_server import TestCa, TlsServer

if (why := missing()) is not None:
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Error as PlaywrightError


class World:
    def __init__(self, root: Path) -> None:
        self.vault = TestCa(root / "vault", "vault")
        self.other = TestCa(root / "other", "other")
        self.alice = self.vault.issue("alice", pki.Role.ADMIN)
        self.mallory = self.other.issue("mallory", pki.Role.ADMIN)
        serving = self.vault.issue("server", pki.Role.BROKER, server=True)
        self.required = TlsServer(serving, self.vault.pem, verify=ssl.CERT_REQUIRED)
        self.optional = TlsServer(serving, self.vault.pem, verify=ssl.CERT_OPTIONAL)
        # Same client CA, but serving a certificate the vault CA never issued.
        impostor = self.other.issue("impostor", pki.Role.BROKER, server=True)
        self.impostor = TlsServer(impostor, self.vault.pem, verify=ssl.CERT_OPTIONAL)
        self.chromium = Chromium(self.vault.pem, root)

    def close(self) -> None:
        self.chromium.close()
        for server in (self.required, self.optional, self.impostor):
            server.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("chromium"))
    try:
        yield w
    finally:
        w.close()


def test_the_operator_certificate_reaches_a_server_that_requires_one(world: World) -> None:
    origin = world.required.origin
    ctx = world.chromium.operator(origin, world.alice.cert, world.alice.key)
    try:
        page = ctx.new_page()
        page.goto(origin + "/")
        assert page.inner_text("#peer") == "alice"
    finally:
        ctx.close()


def test_without_a_certificate_the_browser_trusts_the_vault_ca_and_presents_nothing(
    world: World,
) -> None:
    ctx = world.chromium.context()
    try:
        page = ctx.new_page()
        page.goto(world.optional.origin + "/")  # the browser's own TLS, through its NSS database
        assert page.inner_text("#peer") == "none"
        with pytest.raises(PlaywrightError, match=r"net::ERR_"):
            page.goto(world.required.origin + "/")  # refused in the TLS handshake
    finally:
        ctx.close()


def test_a_certificate_of_another_ca_is_refused_in_the_handshake(world: World) -> None:
    origin = world.required.origin
    ctx = world.chromium.operator(origin, world.mallory.cert, world.mallory.key)
    try:
        page = ctx.new_page()
        refusal = tls_refusal(page, origin + "/")
        assert "net::ERR_" in refusal or "client-certificate error" in refusal, refusal
    finally:
        ctx.close()


def test_a_server_the_vault_ca_did_not_issue_is_refused_on_both_paths(world: World) -> None:
    origin = world.impostor.origin
    ctx = world.chromium.context()
    try:
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            ctx.new_page().goto(origin + "/")
    finally:
        ctx.close()
    ctx = world.chromium.operator(origin, world.alice.cert, world.alice.key)
    try:
        page = ctx.new_page()
        page.goto(origin + "/")
        assert "unable to verify the first certificate" in page.inner_text("body")
        assert page.locator("#peer").count() == 0
    finally:
        ctx.close()
