"""A stateful property test of protection and failover with a real broker and real agents.

Hypothesis drives random sequences of operator commands (planned, unplanned and test failovers,
cleanup, commit, cancel, reverse, manual cycles) and agent events (a host going down and coming
back). After every step, once the jobs it started have settled:

* at most one copy of the VM is running (never two writable primaries; the test copy aside);
* the relationship's epoch never goes backwards, and no agent has seen a higher one;
* no job is left unfinished while every host is up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TypeVar

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.replication.state import ReplicationState
from broker.client import wait_job
from sitepair.errors import DeadlineExceeded, SitepairError
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Host, Sites, eventually, inventory_has
from tests.protection.test_walkthrough import MiB, make_vm
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key, make_home

RequestT = TypeVar("RequestT")

FINAL = ("succeeded", "failed", "cancelled")


class ProtectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sitepair-sm-"))
        self.broker = BrokerThread(make_home(self.tmp / "broker"))
        self.admin = self.broker.admin()
        hosts = {}
        for name, site in (("hv-a1", "site-a"), ("hv-b1", "site-b")):
            creds = self.tmp / f"{name}.json"
            create_key(self.admin, creds, site=site)
            home = self.tmp / name
            (home / "gold").mkdir(parents=True)
            ident = register_agent(
                creds,
                home,
                name=name,
                storage={"gold": str(home / "gold")},
                networks=[("corp-a" if site == "site-a" else "corp-b", [])],
                vm_root="gold/vms",
            )
            hosts[name] = Host(name, site, home, ident.host_id, None)
        for h in hosts.values():
            h.start()
        self.s = Sites(self.broker, self.admin, {**hosts})
        a = self.admin
        a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
        a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
        self.s.job(
            a.call(
                a.stub.PairClouds,
                admin_pb2.PairCloudsRequest(
                    primary="cloud-a",
                    recovery="cloud-b",
                    policy=admin_pb2.Policy(
                        copy_frequency_seconds=300, recovery_points=1, compression=True
                    ),
                ),
            )
        )
        a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
        make_vm(self.s, "hv-a1", "vm1", size=4 * MiB)
        self.s.hosts["hv-a1"].backend.set_vm_state("vm1", "running")
        eventually(lambda: inventory_has(a, "vm1"), what="VM")
        self.s.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="vm1")))
        self.max_epoch = self.s.protected("vm1").epoch
        self.jobs: list[str] = []

    def teardown(self) -> None:
        for h in self.s.hosts.values():
            h.stop()
        self.admin.close()
        self.broker.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------
    def _run(
        self, method: grpc.UnaryUnaryMultiCallable[RequestT, admin_pb2.Job], request: RequestT
    ) -> None:
        try:
            job = self.admin.call(method, request)
        except SitepairError:
            return  # refused: a valid answer to a command that does not fit the state
        self.jobs.append(job.id)
        if all(h.agent is not None for h in self.s.hosts.values()):
            try:
                wait_job(self.admin, job.id, timeout=60)
            except DeadlineExceeded:
                stuck = self.admin.call(self.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id))
                steps = [(st.name, st.state, st.message) for st in stuck.steps]
                raise AssertionError(f"job {stuck.kind} stuck {stuck.state}: {steps}") from None
        else:
            time.sleep(0.5)

    @property
    def all_up(self) -> bool:
        return all(h.agent is not None for h in self.s.hosts.values())

    # -- operator commands ----------------------------------------------------------------
    @rule(reverse=st.booleans())
    def planned(self, reverse: bool) -> None:
        self._run(
            self.admin.stub.Failover,
            admin_pb2.FailoverRequest(vm="vm1", type="planned", reverse=reverse),
        )

    @rule(point=st.sampled_from(["latest", "1"]))
    def unplanned(self, point: str) -> None:
        self._run(
            self.admin.stub.Failover,
            admin_pb2.FailoverRequest(vm="vm1", type="unplanned", point=point),
        )

    @rule()
    def test_failover(self) -> None:
        self._run(self.admin.stub.Failover, admin_pb2.FailoverRequest(vm="vm1", type="test"))

    @rule()
    def cleanup_test(self) -> None:
        self._run(self.admin.stub.CleanupTestFailover, admin_pb2.CleanupTestRequest(vm="vm1"))

    @rule()
    def commit(self) -> None:
        self._run(self.admin.stub.CommitFailover, admin_pb2.ProtectedRef(vm="vm1"))

    @rule()
    def cancel(self) -> None:
        self._run(self.admin.stub.CancelFailover, admin_pb2.ProtectedRef(vm="vm1"))

    @rule()
    def reverse(self) -> None:
        self._run(self.admin.stub.ReverseReplication, admin_pb2.ProtectedRef(vm="vm1"))

    @rule()
    def cycle(self) -> None:
        self._run(
            self.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="vm1", action="cycle"),
        )

    # -- agent events ----------------------------------------------------------------------
    @precondition(lambda self: self.all_up)
    @rule(host=st.sampled_from(["hv-a1", "hv-b1"]))
    def host_down(self, host: str) -> None:
        self.s.hosts[host].stop()

    @precondition(lambda self: not self.all_up)
    @rule()
    def hosts_up(self) -> None:
        for h in self.s.hosts.values():
            h.start()
        # A returning old primary is fenced by a job the broker starts when it connects.
        eventually(self._all_connected, what="hosts connected")
        eventually(
            lambda: all(
                j.state in FINAL
                for j in self.admin.call(
                    self.admin.stub.ListJobs, admin_pb2.ListJobsRequest(kind="fence-old-primary")
                ).jobs
            ),
            timeout=60,
            what="fencing done",
        )

    def _all_connected(self) -> bool:
        servers = self.admin.call(
            self.admin.stub.ListServers, admin_pb2.ListServersRequest()
        ).servers
        return all(v.state == "connected" for v in servers)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def one_running_copy_and_monotonic_epochs(self) -> None:
        # A host whose agent is down cannot be told to stop its copy (an unplanned failover
        # accepts that); the broker fences it as soon as it returns (see hosts_up). So only
        # hosts that are up count.
        running = []
        for h in self.s.hosts.values():
            if h.agent is None:
                continue
            try:
                if h.backend.find_vm("vm1")[1].state == "running":
                    running.append(h.name)
            except SitepairError:
                pass
        assert len(running) <= 1, f"two writable copies of vm1: {running}"
        v = self.s.protected("vm1")
        assert v.epoch >= self.max_epoch, f"epoch went back from {self.max_epoch} to {v.epoch}"
        self.max_epoch = v.epoch
        for h in self.s.hosts.values():
            state = ReplicationState(h.home / "state" / "replication.db")
            try:
                seen = state.epoch(v.relationship_id)
            finally:
                state.close()
            assert seen <= v.epoch, f"{h.name} saw epoch {seen} above the broker's {v.epoch}"

    @invariant()
    def no_job_left_running(self) -> None:
        if not self.all_up:
            return
        for job_id in self.jobs:
            job = eventually(
                lambda j=job_id: (
                    (
                        got := self.admin.call(
                            self.admin.stub.GetJob, admin_pb2.GetJobRequest(id=j)
                        )
                    ).state
                    in FINAL
                    and got
                ),
                timeout=60,
                what=f"job {job_id} to finish",
            )
            assert job


TestProtectionMachine = ProtectionMachine.TestCase
TestProtectionMachine.settings = settings(
    # A longer hunt: SITEPAIR_MACHINE_EXAMPLES=200 make test (each example is a few seconds).
    max_examples=int(os.environ.get("SITEPAIR_MACHINE_EXAMPLES", "8")),
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
