"""The shipped scenarios. Each builds a cluster, runs workloads, breaks things, checks bytes.

Every copy the scenarios look at (a replica, a recovery point, a test VM, a failed-over VM) is
checked against the writers' logs with :func:`tests.harness.workload.check_prefix`: it must be
exactly the state after some prefix of the writes, and where the operation promises no data
loss (a planned failover), after *all* of them. Broker invariants are checked after every
scenario: at most one running copy of each VM, epochs that never go back, no job left running.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent.hosts.directory import DirectoryBackend
from broker.client import wait_job
from sitepair import addresses, credentials
from sitepair.errors import SitepairError
from sitepair.v1 import admin_pb2
from tests.harness import oracle
from tests.harness.cluster import Cluster
from tests.harness.network import LOSSY, WanProfile
from tests.harness.report import ScenarioReport
from tests.harness.workload import WriteLog, Writer, check_prefix, completed_before

MiB = 1 << 20

#: The link of the WAN resync scenario: slow enough that the resync is still running when the
#: partition hits it, fast enough for the short test run.
SLOW_LINK = WanProfile(
    "slow-metro", delay_ms=20, rate_mbit=32, description="20 ms one way, 32 Mbit/s"
)
DISKS = {"os": 32 * MiB, "data": 16 * MiB}
RequestT = TypeVar("RequestT")

MARK = """import os, sys
with open(sys.argv[1], "a") as f:
    f.write(f"{os.environ['SITEPAIR_PLAN']} group {os.environ['SITEPAIR_GROUP']} {os.environ['SITEPAIR_VMS']}\\n")
print("marked")
"""


@dataclasses.dataclass
class Run:
    cluster: Cluster
    report: ScenarioReport
    root: Path
    seed: int
    rng: random.Random
    soak: float = 0.0  # seconds a soak scenario runs for (0 = the short default)
    kills: int = 0  # kills a kill scenario performs (0 = the short default)
    writers: dict[str, Writer] = dataclasses.field(default_factory=dict)
    epochs: dict[str, int] = dataclasses.field(default_factory=dict)
    jobs: list[str] = dataclasses.field(default_factory=list)

    @property
    def c(self) -> Cluster:
        return self.cluster

    def log(self, vm: str) -> WriteLog:
        return WriteLog(self.root / f"{vm}.writes")

    def seed_of(self, vm: str) -> int:
        return self.seed * 1000 + sum(vm.encode())

    # -- VMs and writers --------------------------------------------------------------------
    def create_vm(self, host: str, vm: str) -> None:
        backend = self.c.agents[host].backend
        backend.create_vm(
            vm,
            disks=[("os", "vhdx", DISKS["os"]), ("data", "vhd", DISKS["data"])],
            cpu=2,
            memory_mb=1024,
            nics=[("nic0", f"corp-{self.c.agents[host].site}")],
        )
        backend.set_vm_state(vm, "running")

    def start_writer(self, vm: str, rate: float = 100.0, *, host_name: str = "") -> Writer:
        host = self.c.agents[host_name] if host_name else self.c.host_of_vm(vm)
        log = self.log(vm)
        backend = host.backend
        assert isinstance(backend, DirectoryBackend), "the harness writes into directory VMs only"
        w = Writer(
            backend,
            vm,
            log,
            seed=self.seed_of(vm),
            disks=DISKS,
            rate=rate,
            first_no=len(log.records()) + 1,
        )
        w.start()
        self.writers[vm] = w
        return w

    def stop_writer(self, vm: str) -> None:
        w = self.writers.pop(vm, None)
        if w is not None:
            w.stop()
            if w.error is not None:
                self.report.check(f"writer of {vm}", False, repr(w.error))

    def wait_writes(self, vm: str, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.log(vm).records()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm}: the writer did not reach {n} writes")
            time.sleep(0.05)

    # -- jobs -------------------------------------------------------------------------------
    def run_job(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, admin_pb2.Job],
        request: RequestT,
        *,
        expect: str = "succeeded",
    ) -> admin_pb2.Job:
        job = self.c.call(method, request)
        self.jobs.append(job.id)
        return self.c.job(job, expect=expect)

    def cycle(self, vm: str) -> admin_pb2.Job:
        return self.run_job(
            self.c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm=vm, action="cycle")
        )

    def protect(self, vm: str) -> None:
        deadline = time.monotonic() + 60
        while not any(
            v.vm.name == vm
            for v in self.c.call(self.c.stub.ListVms, admin_pb2.ListVmsRequest()).vms
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm} never reached the inventory")
            time.sleep(0.2)
        self.run_job(self.c.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm))
        self.epochs[vm] = self.c.protected(vm).epoch

    # -- checks -----------------------------------------------------------------------------
    def check_copy(
        self,
        what: str,
        vm: str,
        chains: dict[str, Path],
        *,
        all_writes: bool = False,
        at_least: int = 0,
    ) -> int:
        records = self.log(vm).records()
        result = check_prefix(chains, records, seed=self.seed_of(vm))
        detail = (
            f"prefix {result.prefix} of {len(records)} writes, {result.chunks_checked} chunks read"
        )
        ok = result.ok and result.prefix >= at_least
        if all_writes:
            ok = ok and result.prefix == len(records)
        if result.problems:
            detail += "; " + "; ".join(result.problems[:3])
        elif result.prefix < at_least:
            detail += f"; expected at least {at_least}"
        self.report.check(what, ok, detail)
        return result.prefix

    def check_replica(self, vm: str, **kw: Any) -> int:
        """The replica is one point in time; with ``all_writes`` (writers stopped, a last cycle
        run) it holds every write, each recovery point is an earlier point in time, and an
        independent reader finds the same bytes on both sites."""
        prefix = self.check_copy(
            f"{vm}: replica is one point in time", vm, self.c.replica_chains(vm), **kw
        )
        if kw.get("all_writes"):
            self.check_points(vm, upto=prefix)
            self.check_same_bytes(vm)
        return prefix

    def check_points(self, vm: str, *, upto: int) -> None:
        """Every recovery point is a point in time, no later than the next one."""
        last = 0
        points = self.c.point_chains(vm)
        records = self.log(vm).records()
        for seq in sorted(points):
            result = check_prefix(points[seq], records, seed=self.seed_of(vm))
            ok = result.ok and last <= result.prefix <= upto
            detail = f"prefix {result.prefix} (previous point {last}, latest {upto})"
            if result.problems:
                detail += "; " + "; ".join(result.problems[:3])
            self.report.check(f"{vm}: recovery point {seq} is one point in time", ok, detail)
            last = result.prefix
        self.report.details[f"{vm} recovery points checked"] = len(points)

    def check_same_bytes(self, vm: str) -> None:
        """libvhdi reads the running copy's chains and the replica's: the same bytes."""
        why = oracle.available()
        if why:
            self.report.details["independent reader"] = f"skipped: {why}"
            return
        source = self.c.host_of_vm(vm).backend.disk_chains(vm)
        replica = self.c.replica_chain_lists(vm)
        for disk in sorted(source):
            ours, theirs = oracle.chain_sha256(source[disk]), oracle.chain_sha256(replica[disk])
            self.report.check(
                f"{vm}/{disk}: libvhdi reads the same bytes on both sites",
                ours == theirs,
                f"sha256 {ours[:16]} vs {theirs[:16]}",
            )

    def check_running(self, vm: str, **kw: Any) -> int:
        host = self.c.host_of_vm(vm)
        chains = {d: chain[-1] for d, chain in host.backend.disk_chains(vm).items()}
        return self.check_copy(f"{vm}: running copy on {host.name}", vm, chains, **kw)

    def check_invariants(self) -> None:
        for vm in list(self.epochs):
            copies = self.c.running_copies(vm)
            self.report.check(
                f"{vm}: at most one running copy", len(copies) <= 1, ", ".join(copies)
            )
            epoch = self.c.protected(vm).epoch
            self.report.check(
                f"{vm}: epoch never went back",
                epoch >= self.epochs[vm],
                f"{self.epochs[vm]} -> {epoch}",
            )
            self.epochs[vm] = epoch
        deadline = time.monotonic() + 120
        while True:
            jobs = self.c.call(self.c.stub.ListJobs, admin_pb2.ListJobsRequest(limit=500)).jobs
            stuck = [
                f"{j.kind} {j.target} {j.state}"
                for j in jobs
                if j.state not in ("succeeded", "failed", "cancelled")
            ]
            if not stuck or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.report.check("no job left unfinished", not stuck, "; ".join(stuck[:5]))


def policy(
    *, copy: int = 30, points: int = 2, app: int = 1, auth: str = "certificate"
) -> admin_pb2.Policy:
    return admin_pb2.Policy(
        copy_frequency_seconds=copy,
        recovery_points=points,
        app_consistent_hours=app,
        compression=True,
        authentication=auth,
    )


def pause(run: Run, vm: str) -> None:
    """Stop scheduled cycles, so that the scenario's manual cycles are the only ones."""
    run.c.call(
        run.c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm=vm, action="pause")
    )


def try_cycle(run: Run, vm: str) -> admin_pb2.Job:
    """Run a manual cycle and return the finished job, whether it succeeded or failed."""
    job = run.c.call(
        run.c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm=vm, action="cycle")
    )
    run.jobs.append(job.id)
    assert run.c.admin is not None
    return wait_job(run.c.admin, job.id)


def wait_reason(run: Run, vm: str, code: str, *, present: bool = True, timeout: float = 30) -> str:
    """Wait until ``vm``'s health has (or no longer has) reason ``code``; returns its text."""
    deadline = time.monotonic() + timeout
    while True:
        reasons = {r.code: f"{r.level}: {r.message}" for r in run.c.protected(vm).reasons}
        if (code in reasons) == present:
            return reasons.get(code, "")
        if time.monotonic() > deadline:
            return f"(timed out; reasons were {sorted(reasons)})"
        time.sleep(0.5)


# -- scenarios ----------------------------------------------------------------------------------


def check_addresses(run: Run) -> None:
    """In namespace mode: the broker and the hosts were configured with non-loopback addresses
    the documented way (``init --advertise``, ``register --listen/--advertise``), and that is
    what the credentials files and the hosts' facts carry."""
    c = run.c
    if c.net.broker_host() == "127.0.0.1":
        return
    creds = credentials.load(c.root / f"{next(iter(c.agents))}.json")
    dialled = [addresses.check_host_port(a, "enrollment")[0] for a in creds.enrollment_addresses]
    run.report.check(
        "credentials name the broker's advertised, non-loopback address",
        dialled == [c.net.broker_host()],
        ", ".join(creds.enrollment_addresses),
    )
    facts = {name: s.facts.replication_host for name, s in c.servers().items()}
    run.report.check(
        "hosts report non-loopback replication addresses",
        all(not addresses.is_loopback(h) for h in facts.values()),
        str(facts),
    )


def walkthrough(run: Run) -> None:
    """The ASR VMM-to-VMM walkthrough: register, pair, map, protect, test failover, plan failover."""
    c = run.c
    check_addresses(run)
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.create_vm("hv-a2", "vm2")
    for vm in ("vm1", "vm2"):
        run.start_writer(vm)
        run.protect(vm)
    run.check_replica("vm1")
    # Test failover while the writer goes on; production replication is not disturbed.
    run.run_job(
        run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="test", network="create")
    )
    v = c.protected("vm1")
    test_host = c.agents[v.replica_server]
    chains = {d: chain[-1] for d, chain in test_host.backend.disk_chains("vm1-test").items()}
    run.check_copy("vm1: test failover VM is one point in time", "vm1", chains)
    run.cycle("vm1")
    run.run_job(
        run.c.stub.CleanupTestFailover,
        admin_pb2.CleanupTestRequest(vm="vm1", notes="harness: test VM verified"),
    )
    gone = True
    try:
        test_host.backend.find_vm("vm1-test")
        gone = False
    except SitepairError:
        pass
    run.report.check("vm1: test failover cleaned up", gone)
    # A recovery plan: vm1, then vm2, then a script on the recovery site.
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
    c.call(c.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="app", group=2, vm="vm2"))
    c.call(
        c.stub.AddPlanAction,
        admin_pb2.AddPlanActionRequest(
            plan="app",
            group=2,
            when="after",
            action=admin_pb2.PlanAction(
                name="mark", script="mark.py", args=[str(marker)], timeout_seconds=60
            ),
        ),
    )
    run.run_job(run.c.stub.PlanFailover, admin_pb2.PlanFailoverRequest(plan="app", type="planned"))
    for vm in ("vm1", "vm2"):
        run.stop_writer(vm)  # stopped by the shutdown already
        run.check_running(vm, all_writes=True)
    run.report.check(
        "plan script ran after group 2", marker.exists() and "group 2 vm2" in marker.read_text()
    )


def failback(run: Run) -> None:
    """Planned failover with reverse replication, writes at the recovery site, failback."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1")
    run.protect("vm1")
    for trip in range(2):
        run.wait_writes("vm1", len(run.log("vm1").records()) + 200)
        run.run_job(
            run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="planned", reverse=True)
        )
        run.stop_writer("vm1")
        run.check_running("vm1", all_writes=True)
        run.check_replica("vm1", all_writes=True)
        run.report.details[f"trip {trip + 1} runs on"] = c.host_of_vm("vm1").name
        run.start_writer("vm1")
    run.stop_writer("vm1")


def site_loss(run: Run) -> None:
    """Unplanned failover after losing the primary site; the old site returns and is fenced."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1")
    run.protect("vm1")
    run.c.call(
        run.c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="pause")
    )
    run.wait_writes("vm1", 300)
    run.cycle("vm1")
    committed = run.check_replica("vm1")
    run.wait_writes("vm1", committed + 200)
    # The primary site is lost: its agents die and the inter-site link goes down.
    lost_at = time.time()
    for a in c.agents.values():
        if a.site == "a":
            c.kill_agent(a.name)
    c.net.partition()
    run.report.faults.append("partition")
    run.writers["vm1"].stop()  # the site is gone: nothing more it writes can be replicated
    writer_total = len(run.log("vm1").records())
    run.run_job(run.c.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="unplanned"))
    v = c.protected("vm1")
    new_host = c.agents[v.replica_server]
    chains = {d: chain[-1] for d, chain in new_host.backend.disk_chains("vm1").items()}
    prefix = run.check_copy(
        "vm1: failed-over VM is the last committed point", "vm1", chains, at_least=committed
    )
    records = run.log("vm1").records()
    lost = writer_total - prefix
    rpo = lost_at - records[prefix - 1].done if prefix else 0.0
    run.report.worst_rpo = max(run.report.worst_rpo, rpo)
    run.report.details["writes lost with the site"] = lost
    # Keep only the writes the failed-over VM holds: the rest died with the primary site.
    run.log("vm1").path.write_text(
        "".join(line + "\n" for line in run.log("vm1").path.read_text().splitlines()[:prefix])
    )
    run.writers.pop("vm1", None)
    # The application goes on at the recovery site (the lost site's copy still says "running"
    # in its folder until it is fenced, so name the host).
    run.start_writer("vm1", host_name=new_host.name)
    run.wait_writes("vm1", prefix + 200)
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
        len(c.running_copies("vm1")) == 1,
        ", ".join(c.running_copies("vm1")),
    )
    run.run_job(run.c.stub.ReverseReplication, admin_pb2.ProtectedRef(vm="vm1"))
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)


def kill_soak(run: Run) -> None:
    """SIGKILL the primary agent, the replica agent or the broker at random moments of cycles."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1", rate=150)
    run.protect("vm1")
    c.call(c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="pause"))
    kills = run.kills or 6
    best = 0
    # A soak spreads its kills over its time (run.soak seconds): between kills the writer goes
    # on, so later kills land in bigger cycles.
    started = time.monotonic()
    for i in range(kills):
        if run.soak:
            time.sleep(max(0.0, started + i * run.soak / kills - time.monotonic()))
        v = c.protected("vm1")
        target = run.rng.choice(["primary", "replica", "broker"])
        run.wait_writes("vm1", len(run.log("vm1").records()) + 100)
        outcome: list[BaseException] = []

        def background(outcome: list[BaseException] = outcome) -> None:
            try:
                c.call(
                    c.stub.ReplicationAction,
                    admin_pb2.ReplicationActionRequest(vm="vm1", action="cycle"),
                )
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=background, daemon=True)
        t.start()
        time.sleep(run.rng.uniform(0.05, 1.5))
        if target == "broker":
            c.kill_broker()
            time.sleep(run.rng.uniform(0, 0.5))
            c.start_broker()
        else:
            name = v.primary_server if target == "primary" else v.replica_server
            c.kill_agent(name)
            time.sleep(run.rng.uniform(0, 0.5))
            c.start_agent(name)
        t.join(60)
        c.wait_connected()
        # Replication resumes: a cycle after the restart commits, and the replica is one point.
        for attempt in range(10):
            try:
                run.cycle("vm1")
                break
            except (AssertionError, SitepairError) as exc:
                if attempt == 9:
                    run.report.check(f"kill {i + 1}: replication resumed", False, str(exc))
                time.sleep(2)
        best = max(best, run.check_replica("vm1", at_least=best))
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)
    run.report.details["kills"] = kills


def wan_resync(run: Run) -> None:
    """A slow WAN link, a resync, and a disconnect in the middle of it."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1", rate=200)
    run.protect("vm1")
    c.call(c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="pause"))
    base = c.net.profile
    c.net.apply(SLOW_LINK)
    run.report.details["profile"] = f"{SLOW_LINK.name}: {SLOW_LINK.description}"
    run.wait_writes("vm1", 400)
    job = c.call(
        c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="resync")
    )
    run.jobs.append(job.id)
    time.sleep(run.rng.uniform(0.3, 1.0))
    c.net.partition()
    run.report.faults.append("partition mid-resync")
    time.sleep(2)
    c.net.heal()
    try:
        c.job(job)
    except AssertionError:
        run.cycle("vm1")  # the interrupted resync is finished by the next cycle
    c.net.apply(base)
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)


def rpo_hold(run: Run) -> None:
    """Copy frequency 30 s under sustained random writes: the worst lag seen."""
    c = run.c
    c.pair(policy(copy=30))
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1", rate=100)
    run.protect("vm1")
    duration = run.soak or 75.0
    worst = 0.0
    samples = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        v = c.protected("vm1")
        cut = v.replica_status.last_cut_at.seconds + v.replica_status.last_cut_at.nanos / 1e9
        if cut:
            worst = max(worst, time.time() - cut)
            samples += 1
        time.sleep(1.0)
    run.report.worst_rpo = worst
    run.report.details["samples"] = samples
    run.report.details["copy frequency"] = 30
    # The lag stays within two intervals plus a cycle's duration.
    run.report.check("worst lag within 2 copy intervals + 15 s", worst <= 75.0, f"{worst:.1f} s")
    c.call(c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="pause"))
    time.sleep(1)
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)
    records = run.log("vm1").records()
    run.report.details["writes"] = len(records)
    run.report.details["completed before end"] = completed_before(records, time.time())


def replica_full(run: Run) -> None:
    """The replica host's storage fills up: cycles are refused, health says why, nothing is lost;
    with space back, replication resumes and the replica is exact."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1")
    run.protect("vm1")
    pause(run, "vm1")
    before = c.protected("vm1").replica_status.committed_sequence
    storage = c.agents[c.protected("vm1").replica_server].home / "gold"
    # Another tenant of the volume takes all but 256 KiB of it.
    ballast = storage / "ballast.bin"
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(storage).free - (256 << 10))
    finally:
        os.close(fd)
    run.report.faults.append("replica storage full")
    run.wait_writes("vm1", len(run.log("vm1").records()) + 300)
    job = try_cycle(run, "vm1")
    run.report.check(
        "a cycle into a full disk fails and says so",
        job.state == "failed" and "full" in job.error,
        job.error[:200],
    )
    reason = wait_reason(run, "vm1", "replica-disk-full")
    run.report.check("health names the full disk", reason.startswith("critical"), reason[:200])
    after = c.protected("vm1").replica_status.committed_sequence
    run.report.check(
        "the replica kept its last good point", after == before, f"sequence {before} -> {after}"
    )
    run.check_replica("vm1")  # still one point in time, untouched by the failed cycle
    ballast.unlink()
    run.report.details["free after the fault"] = shutil.disk_usage(storage).free
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)
    gone = wait_reason(run, "vm1", "replica-disk-full", present=False)
    run.report.check("health clears once a cycle lands", gone == "", gone)


def clock_skew(run: Run) -> None:
    """The replica host's clock jumps two hours ahead (ticket authentication): health names the
    clock, cycles are refused with the reason, nothing is lost; with the clock fixed, they land."""
    c = run.c
    c.pair(policy(auth="ticket"))
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1")
    run.protect("vm1")
    pause(run, "vm1")
    replica = c.protected("vm1").replica_server
    site = c.agents[replica].site
    c.kill_agent(replica)
    c.site_env[site] = {"SITEPAIR_CLOCK_OFFSET": "7200"}
    c.start_agent(replica)
    c.wait_connected()
    run.report.faults.append(f"clock of {replica} +2 h")
    reason = wait_reason(run, "vm1", "replica-host-clock")
    ahead = re.search(r"(\d+) s ahead", reason)
    run.report.check(
        "health names the replica host's clock, two hours ahead",
        reason.startswith("critical") and ahead is not None and 7100 < int(ahead[1]) < 7300,
        reason[:200],
    )
    run.wait_writes("vm1", len(run.log("vm1").records()) + 200)
    job = try_cycle(run, "vm1")
    run.report.check(
        "a cycle is refused and the error points at the clock",
        job.state == "failed" and "clock" in job.error,
        job.error[:240],
    )
    run.check_replica("vm1")
    c.kill_agent(replica)
    c.site_env.pop(site)
    c.start_agent(replica)
    c.wait_connected()
    gone = wait_reason(run, "vm1", "replica-host-clock", present=False)
    run.report.check("health clears with the clock fixed", gone == "", gone)
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)


def bad_link(run: Run) -> None:
    """A lossy WAN link that also corrupts, truncates and partitions replication streams: each
    cycle lands whole or not at all, and the replica ends exact."""
    c = run.c
    c.pair(policy())
    run.create_vm("hv-a1", "vm1")
    run.start_writer("vm1", rate=20)  # the lossy link carries about 1 MB/s
    run.protect("vm1")
    pause(run, "vm1")
    base = c.net.profile
    c.net.apply(LOSSY)
    run.report.details["profile"] = f"{LOSSY.name}: {LOSSY.description}"
    failed = 0
    faults: list[tuple[str, Callable[[], None]]] = [
        ("a flipped byte 64 KiB into the stream", lambda: c.net.corrupt_next(64 << 10)),
        ("the stream cut after 200 KiB", lambda: c.net.cut_next(200 << 10)),
        ("a flipped byte in the replies", lambda: c.net.corrupt_next(200, "down")),
    ]
    for what, arm in faults:
        run.wait_writes("vm1", len(run.log("vm1").records()) + 40)
        armed = c.net.stats
        before = armed.corrupted + armed.cut
        arm()
        run.report.faults.append(what)
        if try_cycle(run, "vm1").state != "succeeded":
            failed += 1
        # The fault hit the cycle's stream (replication keeps its connection across cycles:
        # an armed fault takes the next bytes that cross the link, on whatever connection).
        after = c.net.stats
        run.report.check(
            f"{what}: injected", after.corrupted + after.cut > before, str(after)[:200]
        )
        run.check_replica("vm1")  # whatever happened, the replica is one point in time
    run.wait_writes("vm1", len(run.log("vm1").records()) + 40)
    job = c.call(
        c.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="vm1", action="cycle")
    )
    run.jobs.append(job.id)
    time.sleep(run.rng.uniform(0.2, 0.6))
    c.net.partition()
    run.report.faults.append("partition during a cycle")
    time.sleep(2)
    c.net.heal()
    assert c.admin is not None
    if wait_job(c.admin, job.id).state != "succeeded":
        failed += 1
    c.net.apply(base)
    run.stop_writer("vm1")
    run.cycle("vm1")
    run.check_replica("vm1", all_writes=True)
    run.report.details["cycles the faults failed"] = failed
    run.report.details["link"] = str(c.net.stats)[:300]


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "walkthrough": walkthrough,
    "failback": failback,
    "site-loss": site_loss,
    "kill-soak": kill_soak,
    "wan-resync": wan_resync,
    "rpo-hold": rpo_hold,
    "replica-full": replica_full,
    "clock-skew": clock_skew,
    "bad-link": bad_link,
}
SITES: dict[str, dict[str, int]] = {
    "walkthrough": {"a": 2, "b": 2},
}
#: Scenarios whose hosts keep their storage on a size-limited filesystem (bytes; needs root).
SMALL_STORAGE: dict[str, dict[str, int]] = {
    "replica-full": {"hv-b1": 1200 * MiB},  # placement wants the disks + 1 GiB free
}
