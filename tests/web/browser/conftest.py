"""Fixtures of the browser tests: one real deployment per test module, a fresh browser context
(the operator's certificate imported) per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.web.browser.chromium import missing
from tests.web.browser.deployment import Deployment

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if (why := missing()) is not None:
        pytest.skip(why)
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def operator(deployment: Deployment) -> Iterator[BrowserContext]:
    """A browser of the local operator: its certificate presented to the dashboard."""
    ctx = deployment.operator_context()
    try:
        yield ctx
    finally:
        ctx.close()
