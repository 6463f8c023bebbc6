"""The harness's short set, run by CI: every scenario once in loopback mode (namespace mode too
when the network layer can build namespaces here), and the walkthrough with real guests on
qemu hosts; the other real-guest runs are in ``make test-slow``."""

from __future__ import annotations

import pytest

from tests.harness import guest_scenarios, guest_vm
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


#: rpo-hold soaks for 40 s, bad-link and kill-soak take half a minute each: they run in make
#: test-slow (CI runs both), so the default run stays under 15 minutes (the others take seconds).
SLOW_LOOPBACK = {"rpo-hold", "bad-link", "kill-soak"}
LOOPBACK = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LOOPBACK else name for name in SHORT
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", LOOPBACK)
def test_scenario_loopback(name: str) -> None:
    report = run_scenario(name, mode="loopback", seed=11, **SHORT[name])  # type: ignore[arg-type]
    print(table([report]))
    if report.skipped:
        pytest.skip(report.skipped)
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    assert report.checks, "a scenario that checks nothing proves nothing"


#: In namespace mode too (root and iproute2): the sites then really are apart, with a router
#: between them, and the faults hit real sockets in other network stacks.
#: bad-link in namespaces runs in make test-slow (the default run keeps it in loopback mode, and
#: the walkthrough in namespaces): the default run has to stay under 15 minutes.
NETNS = ["walkthrough", pytest.param("bad-link", marks=pytest.mark.slow)]


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


def _run_with_guests(name: str, mode: str) -> None:
    missing = guest_vm.unavailable_reason()
    if missing:
        pytest.skip(missing)
    no_netns = netns_unavailable_reason() if mode == "netns" else None
    if no_netns:
        pytest.skip(f"namespace mode unavailable here: {no_netns}")
    report = run_scenario(name, mode=mode, seed=19, backend="qemu")
    print(table([report]))
    assert not report.skipped, report.skipped
    assert report.passed, "\n".join(report.errors) + "\n" + str(report.details.get("traceback", ""))
    # A failed-over copy booted and the guest checked its own data.
    assert any("every record acknowledged before the cut" in c.what for c in report.checks)


@pytest.mark.timeout(600)
def test_walkthrough_with_real_guests() -> None:
    """The walkthrough on qemu hosts (TCG) with the real test guest: protected while it writes,
    a cycle byte for byte, a test failover and a planned plan failover that boot and find every
    record acknowledged before their cut."""
    _run_with_guests("walkthrough", "loopback")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("failback", "loopback"),
        ("site-loss", "loopback"),
        ("walkthrough", "netns"),
        ("failback", "netns"),
        ("site-loss", "netns"),
    ],
)
def test_scenario_with_real_guests(name: str, mode: str) -> None:
    _run_with_guests(name, mode)


@pytest.mark.parametrize("name", sorted(guest_scenarios.NOT_WITH_GUESTS))
def test_scenarios_without_a_real_guest_version_skip_with_the_reason(name: str) -> None:
    report = run_scenario(name, backend="qemu")
    assert report.skipped.startswith("not with real guests: ") and not report.passed
    assert not report.checks and "SKIP" in table([report])


def test_real_guests_without_qemu_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    report = run_scenario("walkthrough", backend="qemu")
    assert report.skipped.startswith("real guests need ") and "qemu-system-x86_64" in report.skipped
    assert not report.passed and not report.checks
