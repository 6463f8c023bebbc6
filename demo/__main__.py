"""`make demo`: a broker and two sites on this machine, driven the way an operator would.

Everything runs as real processes on loopback with the embedded SQLite store, in a fresh folder
(``demo-home/`` beside the repository, or ``--dir``): the broker, one agent per site with the
portable ``directory`` backend, and each step is an operator command whose output is shown.

The story: register two hosts, pair their clouds, protect a running VM, keep writing into it,
fail it over to the recovery site with a planned failover (no data loss: the VM stops, the last
changes travel, every block is compared), replicate back, fail back, and prove at the end that
both sites hold exactly the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        # Large protobuf messages allocate fresh buffers; glibc's default mmap threshold makes
        # each one an mmap/munmap pair (see ../shared/PERFORMANCE.md).
        self.env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
        self.env.setdefault("MALLOC_TRIM_THRESHOLD_", "268435456")
        self.broker = base / "broker"

    def step(self, text: str) -> None:
        print(f"\n==> {text}", flush=True)

    def run(self, *argv: str, show: bool = True) -> str:
        shown = " ".join(shlex.quote(a) for a in argv)
        if show:
            print(f"$ {shown}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", *argv], env=self.env, capture_output=True, text=True, check=False
        )
        out = proc.stdout.rstrip()
        if out and show:
            print(out, flush=True)
        if proc.returncode != 0:
            print(proc.stderr.rstrip(), file=sys.stderr)
            raise SystemExit(f"demo: step failed: {shown}")
        return proc.stdout

    def broker_cli(self, *args: str, show: bool = True) -> str:
        return self.run("broker.cli", "--home", str(self.broker), *args, show=show)

    def spawn(self, name: str, *argv: str) -> None:
        log = (self.base / f"{name}.log").open("ab")
        print(f"$ {' '.join(argv)} &   (log: {self.base / (name + '.log')})", flush=True)
        self.procs.append(
            subprocess.Popen([sys.executable, "-m", *argv], env=self.env, stdout=log, stderr=log)
        )

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


class Guest(threading.Thread):
    """Stands in for the VM's guest: writes known data while the VM runs, stops when it is off."""

    def __init__(self, backend: object, vm: str) -> None:
        super().__init__(daemon=True)
        self.backend, self.vm = backend, vm
        self.writes = 0
        self.rng = random.Random(2026)

    def run(self) -> None:
        from sitepair.errors import FailedPrecondition

        with self.backend.open_writer(self.vm, running_only=True) as w:  # type: ignore[attr-defined]
            while True:
                disk = self.rng.choice(["os", "data"])
                size = 128 * MiB if disk == "os" else 32 * MiB
                n = self.rng.choice([4096, 65536])
                try:
                    w.write(disk, self.rng.randrange(0, size - n), self.rng.randbytes(n))
                except FailedPrecondition:
                    return  # the VM was shut down by the planned failover
                self.writes += 1
                time.sleep(0.002)


def disk_digest(path: Path) -> str:
    from sitepair import vdisk

    h = hashlib.sha256()
    with vdisk.open_disk(path, read_only=True) as d:
        pos = 0
        while pos < d.virtual_size:
            n = min(8 * MiB, d.virtual_size - pos)
            h.update(d.read(pos, n))
            pos += n
    return h.hexdigest()


def prove_identical(demo: Demo, running_host: Path, replica_host: Path, rel_folder: str) -> None:
    """Compare the running VM's disks with the replica's, block for block."""
    from agent.hosts.directory import DirectoryBackend

    vm = DirectoryBackend(running_host / "gold" / "vms").disk_chains("web01")
    state = json.loads((Path(rel_folder) / "state.json").read_text())
    for disk in ("os", "data"):
        top_vm = vm[disk][-1]
        chain = state["disks"][disk]["chain"][-1]
        top_replica = Path(chain) if Path(chain).is_absolute() else Path(rel_folder) / chain
        demo.run("sitepair.vdisk.cli", "compare", str(top_vm), str(top_replica))
        a, b = disk_digest(top_vm), disk_digest(top_replica)
        print(f"   {disk}: running VM sha256 {a[:16]}..., replica sha256 {b[:16]}...")
        if a != b:
            raise SystemExit("demo: the sites differ!")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ROOT / "demo-home"), help="working folder (wiped)")
    args = parser.parse_args()
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    d = Demo(base)
    sites = {"hv-primary": ("site-a", "corp-a"), "hv-recovery": ("site-b", "corp-b")}
    try:
        d.step("Create the broker: its CA, store, configuration and a local operator profile")
        d.run(
            "broker.cli",
            "init",
            "--home",
            str(d.broker),
            "--vault",
            "demo",
            "--enrollment",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        )
        d.spawn("broker", "broker.cli", "serve", "--home", str(d.broker))
        wait_for((d.broker / "run" / "broker.json").exists, "the broker to start")

        for host, (site, net) in sites.items():
            d.step(f"Register {host} at {site} with a single-use registration key")
            creds = base / f"{site}-credentials.json"
            d.broker_cli("keys", "create", "--site", site, "--out", str(creds))
            home = base / host
            d.run(
                "agent.cli",
                "register",
                "--credentials",
                str(creds),
                "--name",
                host,
                "--home",
                str(home),
                "--vm-root",
                "gold/vms",
                "--storage",
                f"gold={home / 'gold'}",
                "--network",
                f"{net}=10.0.0.0/24",
                "--certificate-port",
                "0",
                "--ticket-port",
                "0",
            )
            (home / "gold" / "vms").mkdir(parents=True, exist_ok=True)
            d.spawn(host, "agent.cli", "run", "--home", str(home))

        d.step("A VM on the primary host: 128 MiB VHDX + 32 MiB VHD, filled with data, running")
        from agent.hosts.directory import DirectoryBackend

        primary = DirectoryBackend(base / "hv-primary" / "gold" / "vms")
        primary.create_vm(
            "web01",
            disks=[("os", "vhdx", 128 * MiB), ("data", "vhd", 32 * MiB)],
            cpu=2,
            memory_mb=2048,
            nics=[("nic0", "corp-a")],
        )
        rng = random.Random(7)
        with primary.open_writer("web01") as w:
            for off in range(0, 96 * MiB, MiB):
                w.write("os", off, rng.randbytes(MiB // 2) + b"sitepair demo " * 37449 + bytes(2))
            w.write("data", 0, rng.randbytes(8 * MiB))
            w.flush()
        primary.set_vm_state("web01", "running")
        guest = Guest(primary, "web01")
        guest.start()
        print("VM web01 created and started; a guest keeps writing into it")

        def servers_ready() -> bool:
            out = d.broker_cli("servers", "list", "--json", show=False)
            return sum(1 for s in json.loads(out) if s["state"] == "connected") == 2

        wait_for(servers_ready, "both agents to connect")
        d.broker_cli("servers", "list")

        d.step("Clouds, a pair with its protection policy, network and storage mappings")
        d.broker_cli("clouds", "create", "cloud-a", "--site", "site-a")
        d.broker_cli("clouds", "create", "cloud-b", "--site", "site-b")
        d.broker_cli("clouds", "add-host", "cloud-a", "hv-primary")
        d.broker_cli("clouds", "add-host", "cloud-b", "hv-recovery")
        d.broker_cli(
            "clouds",
            "pair",
            "cloud-a",
            "cloud-b",
            "--copy-frequency",
            "30s",
            "--recovery-points",
            "2",
            "--wait",
        )
        d.broker_cli("networks", "map", "corp-a", "corp-b")
        d.broker_cli("storage", "map", "gold", "gold")
        wait_for(lambda: "web01" in d.broker_cli("vms", "list", show=False), "the VM in inventory")
        d.broker_cli("vms", "list")

        d.step("Enable protection: placement, replica VM, initial replication, finalize")
        d.broker_cli("protect", "web01", "--wait")
        d.broker_cli("vms", "show", "web01")

        d.step("Planned failover to the recovery site, then replicate back (--reverse)")
        print(f"(the guest has written {guest.writes} blocks so far)")
        d.broker_cli("vms", "failover", "web01", "--type", "planned", "--reverse", "--wait")
        guest.join(30)
        print(f"(the guest stopped after {guest.writes} writes, when its VM was shut down)")
        d.broker_cli("vms", "show", "web01")
        show = json.loads(d.broker_cli("--json", "vms", "show", "web01", show=False))
        print("Byte-exact check: the VM running at site B against the replica at site A")
        prove_identical(d, base / "hv-recovery", base / "hv-primary", show["replica_folder"])

        d.step("Write at the recovery site, then fail back (planned, --reverse)")
        recovery = DirectoryBackend(base / "hv-recovery" / "gold" / "vms")
        guest = Guest(recovery, "web01")
        guest.start()
        wait_for(lambda: guest.writes > 200, "the guest to write at site B")
        d.broker_cli("vms", "failover", "web01", "--type", "planned", "--reverse", "--wait")
        guest.join(30)
        show = json.loads(d.broker_cli("--json", "vms", "show", "web01", show=False))
        print("Byte-exact check: the VM running at site A against the replica at site B")
        prove_identical(d, base / "hv-primary", base / "hv-recovery", show["replica_folder"])
        d.broker_cli("vms", "show", "web01")
        d.broker_cli("jobs", "list", "--limit", "12")
        print(f"\ndemo finished: both sites hold the same bytes; logs are in {base}")
        return 0
    finally:
        d.stop_all()


if __name__ == "__main__":
    sys.exit(main())
