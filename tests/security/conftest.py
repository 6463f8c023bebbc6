"""Fixtures of the security tests: a replica host under attack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import AdminClient
from broker.home import BrokerHome
from tests.security.replica_site import Site
from tests.support.brokers import BrokerProcess, BrokerThread


@pytest.fixture
def site(broker: BrokerThread, tmp_path: Path) -> Iterator[Site]:
    s = Site(broker, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def served(broker_home: BrokerHome) -> Iterator[BrokerProcess]:
    """``sitepair-broker serve`` as its own process, logging to ``broker.log`` (the
    ``broker_home`` fixture's), so its log and its memory are the broker's alone."""
    proc = BrokerProcess(broker_home)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def served_admin(served: BrokerProcess) -> Iterator[AdminClient]:
    with served.admin() as client:
        yield client
