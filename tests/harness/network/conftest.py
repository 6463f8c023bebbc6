"""Fixtures for the network layer's tests: TLS contexts, echo servers, root-only gating."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from tests.harness.network.echo import EchoServer, listening, tls_contexts
from tests.harness.network.netns import netns_unavailable_reason


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts around one throwaway certificate."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def netns_reason() -> str | None:
    return netns_unavailable_reason()


@pytest.fixture
def require_netns(netns_reason: str | None) -> None:
    """Skip, with the reason, when network namespaces cannot be built here."""
    if netns_reason:
        pytest.skip(netns_reason)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer(listening())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tls_echo(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[EchoServer]:
    server = EchoServer(listening(), tls[0])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sink() -> Iterator[EchoServer]:
    server = EchoServer(listening(), sink=True)
    try:
        yield server
    finally:
        server.close()
