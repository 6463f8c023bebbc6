"""The harness's short set, run by CI: every scenario once in loopback mode (namespace mode too
when the network layer can build namespaces here)."""

from __future__ import annotations

import pytest

from tests.harness.network import netns_unavailable_reason
from tests.harness.report import table
from tests.harness.runner import run_scenario
from tests.support import postgres

SHORT = {
    "walkthrough": {},
    "failback": {},
    "site-loss": {},
    "kill-soak": {"kills": 6},
    "wan-resync": {},
    "rpo-hold": {"soak": 40.0},
    "replica-full": {},
    "clock-skew": {},
    "bad-link": {},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SHORT))
def test_scenario_loopback(name: str) -> None:
    report = run_scenario(name, mode="loopback", seed=11, **SHORT[name])  # type: ignore[arg-type]
    print(table([report]))
    if report.skipped:
        pytest.skip(report.skipped)
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    assert report.checks, "a scenario that checks nothing proves nothing"


#: In namespace mode too (root and iproute2): the sites then really are apart, with a router
#: between them, and the faults hit real sockets in other network stacks.
NETNS = ["walkthrough", "bad-link"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NETNS)
def test_scenario_netns(name: str) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"namespace mode unavailable here: {reason}")
    report = run_scenario(name, mode="netns", seed=13, **SHORT[name])  # type: ignore[arg-type]
    print(table([report]))
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    assert report.checks


@pytest.mark.timeout(300)
def test_walkthrough_with_a_postgresql_store() -> None:
    """The broker on PostgreSQL (a throwaway server), in namespaces when they can be built: the
    broker then reaches the database over its Unix socket from inside its own namespace."""
    reason = postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    mode = "loopback" if netns_unavailable_reason() else "netns"
    report = run_scenario("walkthrough", mode=mode, seed=17, store="postgresql")
    print(table([report]))
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    assert any(c.what == "the broker's jobs are in PostgreSQL" for c in report.checks)
