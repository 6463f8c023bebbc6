"""A real deployment for the browser tests: a broker serving the dashboard, two real agents.

One broker (a thread of the test process, ``[dashboard] enabled`` on a free port, the test
timings of :func:`tests.support.brokers.make_home`: heartbeats every second, a host offline for
4 s is Critical) and two agents with the directory backend, ``hv-a1`` in site-a and ``hv-b1``
in site-b, paired cloud-a -> cloud-b. One deployment serves all the tests of a module.

Replication in the pair is throttled (:data:`BANDWIDTH`) and the VMs are filled with random
bytes, so a VM stays in initial replication for a few seconds: long enough for a browser to see
it there, and its job's steps to change while a page watches.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.client import AdminClient
from broker.operators import LOCAL_OPERATOR
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Host, Sites, eventually, inventory_has
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key, make_home, python_env
from tests.support.dashboard import enable_dashboard
from tests.web.browser.chromium import Chromium

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

MiB = 1 << 20
#: The pair's bandwidth limit: a VM of :data:`VM_BYTES` random bytes takes about 5 s to copy.
BANDWIDTH = 1 * MiB
VM_BYTES = 6 * MiB
VAULT = "bluevault"
OPERATOR = LOCAL_OPERATOR  # the broker home's own operator profile signs in


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = make_home(root / "broker", vault=VAULT, log_file=root / "broker.log")
        enable_dashboard(self.home)
        self.broker = BrokerThread(self.home)
        self.admin: AdminClient = self.broker.admin()
        self.hosts: dict[str, Host] = {}
        try:
            for name, site, net in (("hv-a1", "site-a", "corp-a"), ("hv-b1", "site-b", "corp-b")):
                creds = root / f"{name}.json"
                create_key(self.admin, creds, site=site)
                home = root / name
                (home / "gold").mkdir(parents=True)
                ident = register_agent(
                    creds,
                    home,
                    name=name,
                    storage={"gold": str(home / "gold")},
                    networks=[(net, ["10.0.0.0/24"])],
                    vm_root="gold/vms",
                )
                self.hosts[name] = Host(name, site, home, ident.host_id, None)
                self.hosts[name].start()
            self.sites = Sites(self.broker, self.admin, self.hosts)
            self._pair()
            self.origin = f"https://{self.broker.ctx.bound_dashboard}"
            self.chromium = Chromium(self.home.admin_dir / "ca.crt", root)
        except BaseException:
            self._stop_servers()
            raise

    def _pair(self) -> None:
        a = self.admin
        for cloud, site, host in (("cloud-a", "site-a", "hv-a1"), ("cloud-b", "site-b", "hv-b1")):
            a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name=cloud, site=site))
            a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud=cloud, server=host))
        policy = admin_pb2.Policy(
            copy_frequency_seconds=300,
            compression=False,  # random bytes: nothing to gain, and the copy time is predictable
            authentication="certificate",
            bandwidth_limit=BANDWIDTH,
        )
        self.sites.job(
            a.call(
                a.stub.PairClouds,
                admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
            )
        )
        a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
        a.call(a.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))

    # -- VMs ------------------------------------------------------------------------------------

    def make_vm(self, name: str) -> None:
        """A VM on hv-a1 whose disk is :data:`VM_BYTES` of random bytes, in the inventory."""
        backend = self.hosts["hv-a1"].backend
        backend.create_vm(
            name,
            disks=[("os", "vhdx", VM_BYTES)],
            cpu=2,
            memory_mb=1024,
            nics=[("nic0", "corp-a")],
        )
        rng = random.Random(name)
        with backend.open_writer(name) as w:
            for offset in range(0, VM_BYTES, MiB):
                w.write("os", offset, rng.randbytes(MiB))
            w.flush()
        eventually(lambda: inventory_has(self.admin, name), what=f"{name} in the inventory")

    def start_protecting(self, name: str) -> admin_pb2.Job:
        """Make ``name`` and start protecting it; returns its enable-protection job, running."""
        self.make_vm(name)
        job: admin_pb2.Job = self.admin.call(
            self.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=name)
        )
        return job

    def protected(self, name: str) -> admin_pb2.ProtectedVm:
        """``name`` protected with a recovery point (made and protected first if need be)."""
        known = self.admin.call(self.admin.stub.ListProtected, admin_pb2.ListProtectedRequest())
        if not any(v.vm_name == name for v in known.vms):
            self.sites.job(self.start_protecting(name))
        return eventually(  # type: ignore[return-value]
            lambda: (
                (p := self.sites.protected(name)).state == "protected"
                and p.HasField("rpo_seconds")
                and p
            ),
            what=f"{name} protected with a point",
        )

    def plan(self, name: str, vm: str) -> None:
        """Recovery plan ``name`` with ``vm`` in group 1 (made once)."""
        a = self.admin
        plans = a.call(a.stub.ListPlans, admin_pb2.ListPlansRequest())
        if any(p.name == name for p in plans.plans):
            return
        a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name=name, description="ERP"))
        a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan=name, group=1, vm=vm))

    # -- signing in -------------------------------------------------------------------------------

    def login_url(self) -> str:
        """The link ``sitepair-broker operators login --browser --json`` prints (the real CLI)."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "--home",
                str(self.home.root),
                "operators",
                "login",
                "--browser",
                "--json",
            ],
            capture_output=True,
            text=True,
            env={**python_env(), "DISPLAY": ""},
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        url: str = json.loads(out.stdout)["url"]
        return url

    def operator_context(self, **options: Any) -> BrowserContext:
        """A browser with the local operator's certificate (``admin/admin.crt``) imported."""
        admin = self.home.admin_dir
        return self.chromium.operator(
            self.origin, admin / "admin.crt", admin / "admin.key", **options
        )

    # -- life cycle -----------------------------------------------------------------------------

    def _stop_servers(self) -> None:
        for h in self.hosts.values():
            h.stop()
        self.admin.close()
        self.broker.stop()

    def close(self) -> None:
        try:
            self.chromium.close()
        finally:
            self._stop_servers()


def screenshot_dir(default: Path) -> Path:
    """Where the tests save their screenshots: ``$SITEPAIR_DASHBOARD_SCREENSHOTS`` (e.g.
    ``docs/dashboard`` to refresh the committed ones), else the test's temporary folder."""
    chosen = os.environ.get("SITEPAIR_DASHBOARD_SCREENSHOTS")
    path = Path(chosen) if chosen else default
    path.mkdir(parents=True, exist_ok=True)
    return path
