"""The scenarios with real guests (``--backend qemu``): the hosts run the qemu backend (TCG) and
each VM is the test guest of ``tests/support/guest.py``, which is its own workload.

Each scenario does what its ``directory`` namesake does, with the checks of
:mod:`tests.harness.guest_check`: every failed-over copy is booted and the guest verifies its
own data (fsck consistent, every record acknowledged before the copy's cut intact), and at each
quiet point (a cycle released) the source's base images equal the replica byte for byte.
Scenarios whose point the directory backend makes better (or only it can) are listed in
:data:`NOT_WITH_GUESTS` with the reason, and report SKIP.

Cycles run when a scenario asks for them (the policy's copy frequency, 15 min, is longer than
these runs), so each quiet point is one the scenario chose.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sitepair.v1 import admin_pb2
from tests.harness import guest_vm
from tests.harness.guest_check import GuestStopped, check_boot, check_same_bytes, wait_ack
from tests.harness.scenarios import MARK, Run, policy
from tests.support.guest import ConsoleLog, GuestTimeout

#: The scenarios that make no sense with real guests, and why (reported as SKIP).
NOT_WITH_GUESTS = {
    "kill-soak": (
        "checks every replica after each of many kills against a write log the harness keeps; "
        "a real guest's data is checked only by failing a copy over and booting it, "
        "and SIGKILL of a guest's host is covered by site-loss and tests/qemu"
    ),
    "wan-resync": (
        "about the link and the resync protocol, which are the same on every backend; "
        "run it with --backend directory, whose writer checks the replica exactly"
    ),
    "rpo-hold": (
        "measures replication lag under a sustained write rate the harness sets; "
        "a TCG guest writes about one record a second, too little to load the link"
    ),
    "replica-full": (
        "about the replica host's storage, the same on every backend; "
        "run it with --backend directory"
    ),
    "clock-skew": (
        "about ticket authentication between agents, the same on every backend; "
        "run it with --backend directory"
    ),
    "bad-link": (
        "about faults on the replication stream, the same on every backend; "
        "run it with --backend directory, whose writer checks every cycle exactly"
    ),
}


def _policy() -> admin_pb2.Policy:
    """Cycles when the scenario asks for them (the copy frequency is the longest the broker
    allows, 15 min, longer than these runs), crash-consistent only (the qemu backend has no
    application-consistent cuts yet: docs/qemu-backend.md)."""
    return policy(copy=900, app=0)


def _console(run: Run, host: str, vm: str) -> ConsoleLog:
    return guest_vm.console(run.c.agents[host], vm)


def _start_guest(run: Run, host: str, vm: str) -> ConsoleLog:
    """Create and start the guest on ``host``, wait until it writes, and protect it."""
    guest_vm.create(run.c, host, vm)
    console = _console(run, host, vm)
    wait_ack(console, 3)
    run.protect(vm)
    return console


def _check_replica(run: Run, vm: str, when: str) -> None:
    """At a quiet point (a cycle just released): the source's bases equal the replica."""
    copies = run.c.running_copies(vm)
    what = f"{vm}: the replica equals the source {when}"
    if not copies:
        run.report.check(what, False, "the VM runs nowhere")
        return
    source = run.c.agents[copies[0]]
    bases = {d: chain[0] for d, chain in source.qemu.disk_chains(vm).items()}
    check_same_bytes(run.report, what, bases, run.c.replica_chains(vm))


def _check_from_latest(run: Run, vm: str, host: str, copy: str, what: str) -> None:
    """The failed-over (or test) VM ``copy`` on ``host`` started from the replica's latest
    point: its bases (the point flattened; the guest writes into overlays above) hold the
    replica's bytes."""
    bases = {d: chain[0] for d, chain in run.c.agents[host].qemu.disk_chains(copy).items()}
    check_same_bytes(run.report, f"{vm}: {what}", run.c.replica_chains(vm), bases)


def _shutdown(run: Run, console: ConsoleLog, vm: str, host: str) -> int:
    """After a planned failover: the guest on ``host`` shut down cleanly; its last ACK."""
    run.report.check(
        f"{vm}: the guest on {host} shut down cleanly (ACPI power button)",
        console.shutdown_clean(),
        f"SITEPAIR SHUTDOWN {console.shutdown()}; last ACK {console.last_ack()}",
    )
    return console.last_ack()


def _writes_on(run: Run, console: ConsoleLog, vm: str, host: str, after: int) -> None:
    """The failed-over guest resumed writing where its data ended."""
    try:
        last = wait_ack(console, after + 2)
        run.report.check(f"{vm}: the guest writes on {host}", True, f"ACK {last}")
    except (GuestStopped, GuestTimeout) as exc:
        run.report.check(f"{vm}: the guest writes on {host}", False, str(exc)[-400:])


def _wait_protected(run: Run, vm: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while run.c.protected(vm).state != "protected":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm}: {run.c.protected(vm).state}, not protected")
        time.sleep(0.5)


# -- scenarios ----------------------------------------------------------------------------------


def walkthrough(run: Run) -> None:
    """The ASR VMM-to-VMM walkthrough with a real guest: protect it running, cycles while it
    writes, a test failover that boots, a recovery plan failed over (planned) that boots."""
    c = run.c
    c.pair(_policy())
    src = _start_guest(run, "hv-a1", "vm1")
    _check_replica(run, "vm1", "after the initial replication")
    # A cycle while the guest writes, then a test failover from it, on an isolated network.
    wait_ack(src, src.last_ack() + 2)
    acked = src.last_ack()  # before the cycle the test VM is made from is asked for
    run.cycle("vm1")
    _check_replica(run, "vm1", "after a cycle while the guest writes")
    run.run_job(
        run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="test", network="create")
    )
    test_host = c.protected("vm1").replica_server
    _check_from_latest(
        run, "vm1", test_host, "vm1-test", "the test VM starts from the latest recovery point"
    )
    check_boot(
        run.report, "vm1: test failover VM", _console(run, test_host, "vm1-test"), at_least=acked
    )
    run.cycle("vm1")  # production replication is not disturbed
    _check_replica(run, "vm1", "after a cycle with the test VM running")
    run.run_job(
        run.c.stub.CleanupTestFailover,
        admin_pb2.CleanupTestRequest(vm="vm1", notes="harness: test VM booted and verified"),
    )
    tester = c.agents[test_host]
    run.report.check(
        "vm1: test failover cleaned up",
        tester.qemu.vm_id_of("vm1-test") is None and not tester.vm_running("vm1-test"),
    )
    # A recovery plan: the guest, then a script on the recovery site.
    marker = run.root / "plan-marker.txt"
    for a in c.agents.values():
        if a.site == "b":
            (a.home / "scripts").mkdir(exist_ok=True)
            (a.home / "scripts" / "mark.py").write_text(MARK)
    c.call(
        c.stub.CreatePlan,
        admin_pb2.CreatePlanRequest(name="app", description="harness walkthrough"),
    )
    c.call(c.stub.AddPlanGroup, admin_pb2.PlanRef(name="app"))
    c.call(c.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="app", group=1, vm="vm1"))
    c.call(
        c.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="app",
            group=1,
            when="after",
            action=admin_pb2.PlanAction(
                name="mark", script="mark.py", args=[str(marker)], timeout_seconds=60
            ),
        ),
    )
    run.run_job(run.c.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="app", type="planned"))
    last_on_a = _shutdown(run, src, "vm1", "hv-a1")
    new_host = c.host_of_vm("vm1").name
    # A quiet point: the guest on site a is off. The VM on site b started from exactly the
    # bytes it left (its bases are the flattened last point; it writes into overlays above).
    left = {d: chain[-1] for d, chain in c.agents["hv-a1"].qemu.disk_chains("vm1").items()}
    started = {d: chain[0] for d, chain in c.agents[new_host].qemu.disk_chains("vm1").items()}
    check_same_bytes(
        run.report, "vm1: the failed-over VM starts from the bytes the source left", left, started
    )
    check_same_bytes(
        run.report,
        "vm1: the replica holds the bytes the source left",
        left,
        c.replica_chains("vm1"),
    )
    dst = _console(run, new_host, "vm1")
    check_boot(run.report, f"vm1: failed over to {new_host}", dst, at_least=last_on_a)
    _writes_on(run, dst, "vm1", new_host, last_on_a)
    run.report.check(
        "plan script ran after group 1", marker.exists() and "group 1 vm1" in marker.read_text()
    )
    run.report.details["records acknowledged on site a"] = last_on_a


def failback(run: Run) -> None:
    """A round trip with a real guest: planned failover with reverse replication, the guest
    writing at the recovery site, reverse cycles, and a failback that boots on the original
    site with every record written at the recovery site."""
    c = run.c
    c.pair(_policy())
    console = _start_guest(run, "hv-a1", "vm1")
    host = "hv-a1"
    for trip in range(2):
        wait_ack(console, console.last_ack() + 2)
        run.run_job(
            run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="planned", reverse=True)
        )
        last = _shutdown(run, console, "vm1", host)
        host = c.host_of_vm("vm1").name
        console = _console(run, host, "vm1")
        check_boot(run.report, f"vm1: trip {trip + 1}, booted on {host}", console, at_least=last)
        _writes_on(run, console, "vm1", host, last)
        # Reverse replication runs, and a cycle lands byte for byte.
        _wait_protected(run, "vm1")
        run.cycle("vm1")
        _check_replica(run, "vm1", f"after a reverse cycle (trip {trip + 1})")
        run.report.details[f"trip {trip + 1} runs on"] = host
        run.report.details[f"trip {trip + 1} records before the failover"] = last


def site_loss(run: Run) -> None:
    """Unplanned failover of a real guest after its site is lost (agent and QEMU killed, link
    down): the copy boots from the last committed point; the old site returns and is fenced;
    reverse replication lands byte for byte."""
    c = run.c
    c.pair(_policy())
    src = _start_guest(run, "hv-a1", "vm1")
    wait_ack(src, src.last_ack() + 2)
    acked = src.last_ack()  # before the last committed cycle is asked for
    run.cycle("vm1")
    _check_replica(run, "vm1", "after the last committed cycle")
    wait_ack(src, src.last_ack() + 2)  # records that can only die with the site
    # The primary site is lost: its agents and its guest's QEMU die, the link goes down.
    for a in c.agents.values():
        if a.site == "a":
            c.kill_agent(a.name)
            if guest_vm.kill(a, "vm1"):
                c.faults.append(f"SIGKILL QEMU vm1 on {a.name}")
    c.net.partition()
    run.report.faults.append("partition")
    last_on_a = src.last_ack()
    run.run_job(run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="unplanned"))
    new_host = c.protected("vm1").replica_server
    _check_from_latest(
        run, "vm1", new_host, "vm1", "the failed-over VM starts from the latest recovery point"
    )
    dst = _console(run, new_host, "vm1")
    verify = check_boot(
        run.report, f"vm1: failed over to {new_host} (unplanned)", dst, at_least=acked
    )
    if verify is not None:
        run.report.details["records acknowledged on site a"] = last_on_a
        run.report.details["records lost with the site"] = last_on_a - verify.last
    _writes_on(run, dst, "vm1", new_host, verify.last if verify else acked)
    # The old site returns: fenced, never two running copies, protection resumes.
    c.net.heal()
    for a in c.agents.values():
        if a.site == "a":
            c.start_agent(a.name)
    c.wait_connected()
    deadline = time.monotonic() + 90
    fenced = False
    while time.monotonic() < deadline and not fenced:
        jobs = c.call(
            c.stub.ListJobs, admin_pb2.ListJobsRequest(kind="fence-old-primary", limit=20)
        ).jobs
        fenced = any(j.state == "succeeded" for j in jobs)
        time.sleep(0.5)
    run.report.check("old primary fenced when it returned", fenced)
    run.report.check(
        "never two running copies",
        c.running_copies("vm1") == [new_host],
        ", ".join(c.running_copies("vm1")),
    )
    run.run_job(run.c.stub.ReverseReplication, admin_pb2.ProtectedRef(vm="vm1"))
    run.cycle("vm1")
    _check_replica(run, "vm1", "after a reverse cycle, the old site back")


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "walkthrough": walkthrough,
    "failback": failback,
    "site-loss": site_loss,
}
#: One host per site: each guest is a TCG QEMU process, and the machine may have two cores.
SITES: dict[str, dict[str, int]] = {}


def unavailable_reason(name: str) -> str:
    """Why scenario ``name`` does not run with real guests here ("" when it does)."""
    if name in NOT_WITH_GUESTS:
        return f"not with real guests: {NOT_WITH_GUESTS[name]}"
    if name not in SCENARIOS:
        return "no real-guest version of this scenario"
    return guest_vm.unavailable_reason()
