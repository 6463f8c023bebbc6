"""Fixtures of the security tests: a replica host under attack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.replica_site import Site
from tests.support.brokers import BrokerThread


@pytest.fixture
def site(broker: BrokerThread, tmp_path: Path) -> Iterator[Site]:
    s = Site(broker, tmp_path)
    try:
        yield s
    finally:
        s.close()
