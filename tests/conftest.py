"""Fixtures shared by the foundation tests: a real broker on loopback with real mutual TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import AdminClient
from broker.home import BrokerHome
from tests.support.brokers import BrokerThread, create_key, make_home


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for (``-m slow``, as ``make test-slow``
    does), so the default run stays quick."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker_home(tmp_path: Path) -> BrokerHome:
    return make_home(tmp_path / "broker", log_file=tmp_path / "broker.log")


@pytest.fixture
def broker(broker_home: BrokerHome) -> Iterator[BrokerThread]:
    b = BrokerThread(broker_home)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def admin(broker: BrokerThread) -> Iterator[AdminClient]:
    client = broker.admin()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def credentials(admin: AdminClient, tmp_path: Path) -> Path:
    path = tmp_path / "creds.json"
    create_key(admin, path, site="site-a")
    return path
