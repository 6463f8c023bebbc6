"""The harness's short set, run by CI: every scenario once in loopback mode (namespace mode too
when the network layer can build namespaces here)."""

from __future__ import annotations

import pytest

from tests.harness.report import table
from tests.harness.runner import run_scenario

SHORT = {
    "walkthrough": {},
    "failback": {},
    "site-loss": {},
    "kill-soak": {"kills": 6},
    "wan-resync": {},
    "rpo-hold": {"soak": 40.0},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SHORT))
def test_scenario_loopback(name: str) -> None:
    report = run_scenario(name, mode="loopback", seed=11, **SHORT[name])  # type: ignore[arg-type]
    print(table([report]))
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    assert report.checks, "a scenario that checks nothing proves nothing"
