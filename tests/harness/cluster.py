"""A whole deployment on one machine: a broker and N agents per site, each its own process.

Every component has its own home folder under the run's root and is started the way an operator
would (``sitepair-broker serve``, ``sitepair-agent run``), so SIGKILL of any one of them is a
real crash. The network layer (tests/harness/network, loopback or namespaces) says where each
place listens and wraps each command so it runs there; replication traffic between the sites goes
through its inter-site link, which the scenarios shape and break on demand. The harness itself
reaches the broker through the network's portal.

The hosts run the ``directory`` backend (VMs are folders a workload writes into) or, with
``backend="qemu"``, the ``qemu`` backend under TCG, each VM network mapped to "isolated" QEMU
networking: VMs are QEMU processes (daemonized, so they outlive the agent that started them;
:meth:`Cluster.stop` ends those that are left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent import config as agent_config
from agent.hosts import make_backend, qemu_vm
from agent.hosts.directory import DirectoryBackend
from agent.hosts.qemu import QemuBackend
from broker.client import AdminClient, Profile, wait_job
from broker.config import StoreConfig
from broker.home import BrokerHome
from sitepair.errors import SitepairError
from sitepair.v1 import admin_pb2, admin_pb2_grpc
from tests.harness.network import Network, small_filesystem
from tests.support.brokers import create_key, python_env, tune_timings

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("directory", "qemu")


@dataclasses.dataclass
class AgentProc:
    name: str
    site: str
    home: Path
    host_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    #: The host backend its agent.toml names: "directory" or "qemu".
    kind: str = "directory"

    @property
    def backend(self) -> DirectoryBackend | QemuBackend:
        """The host's VMs, seen from the harness (as the agent sees them: same configuration)."""
        if self.kind == "qemu":
            return self.qemu
        return DirectoryBackend(self.home / "gold" / "vms", storage=(("gold", self.home / "gold"),))

    @property
    def qemu(self) -> QemuBackend:
        """The host's qemu backend, built from its agent.toml as the agent builds it."""
        backend = make_backend(agent_config.load(self.home))
        assert isinstance(backend, QemuBackend), f"{self.name} runs the {self.kind} backend"
        return backend

    def vm_running(self, vm: str) -> bool:
        """The VM is running (or paused) on this host. For qemu: its QEMU process lives (read
        from the files its start recorded, so the harness never competes for the VM's QMP)."""
        if self.kind == "qemu":
            folder = self.qemu.vm_dir(vm)
            return (folder / "vm.json").exists() and qemu_vm.running_instance(
                qemu_vm.Runtime(folder)
            ) is not None
        try:
            return DirectoryBackend(self.home / "gold" / "vms").find_vm(vm)[1].state == "running"
        except (SitepairError, OSError):
            return False

    def kill_vms(self) -> None:
        """SIGKILL every QEMU process of this host's VMs (qemu backend; a power cut)."""
        if self.kind != "qemu":
            return
        for folder in self.qemu.list_vm_dirs():
            inst = qemu_vm.running_instance(qemu_vm.Runtime(folder))
            if inst is not None:
                qemu_vm.kill(inst)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(
        self,
        root: Path,
        *,
        sites: dict[str, int],
        network: Network,
        heartbeat: str = "1s",
        env: dict[str, str] | None = None,
        small_storage: dict[str, int] | None = None,
        store: StoreConfig | None = None,
        backend: str = "directory",
        log: Callable[[str], None] = print,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.root = root
        self.sites = sites
        self.net = network
        self.heartbeat = heartbeat
        self.env = {**python_env(), **(env or {})}
        self.env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
        self.env.setdefault("MALLOC_TRIM_THRESHOLD_", "268435456")
        self.log = log
        self.home: BrokerHome | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, AgentProc] = {}
        self.admin: AdminClient | None = None
        self.site_env: dict[str, dict[str, str]] = {}
        self.faults: list[str] = []
        #: Hosts whose storage ("gold") is a size-limited filesystem of this many bytes.
        self.small_storage = small_storage or {}
        #: The broker's store: None for SQLite in its home, or a PostgreSQL database.
        self.store = store
        #: The hosts' backend: "directory", or "qemu" (TCG, VM networks "isolated").
        self.backend = backend
        self._mounts = contextlib.ExitStack()

    # -- broker -----------------------------------------------------------------------------
    def start_broker(self) -> None:
        if self.home is None:
            self.home = self._init_broker()
        home = self.home
        home.run_file.unlink(missing_ok=True)
        out = (self.root / "broker.out").open("ab")
        self.broker = subprocess.Popen(
            self.net.command(
                [sys.executable, "-m", "broker.cli", "serve", "--home", str(home.root)], None
            ),
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        out.close()
        deadline = time.monotonic() + 60
        while not home.run_file.exists():
            if self.broker.poll() is not None:
                raise RuntimeError(
                    "broker exited: " + (self.root / "broker.out").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)
        if self.admin is not None:
            self.admin.close()
        profile = Profile.load(home.admin_dir, run_file=home.run_file)
        run = json.loads(home.run_file.read_text())
        _, bound_port = run["control"].rsplit(":", 1)
        portal = self.net.portal("broker", int(bound_port))
        profile = dataclasses.replace(profile, addresses=(f"{portal[0]}:{portal[1]}",))
        self.admin = AdminClient(profile, timeout=60)

    def _init_broker(self) -> BrokerHome:
        """``sitepair-broker init`` as docs/operations.md tells an operator: on loopback, the
        default one-machine addresses (with fixed ports, so a restarted broker is where the
        agents look for it); in namespaces, every interface with the broker's own address
        advertised, which puts that address into the credentials files and the certificate."""
        root = self.root / "broker"
        host = self.net.broker_host()
        enroll, control = self.net.free_port("broker"), self.net.free_port("broker")
        listen = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
        argv = [sys.executable, "-m", "broker.cli", "init", "--home", str(root), "--vault", "test"]
        argv += ["--enrollment", f"{listen}:{enroll}", "--control", f"{listen}:{control}"]
        if listen != host:
            argv += ["--advertise", host]
        if self.store is not None and self.store.backend == "postgresql":
            argv += ["--store", "postgresql", "--dsn", self.store.dsn]
        done = subprocess.run(
            self.net.command(argv, None),
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sitepair-broker init failed: {done.stderr}")
        home = BrokerHome(root)
        # Test timings only (addresses stay as init wrote them).
        tune_timings(home, heartbeat=self.heartbeat, offline_critical="10s")
        return home

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(30)
        self.faults.append("SIGKILL broker")

    # -- agents -----------------------------------------------------------------------------
    def add_agents(self) -> None:
        assert self.admin is not None
        for site, count in self.sites.items():
            for i in range(1, count + 1):
                name = f"hv-{site}{i}"
                home = self.root / name
                home.mkdir(parents=True, exist_ok=True)
                if name in self.small_storage:
                    # "sp-" lets cleanup_stale_mounts find it after a crashed run.
                    mount = self.root / f"sp-{self.root.name}-{name}-gold"
                    self._mounts.enter_context(
                        small_filesystem(mount, self.small_storage[name], kind="tmpfs")
                    )
                    (home / "gold").symlink_to(mount)
                (home / "gold" / "vms").mkdir(parents=True, exist_ok=True)
                creds = self.root / f"{name}.json"
                create_key(self.admin, creds, site=f"site-{site}")
                argv = self._register_command(name, site, home, creds)
                reg = subprocess.run(
                    self.net.command(argv, site),
                    env=self.env,
                    capture_output=True,
                    text=True,
                    check=False,
                    cwd=REPO,
                )
                if reg.returncode != 0:
                    raise RuntimeError(f"registering {name} failed: {reg.stderr}")
                agent = AgentProc(
                    name, site, home, json.loads(reg.stdout)["host_id"], kind=self.backend
                )
                self.agents[name] = agent
                self.start_agent(name)
        self.wait_connected()

    def _register_command(self, name: str, site: str, home: Path, creds: Path) -> list[str]:
        """``sitepair-agent register`` as docs/operations.md tells an operator: the receiver
        listens on the host's own address and advertises what the other site dials (here the
        WAN link's end, a proxy, hence the advertised ports)."""
        cert_port, ticket_port = self.net.free_port(site), self.net.free_port(site)
        adv_host, adv_cert = self._advertised(site, cert_port)
        _, adv_ticket = self._advertised(site, ticket_port)
        network = f"corp-{site}=10.0.0.0/24"
        if self.backend == "qemu":
            network += "@isolated"  # guests get no route anywhere: QEMU user mode, restrict=on
        return [
            sys.executable,
            "-m",
            "agent.cli",
            "register",
            "--credentials",
            str(creds),
            "--name",
            name,
            "--home",
            str(home),
            "--backend",
            self.backend,
            # KVM never works on the machines this runs on; the probe would only cost.
            *(["--accel", "tcg"] if self.backend == "qemu" else []),
            "--vm-root",
            "gold/vms",
            "--storage",
            f"gold={home / 'gold'}",
            "--network",
            network,
            "--listen",
            self.net.agent_host(site),
            "--certificate-port",
            str(cert_port),
            "--ticket-port",
            str(ticket_port),
            "--advertise",
            adv_host,
            "--advertise-certificate-port",
            str(adv_cert),
            "--advertise-ticket-port",
            str(adv_ticket),
            "--json",
        ]

    def _advertised(self, site: str, port: int) -> tuple[str, int]:
        """The address the *other* site uses for this site's receiver port."""
        others = [s for s in self.sites if s != site]
        if not others:
            return self.net.agent_host(site), port
        return self.net.link(others[0], site, self.net.agent_host(site), port)

    def start_agent(self, name: str) -> None:
        a = self.agents[name]
        out = (a.home / "agent.out").open("ab")
        env = {**self.env, **self.site_env.get(a.site, {})}
        a.proc = subprocess.Popen(
            self.net.command(
                [sys.executable, "-m", "agent.cli", "run", "--home", str(a.home)], a.site
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        out.close()

    def kill_agent(self, name: str) -> None:
        a = self.agents[name]
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(30)
        self.faults.append(f"SIGKILL agent {name}")

    def servers(self) -> dict[str, admin_pb2.Server]:
        assert self.admin is not None
        resp = self.admin.call(self.admin.stub.ListServers, admin_pb2.ListServersRequest())
        return {s.name: s for s in resp.servers}

    def wait_connected(self, names: list[str] | None = None, timeout: float = 90) -> None:
        wanted = set(names or [n for n, a in self.agents.items() if a.running])
        deadline = time.monotonic() + timeout
        while True:
            servers = self.servers()
            if all(servers.get(n) is not None and servers[n].state == "connected" for n in wanted):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents not connected: {sorted(wanted)}")
            time.sleep(0.2)

    # -- operator helpers -------------------------------------------------------------------
    @property
    def stub(self) -> admin_pb2_grpc.AdminStub:
        """The admin API's methods, to pass to :meth:`call`."""
        assert self.admin is not None
        return self.admin.stub

    def call(
        self, method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT], request: RequestT
    ) -> ResponseT:
        assert self.admin is not None
        return self.admin.call(method, request)

    def job(self, job: admin_pb2.Job, *, expect: str = "succeeded") -> admin_pb2.Job:
        assert self.admin is not None
        done = wait_job(self.admin, job.id)
        if done.state != expect:
            steps = "; ".join(f"{s.name}: {s.state} {s.message}" for s in done.steps)
            raise AssertionError(f"job {done.kind} {done.state}: {done.error} [{steps}]")
        return done

    def protected(self, vm: str) -> admin_pb2.ProtectedVm:
        v: admin_pb2.ProtectedVm = self.call(self.stub.GetProtected, admin_pb2.ProtectedRef(vm=vm))
        return v

    def pair(self, policy: admin_pb2.Policy) -> None:
        names = sorted(self.sites)
        primary, recovery = names[0], names[1]
        for site in names:
            self.call(
                self.stub.CreateCloud,
                admin_pb2.CreateCloudRequest(name=f"cloud-{site}", site=f"site-{site}"),
            )
            for a in self.agents.values():
                if a.site == site:
                    self.call(
                        self.stub.AddCloudHost,
                        admin_pb2.CloudHostRequest(cloud=f"cloud-{site}", server=a.name),
                    )
        self.job(
            self.call(
                self.stub.PairClouds,
                admin_pb2.PairCloudsRequest(
                    primary=f"cloud-{primary}", recovery=f"cloud-{recovery}", policy=policy
                ),
            )
        )
        self.call(
            self.stub.Map,
            admin_pb2.MapRequest(
                kind="network", source=f"corp-{primary}", target=f"corp-{recovery}"
            ),
        )
        self.call(self.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))

    def host_of_vm(self, vm: str) -> AgentProc:
        """The agent whose backend holds the VM running (the current primary)."""
        for a in self.agents.values():
            if a.vm_running(vm):
                return a
        raise LookupError(f"VM {vm} runs nowhere")

    def running_copies(self, vm: str) -> list[str]:
        return [a.name for a in self.agents.values() if a.vm_running(vm)]

    def replica_chains(self, vm: str) -> dict[str, Path]:
        """Top of each disk's latest chain in the VM's replica (on the replica host)."""
        return {disk: chain[-1] for disk, chain in self.replica_chain_lists(vm).items()}

    def _replica_state(self, vm: str) -> tuple[Path, dict[str, Any]]:
        """The VM's replica folder on the replica host and its ``state.json``."""
        v = self.protected(vm)
        host = next(a for a in self.agents.values() if a.name == v.replica_server)
        folder = (
            Path(v.replica_folder)
            if v.replica_folder
            else host.home / "replicas" / v.relationship_id
        )
        return folder, json.loads((folder / "state.json").read_text())

    @staticmethod
    def _layer_path(folder: Path, layer: str) -> Path:
        return Path(layer) if os.path.isabs(layer) else folder / layer

    def replica_chain_lists(self, vm: str) -> dict[str, list[Path]]:
        """Each disk's latest chain in the VM's replica, base first."""
        folder, state = self._replica_state(vm)
        return {
            disk: [self._layer_path(folder, p) for p in ds["chain"]]
            for disk, ds in state["disks"].items()
        }

    def point_chains(self, vm: str) -> dict[int, dict[str, Path]]:
        """Each recovery point's layer per disk, by sequence."""
        folder, state = self._replica_state(vm)
        return {
            p["sequence"]: {d: self._layer_path(folder, layer) for d, layer in p["layers"].items()}
            for p in state["points"]
        }

    # -- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        for a in self.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        for a in self.agents.values():
            if a.proc is not None:
                try:
                    a.proc.wait(20)
                except subprocess.TimeoutExpired:
                    a.proc.kill()
        if self.admin is not None:
            self.admin.close()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(20)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        for a in self.agents.values():
            a.kill_vms()  # QEMU outlives its agent (and, in loopback mode, the network)
        self._mounts.close()  # the agents are gone: nothing holds the small filesystems
