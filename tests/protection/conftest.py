"""Two sites of two agents each, running in threads, against a real broker."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.hosts.directory import DirectoryBackend
from broker.client import AdminClient, wait_job
from sitepair.v1 import admin_pb2
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerThread, create_key


def eventually(
    check: Callable[[], object], *, timeout: float = 30, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclasses.dataclass
class Host:
    name: str
    site: str
    home: Path
    host_id: str
    agent: AgentThread | None

    @property
    def backend(self) -> DirectoryBackend:
        return DirectoryBackend(self.home / "gold" / "vms", storage=(("gold", self.home / "gold"),))

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def start(self) -> None:
        if self.agent is None:
            self.agent = AgentThread(self.home)
            self.agent.wait_connected()


@dataclasses.dataclass
class Sites:
    broker: BrokerThread
    admin: AdminClient
    hosts: dict[str, Host]

    def job(self, job: admin_pb2.Job, *, expect: str = "succeeded") -> admin_pb2.Job:
        done = wait_job(self.admin, job.id)
        assert done.state == expect, (
            done.state,
            done.error,
            [(s.name, s.state, s.message) for s in done.steps],
        )
        return done

    def protected(self, vm: str) -> admin_pb2.ProtectedVm:
        v: admin_pb2.ProtectedVm = self.admin.call(
            self.admin.stub.GetProtected, admin_pb2.ProtectedRef(vm=vm)
        )
        return v


@pytest.fixture
def sites(broker: BrokerThread, admin: AdminClient, tmp_path: Path) -> Iterator[Sites]:
    hosts: dict[str, Host] = {}
    for name, site in (
        ("hv-a1", "site-a"),
        ("hv-a2", "site-a"),
        ("hv-b1", "site-b"),
        ("hv-b2", "site-b"),
    ):
        creds = tmp_path / f"{name}.json"
        create_key(admin, creds, site=site)
        home = tmp_path / name
        (home / "gold").mkdir(parents=True)
        ident = register_agent(
            creds,
            home,
            name=name,
            storage={"gold": str(home / "gold")},
            networks=[("corp-a" if site == "site-a" else "corp-b", ["10.0.0.0/24"])],
            vm_root="gold/vms",  # VMs live in the "gold" storage classification
        )
        hosts[name] = Host(name, site, home, ident.host_id, None)
    for h in hosts.values():
        h.start()
    try:
        yield Sites(broker, admin, hosts)
    finally:
        for h in hosts.values():
            h.stop()


def inventory_has(admin: AdminClient, vm: str) -> bool:
    resp = admin.call(admin.stub.ListVms, admin_pb2.ListVmsRequest())
    return any(v.vm.name == vm for v in resp.vms)


def as_json(message: object) -> dict[str, object]:
    from google.protobuf import json_format

    return json.loads(json_format.MessageToJson(message))  # type: ignore[arg-type]
