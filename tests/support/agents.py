"""Real agents for tests: registered through the real enrollment port."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import config as config_mod
from agent.daemon import AgentDaemon
from agent.enroll import register
from agent.identity import AgentIdentity
from tests.support.brokers import python_env
from tests.support.loops import LoopThread


def register_agent(
    credentials: Path,
    home: Path,
    *,
    name: str,
    storage: dict[str, str] | None = None,
    networks: list[tuple[str, list[str]]] | None = None,
    cloud: str = "",
    vm_root: str = "vms",
    backend: str = "directory",
    accel: str = "tcg",
    qemu_networks: dict[str, str] | None = None,
) -> AgentIdentity:
    # Port 0: several agents share this machine; each reports the ports it bound. A qemu
    # host here runs TCG: KVM does not work on these machines (ENVIRONMENT.md).
    toml = config_mod.render(
        vm_root=vm_root,
        storage=storage,
        networks=networks,
        cloud=cloud,
        certificate_port=0,
        ticket_port=0,
        backend=backend,
        accel=accel,
        qemu_networks=qemu_networks,
    )
    ident = register(credentials, name=name, home=home, agent_toml=toml)
    (home / vm_root).mkdir(parents=True, exist_ok=True)
    return ident


class AgentThread:
    """An AgentDaemon on its own event loop in a thread of the test process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.loop = LoopThread(f"agent-{home.name}")
        self.daemon = self.loop.call(self._make())
        self.future = self.loop.submit(self.daemon.run())

    async def _make(self) -> AgentDaemon:
        return AgentDaemon(self.home)

    def wait_connected(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.daemon.control.connected.is_set():
            if self.future.done():
                self.future.result()  # raises the agent's failure
                raise RuntimeError("agent stopped")
            if time.monotonic() > deadline:
                raise TimeoutError("agent did not connect")
            time.sleep(0.02)

    def stop(self) -> None:
        try:
            if not self.future.done():
                self.loop.call(self.daemon.shutdown())
                self.future.result(20)
        finally:
            self.loop.stop()


class AgentProcess:
    """``sitepair-agent run`` in a child process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "agent.out"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--home", str(self.home)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=python_env(),
        )
        log.close()

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
