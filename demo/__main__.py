"""`make demo`: a broker and two sites on this machine, driven the way an operator would.

Everything runs as real processes on loopback with the embedded SQLite store, in a fresh folder
(``demo-home/`` beside the repository, or ``--dir``): the broker, one agent per site with the
portable ``directory`` backend, and each step is an operator command whose output is shown.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")

    def step(self, text: str) -> None:
        print(f"\n==> {text}", flush=True)

    def run(self, *argv: str) -> str:
        shown = " ".join(shlex.quote(a) for a in argv)
        print(f"$ {shown}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", *argv], env=self.env, capture_output=True, text=True, check=False
        )
        out = proc.stdout.rstrip()
        if out:
            print(out, flush=True)
        if proc.returncode != 0:
            print(proc.stderr.rstrip(), file=sys.stderr)
            raise SystemExit(f"demo: step failed: {shown}")
        return proc.stdout

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


def wait_for(check, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ROOT / "demo-home"), help="working folder (wiped)")
    args = parser.parse_args()
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    d = Demo(base)
    broker = base / "broker"
    try:
        d.step("Create the broker: its CA, store, configuration and a local operator profile")
        d.run(
            "broker.cli",
            "init",
            "--home",
            str(broker),
            "--vault",
            "demo",
            "--enrollment",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        )
        d.spawn("broker", "broker.cli", "serve", "--home", str(broker))
        wait_for((broker / "run" / "broker.json").exists, "the broker to start")
        d.run("broker.cli", "--home", str(broker), "info")

        for site, host in (("primary", "hv-primary"), ("recovery", "hv-recovery")):
            d.step(f"Register {host} at site {site} with a single-use registration key")
            creds = base / f"{site}-credentials.json"
            d.run(
                "broker.cli",
                "--home",
                str(broker),
                "keys",
                "create",
                "--site",
                site,
                "--out",
                str(creds),
            )
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
                "--storage",
                f"gold={home / 'gold'}",
                "--network",
                "corp=10.0.0.0/24",
                "--certificate-port",
                "0",
                "--ticket-port",
                "0",
            )
            (home / "vms").mkdir(exist_ok=True)
            (home / "gold").mkdir(exist_ok=True)
            d.spawn(host, "agent.cli", "run", "--home", str(home))

        d.step("Create a VM with a 256 MiB VHDX disk on the primary host (directory backend)")
        from agent.hosts.directory import DirectoryBackend

        vm = DirectoryBackend(base / "hv-primary" / "vms").create_vm(
            "web01",
            disks=[("os", "vhdx", 256 << 20)],
            cpu=2,
            memory_mb=2048,
            nics=[("nic0", "corp")],
        )
        print(f"VM {vm.name} ({vm.id}) with disk os.vhdx")

        d.step("Both servers are connected and the VM is in the broker's inventory")

        def inventory_ready() -> bool:
            out = subprocess.run(
                [sys.executable, "-m", "broker.cli", "--home", str(broker), "servers", "list"],
                env=d.env,
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            return out.count("connected") >= 2 and " 1  " in out

        wait_for(inventory_ready, "both agents to connect and report inventory")
        d.run("broker.cli", "--home", str(broker), "servers", "list")
        d.run("broker.cli", "--home", str(broker), "servers", "show", "hv-primary")

        d.step("A command travels down the control stream and is acknowledged once")
        d.run(
            "broker.cli",
            "--home",
            str(broker),
            "servers",
            "ping",
            "hv-recovery",
            "--note",
            "hello from the demo",
            "--wait",
        )
        d.run("broker.cli", "--home", str(broker), "jobs", "list")
        print("\ndemo finished: broker and two sites ran on this machine; logs are in", base)
        return 0
    finally:
        d.stop_all()


if __name__ == "__main__":
    sys.exit(main())
