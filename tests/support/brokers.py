"""Real brokers for tests: in a thread (inspectable, injectable clock) or as a process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from broker.app import Broker, BrokerContext, init_home
from broker.client import AdminClient, Profile
from broker.config import StoreConfig
from broker.home import BrokerHome
from sitepair.clock import SYSTEM_CLOCK, Clock
from sitepair.v1 import admin_pb2
from tests.support.loops import LoopThread


def make_home(
    root: Path,
    *,
    vault: str = "test",
    heartbeat: str = "1s",
    missed: int = 3,
    agent_lifetime: str = "24h",
    offline_critical: str = "4s",
    clock: Clock = SYSTEM_CLOCK,
    log_file: Path | None = None,
    store: StoreConfig | None = None,
) -> BrokerHome:
    """A broker home listening on free loopback ports, with test-friendly timings."""
    home = init_home(
        root,
        vault=vault,
        enrollment="127.0.0.1:0",
        control="127.0.0.1:0",
        clock=clock,
        store=store,
    )
    tune_timings(
        home,
        heartbeat=heartbeat,
        missed=missed,
        agent_lifetime=agent_lifetime,
        offline_critical=offline_critical,
        log_file=log_file,
    )
    return home


def tune_timings(
    home: BrokerHome,
    *,
    heartbeat: str = "1s",
    missed: int = 3,
    agent_lifetime: str = "24h",
    offline_critical: str = "4s",
    log_file: Path | None = None,
) -> None:
    """Test-friendly timings (and a log file) in the broker.toml ``init`` wrote."""
    text = home.config.read_text()
    text = re.sub(r'interval = "10s"', f'interval = "{heartbeat}"', text)
    text = re.sub(r"missed = 3", f"missed = {missed}", text)
    text = re.sub(r'agent_lifetime = "24h"', f'agent_lifetime = "{agent_lifetime}"', text)
    text = re.sub(
        r'offline_critical_after = "5m"', f'offline_critical_after = "{offline_critical}"', text
    )
    if log_file is not None:
        text = text.replace('file = ""', f'file = "{log_file}"')
    home.config.write_text(text)


class BrokerThread:
    """A broker running on its own event loop in a thread of the test process."""

    def __init__(self, home: BrokerHome, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.home = home
        self.clock = clock
        self.loop = LoopThread(f"broker-{home.root.name}")
        self.broker = Broker(home.root, clock=clock)
        self.ctx: BrokerContext = self.loop.call(self.broker.start())

    @property
    def control(self) -> str:
        return self.ctx.bound_control

    @property
    def enrollment(self) -> str:
        return self.ctx.bound_enrollment

    def admin(self) -> AdminClient:
        return AdminClient(Profile.load(self.home.admin_dir, run_file=self.home.run_file))

    def stop(self) -> None:
        try:
            self.loop.call(self.broker.shutdown(grace=1))
        finally:
            self.loop.stop()


def create_key(
    admin: AdminClient, out: Path, *, site: str = "site-a", uses: int = 1, valid_seconds: int = 0
) -> admin_pb2.CreateRegistrationKeyResponse:
    resp: admin_pb2.CreateRegistrationKeyResponse = admin.call(
        admin.stub.CreateRegistrationKey,
        admin_pb2.CreateRegistrationKeyRequest(site=site, uses=uses, valid_seconds=valid_seconds),
    )
    out.write_bytes(resp.credentials_file)
    out.chmod(0o600)
    return resp


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


class BrokerProcess:
    """``sitepair-broker serve`` in a child process (for restarts and SIGKILL)."""

    def __init__(self, home: BrokerHome, *, log_path: Path | None = None) -> None:
        self.home = home
        self.log_path = log_path or home.root / "broker.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        if self.home.run_file.exists():
            self.home.run_file.unlink()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--home", str(self.home.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=python_env(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {tail}")
            if self.home.run_file.exists():
                try:
                    doc = json.loads(self.home.run_file.read_text())
                    if doc.get("pid") == self.proc.pid:
                        return
                except (ValueError, OSError):
                    pass
            time.sleep(0.05)
        raise RuntimeError("broker did not start in time")

    def pin_ports(self) -> None:
        """Make the next start listen on the ports this run bound (agents keep the address)."""
        info = self.run_info()
        text = self.home.config.read_text()
        text = re.sub(
            r'(?m)^enrollment = "[^"]*"', f'enrollment = "{info["enrollment"]}"', text, count=1
        )
        text = re.sub(r'(?m)^control = "[^"]*"', f'control = "{info["control"]}"', text, count=1)
        self.home.config.write_text(text)

    def run_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.home.run_file.read_text())
        return info

    def admin(self) -> AdminClient:
        return AdminClient(Profile.load(self.home.admin_dir, run_file=self.home.run_file))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)
