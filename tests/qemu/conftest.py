"""Two sites of one qemu host each, a broker, and a real guest (tests/support/guest.py).

The guest boots from its VHDX boot disk through SeaBIOS and writes durable, checksummed records
to an ext4 filesystem on its VHDX data disk, acknowledging each on its serial console; after a
failover it boots on the recovery host and checks every record on the disk itself. Guests run
under TCG (KVM does not work on these machines), with no network: their NICs' VM networks map
to "isolated" QEMU user-mode networking (no route anywhere).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.hosts.qemu import QemuBackend
from agent.hosts.qemu_vm import Runtime, running_instance
from broker.client import AdminClient, wait_job
from sitepair.v1 import admin_pb2
from tests.protection.conftest import eventually
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerThread, create_key
from tests.support.guest import ConsoleLog, GuestImage, missing_tools

pytestmark = pytest.mark.timeout(600)


def _skip_if_missing() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"qemu tests need {', '.join(missing)}; scripts/setup.sh installs them")


@dataclasses.dataclass
class Host:
    name: str
    site: str
    home: Path
    host_id: str
    agent: AgentThread | None = None

    @property
    def backend(self) -> QemuBackend:
        return QemuBackend(self.home / "gold" / "vms", accel="tcg", stop_timeout=30)

    def start(self) -> None:
        if self.agent is None:
            self.agent = AgentThread(self.home)
            self.agent.wait_connected()

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def console(self, vm: str) -> ConsoleLog:
        folder, _ = self.backend.find_vm(vm)
        return ConsoleLog(Runtime(folder).serial)

    def qemu_pid(self, vm: str) -> int | None:
        folder, _ = self.backend.find_vm(vm)
        inst = running_instance(Runtime(folder))
        return inst.pid if inst else None

    def kill_all_vms(self) -> None:
        from agent.hosts import qemu_vm

        for folder in self.backend.list_vm_dirs():
            inst = running_instance(Runtime(folder))
            if inst is not None:
                qemu_vm.kill(inst)


@dataclasses.dataclass
class Sites:
    broker: BrokerThread
    admin: AdminClient
    a: Host
    b: Host
    image: GuestImage

    def job(self, job: admin_pb2.Job, *, expect: str = "succeeded") -> admin_pb2.Job:
        done = wait_job(self.admin, job.id, timeout=300)
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

    def host(self, name: str) -> Host:
        return self.a if name == self.a.name else self.b

    def make_guest(self, name: str = "web01") -> None:
        """The guest VM on site A, running."""
        backend = self.a.backend
        boot, data = self.image.copy_disks(self.a.home / "images", prefix=f"{name}-")
        backend.create_vm(
            name,
            disks=[("boot", "vhdx", boot), ("data", "vhdx", data)],
            memory_mb=256,
            nics=[("nic0", "corp-a")],
        )
        backend.set_vm_state(name, "running")
        self.a.console(name).wait_for(lambda c: len(c.acks()) >= 3, timeout=120)

    def cycle(self, vm: str) -> None:
        self.job(
            self.admin.call(
                self.admin.stub.ReplicationAction,
                admin_pb2.ReplicationActionRequest(vm=vm, action="cycle"),
            )
        )

    def replica_tops(self, vm: str) -> dict[str, Path]:
        """The replica's latest layer of each disk (on the recovery host)."""
        v = self.protected(vm)
        host = self.host(v.replica_server)
        roots = [p.parent for p in host.home.rglob("state.json") if (p.parent / "disks").is_dir()]
        for root in roots:
            state = json.loads((root / "state.json").read_text())
            if state["relationship"] == v.relationship_id:
                return {d: root / s["chain"][-1] for d, s in state["disks"].items()}
        raise AssertionError(f"no replica of {vm} on {host.name}")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    _skip_if_missing()
    return GuestImage.build()


@pytest.fixture
def sites(
    broker: BrokerThread, admin: AdminClient, tmp_path: Path, guest_image: GuestImage
) -> Iterator[Sites]:
    hosts = []
    for name, site, net in (("kvm-a1", "site-a", "corp-a"), ("kvm-b1", "site-b", "corp-b")):
        creds = tmp_path / f"{name}.json"
        create_key(admin, creds, site=site)
        home = tmp_path / name
        (home / "gold" / "vms").mkdir(parents=True)
        ident = register_agent(
            creds,
            home,
            name=name,
            storage={"gold": str(home / "gold")},
            networks=[(net, ["10.0.0.0/24"])],
            qemu_networks={net: "isolated"},
            vm_root="gold/vms",
            backend="qemu",
            accel="tcg",
        )
        hosts.append(Host(name, site, home, ident.host_id))
    a, b = hosts
    for h in hosts:
        h.start()
    s = Sites(broker, admin, a, b, guest_image)
    try:
        admin.call(
            admin.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a")
        )
        admin.call(
            admin.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b")
        )
        admin.call(
            admin.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server=a.name)
        )
        admin.call(
            admin.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server=b.name)
        )
        policy = admin_pb2.Policy(
            copy_frequency_seconds=900,  # cycles are asked for by the tests
            recovery_points=2,
            compression=True,
            authentication="certificate",
        )
        s.job(
            admin.call(
                admin.stub.PairClouds,
                admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
            )
        )
        admin.call(
            admin.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b")
        )
        admin.call(
            admin.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold")
        )
        yield s
    finally:
        for h in hosts:
            h.stop()
            h.kill_all_vms()


def inventory_has(admin: AdminClient, vm: str) -> bool:
    return any(
        v.vm.name == vm for v in admin.call(admin.stub.ListVms, admin_pb2.ListVmsRequest()).vms
    )


__all__ = ["Host", "Sites", "eventually", "inventory_has"]
