"""A real broker and two real agents with metrics on loopback, and a scraper over real HTTP."""

from __future__ import annotations

import dataclasses
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.hosts.directory import DirectoryBackend
from broker.client import AdminClient, wait_job
from broker.home import BrokerHome
from sitepair.v1 import admin_pb2
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerThread, create_key, make_home

ON_LOOPBACK = 'enabled = true\nlisten = "127.0.0.1:0"'


def enable_metrics(config: Path, extra: str = "") -> None:
    """Turn ``[metrics]`` on in a broker.toml or agent.toml, on a free loopback port."""
    text = config.read_text()
    head, sep, tail = text.partition("[metrics]")
    assert sep, f"{config} has no [metrics] section"
    tail = tail.replace("enabled = false", "enabled = true", 1)
    tail = tail.replace('"127.0.0.1:9464"', '"127.0.0.1:0"', 1)
    tail = tail.replace('"127.0.0.1:9465"', '"127.0.0.1:0"', 1)
    for line in extra.splitlines():
        key = line.split("=", 1)[0].strip()
        tail = tail.replace(f'{key} = ""', line, 1)
    config.write_text(head + sep + tail)


def scrape(address: str, *, context: ssl.SSLContext | None = None) -> dict[str, Metric]:
    """GET /metrics over real HTTP(S) and parse it with prometheus_client's parser."""
    scheme = "https" if context is not None else "http"
    with urllib.request.urlopen(f"{scheme}://{address}/metrics", timeout=10, context=context) as r:
        text = r.read().decode()
    return {m.name: m for m in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], name: str, suffix: str = "", **labels: str) -> float:
    """The one sample of ``name`` (``suffix``: _total, _count...) whose labels include
    ``labels``."""
    found = [
        s.value
        for s in families[name].samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, suffix, labels, families[name].samples)
    return float(found[0])


def eventually(check: Callable[[], object], *, timeout: float = 30, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclasses.dataclass
class Pair:
    broker: BrokerThread
    admin: AdminClient
    agents: dict[str, AgentThread]
    homes: dict[str, Path]

    @property
    def broker_metrics(self) -> str:
        return self.broker.broker.metrics_address

    def agent_metrics(self, name: str) -> str:
        return self.agents[name].daemon.metrics_address

    def job(self, job: admin_pb2.Job) -> admin_pb2.Job:
        done = wait_job(self.admin, job.id)
        assert done.state == "succeeded", (done.state, done.error)
        return done

    def action(self, vm: str, action: str) -> admin_pb2.Job:
        a = self.admin
        return self.job(
            a.call(
                a.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm=vm, action=action)
            )
        )

    def protected(self, vm: str) -> admin_pb2.ProtectedVm:
        v: admin_pb2.ProtectedVm = self.admin.call(
            self.admin.stub.GetProtected, admin_pb2.ProtectedRef(vm=vm)
        )
        return v


@pytest.fixture
def metrics_broker_home(tmp_path: Path) -> BrokerHome:
    home = make_home(tmp_path / "broker", log_file=tmp_path / "broker.log")
    enable_metrics(home.config)
    return home


@pytest.fixture
def pair(metrics_broker_home: BrokerHome, tmp_path: Path) -> Iterator[Pair]:
    broker = BrokerThread(metrics_broker_home)
    admin = broker.admin()
    agents: dict[str, AgentThread] = {}
    homes: dict[str, Path] = {}
    try:
        for name, site in (("hv-a1", "site-a"), ("hv-b1", "site-b")):
            creds = tmp_path / f"{name}.json"
            create_key(admin, creds, site=site)
            home = tmp_path / name
            (home / "gold").mkdir(parents=True)
            register_agent(
                creds,
                home,
                name=name,
                storage={"gold": str(home / "gold")},
                networks=[("corp-a" if site == "site-a" else "corp-b", ["10.0.0.0/24"])],
                vm_root="gold/vms",
            )
            enable_metrics(home / "agent.toml")
            homes[name] = home
            agents[name] = AgentThread(home)
            agents[name].wait_connected()
        yield Pair(broker, admin, agents, homes)
    finally:
        for agent in agents.values():
            agent.stop()
        admin.close()
        broker.stop()


def protect_vm(p: Pair, vm: str = "web01") -> None:
    """Pair two clouds (copy every 300 s: cycles run when the test asks) and protect ``vm``."""
    a = p.admin
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
    policy = admin_pb2.Policy(
        copy_frequency_seconds=300, compression=True, authentication="certificate"
    )
    p.job(
        a.call(
            a.stub.PairClouds,
            admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
        )
    )
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))
    home = p.homes["hv-a1"]
    backend = DirectoryBackend(home / "gold" / "vms", storage=(("gold", home / "gold"),))
    (home / "gold" / "vms").mkdir(exist_ok=True)
    backend.create_vm(
        vm, disks=[("os", "vhdx", 8 << 20)], cpu=1, memory_mb=512, nics=[("nic0", "corp-a")]
    )
    with backend.open_writer(vm) as w:
        w.write("os", 1 << 20, b"\x5a" * 300_000)
        w.flush()

    def in_inventory() -> bool:
        resp = a.call(a.stub.ListVms, admin_pb2.ListVmsRequest())
        return any(v.vm.name == vm for v in resp.vms)

    eventually(in_inventory, what="VM in inventory")
    p.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))


def write_guest(p: Pair, vm: str, offset: int, data: bytes) -> None:
    home = p.homes["hv-a1"]
    backend = DirectoryBackend(home / "gold" / "vms", storage=(("gold", home / "gold"),))
    with backend.open_writer(vm) as w:
        w.write("os", offset, data)
        w.flush()
