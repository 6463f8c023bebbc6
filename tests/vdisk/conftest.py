"""Collection rules shared by the virtual-disk tests."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` in this folder run only when asked for (``-m slow``, as
    ``make test-slow`` does), so the default run stays quick."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords and _HERE in item.path.resolve().parents:
            item.add_marker(skip)
