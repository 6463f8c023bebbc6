"""One process per home (issue 11, hole 8): a second broker or agent on a home refuses and
changes nothing; a lock left by a killed process never blocks the next start.

Everything here runs as real processes: ``sitepair-broker serve``, ``sitepair-agent run`` and
``sitepair-agent register`` through their command lines, and a small holder process for the lock
itself. Waits poll for a state with a generous deadline; nothing asserts on how long anything
took.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.client import AdminClient, wait_job
from sitepair import homelock
from sitepair.errors import FailedPrecondition
from sitepair.homelock import HomeLock
from sitepair.v1 import admin_pb2
from tests.support.agents import AgentProcess, register_agent
from tests.support.brokers import BrokerProcess, create_key, make_home, python_env

HINT = "stop the other process, or use another --home"

# A process that locks the home named by argv[1] and holds it until its stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from sitepair.homelock import HomeLock
lock = HomeLock.acquire(Path(sys.argv[1]), what="test home", holder="test holder")
print("locked", flush=True)
sys.stdin.read()
"""


def eventually(check: Callable[[], object], *, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_holder(home: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A command that must end by itself (the timeout only stops a hang from blocking pytest)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=90,
        check=False,
    )


def server(admin: AdminClient, name: str) -> admin_pb2.Server:
    s: admin_pb2.Server = admin.call(admin.stub.GetServer, admin_pb2.GetServerRequest(server=name))
    return s


def listed_servers(home: Path) -> dict[str, dict[str, object]]:
    """``servers list --json`` through the CLI: admin commands work while the broker runs."""
    out = run_cli("broker.cli", "--home", str(home), "--json", "servers", "list")
    assert out.returncode == 0, out.stderr
    return {s["name"]: s for s in json.loads(out.stdout)}


# -- the lock itself --------------------------------------------------------------------------


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(FailedPrecondition) as refused:
            HomeLock.acquire(tmp_path, what="agent home", holder="test")
        assert refused.value.message == (
            f"agent home {tmp_path} is in use by another process (pid {holder.pid}: test holder)"
        )
        assert refused.value.hint == HINT
        # The refused attempt did not disturb what the holder wrote.
        assert homelock.read_holder(tmp_path) == (holder.pid, "test holder")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    # The holder exited: the lock is free, and a clean exit leaves no stale PID behind.
    with HomeLock.acquire(tmp_path, what="agent home", holder="test") as lock:
        assert lock.held


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    # The file survives the crash, still naming the dead holder; the kernel's lock did not.
    assert homelock.read_holder(tmp_path) == (holder.pid, "test holder")
    lock = HomeLock.acquire(tmp_path, what="agent home", holder="after the crash")
    assert homelock.read_holder(tmp_path) == (os.getpid(), "after the crash")
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    assert homelock.read_holder(tmp_path) == (None, "")


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    first = HomeLock.acquire(tmp_path, what="broker home", holder="first")
    try:
        with pytest.raises(FailedPrecondition, match=f"pid {os.getpid()}: first"):
            HomeLock.acquire(tmp_path, what="broker home", holder="second")
    finally:
        first.close()
    HomeLock.acquire(tmp_path, what="broker home", holder="second").release()


def test_a_missing_home_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="does not exist"):
        HomeLock.acquire(tmp_path / "typo", what="agent home", holder="test")
    assert not (tmp_path / "typo").exists()


# -- the broker -------------------------------------------------------------------------------


@pytest.fixture
def broker_with_agent(tmp_path: Path) -> Iterator[tuple[BrokerProcess, AgentProcess]]:
    """A broker process serving its home, with one agent process connected to it."""
    broker = BrokerProcess(make_home(tmp_path / "broker"))
    broker.start()
    agent = AgentProcess(tmp_path / "a")
    try:
        with broker.admin() as admin:
            create_key(admin, tmp_path / "c.json", uses=2)
            register_agent(tmp_path / "c.json", agent.home, name="hv-1")
            agent.start()
            eventually(lambda: server(admin, "hv-1").state == "connected", what="agent connected")
        yield broker, agent
    finally:
        agent.stop()
        broker.stop()


@pytest.mark.parametrize("ports", ["port 0", "pinned"])
def test_a_second_broker_serve_is_refused_and_changes_nothing(
    broker_with_agent: tuple[BrokerProcess, AgentProcess], ports: str
) -> None:
    """With pinned ports the second broker used to disconnect every host before it failed to
    bind; with port 0 it became a second leader on the same SQLite file."""
    broker, agent = broker_with_agent
    home = broker.home
    if ports == "pinned":
        broker.pin_ports()  # the second serve asks for the ports the first one holds
    assert broker.proc is not None and agent.proc is not None
    run_file = home.run_file.read_bytes()
    before = listed_servers(home.root)["hv-1"]
    assert before["state"] == "connected"

    second = run_cli("broker.cli", "serve", "--home", str(home.root))

    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert second.stderr.splitlines() == [
        f"sitepair-broker: error: broker home {home.root} is in use by another process "
        f"(pid {broker.proc.pid}: sitepair-broker serve)",
        f"sitepair-broker: hint: {HINT}",
    ]
    # Nothing changed: the run file, the store's record of the host, both processes.
    assert home.run_file.read_bytes() == run_file
    after = listed_servers(home.root)["hv-1"]
    assert after["state"] == "connected"
    assert after["connected_since"] == before["connected_since"]
    assert broker.proc.poll() is None and agent.proc.poll() is None
    assert homelock.read_holder(home.root) == (broker.proc.pid, "sitepair-broker serve")
    with broker.admin() as admin:
        ping = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1"))
        assert wait_job(admin, ping.id).state == "succeeded"


def test_a_killed_broker_leaves_a_lock_file_that_does_not_block(tmp_path: Path) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    try:
        assert broker.proc is not None
        dead = broker.proc.pid
        broker.kill()
        assert homelock.read_holder(home.root) == (dead, "sitepair-broker serve")
        broker.start()  # waits for the run file of the new process
        assert homelock.read_holder(home.root) == (broker.proc.pid, "sitepair-broker serve")
        with broker.admin() as admin:
            admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
    finally:
        broker.stop()
    # A clean stop removes the run file and leaves the lock file empty.
    assert not home.run_file.exists()
    assert homelock.read_holder(home.root) == (None, "")


# -- the agent --------------------------------------------------------------------------------


def test_a_second_agent_run_is_refused_and_the_first_keeps_its_stream(
    broker_with_agent: tuple[BrokerProcess, AgentProcess],
) -> None:
    broker, agent = broker_with_agent
    assert agent.proc is not None
    with broker.admin() as admin:
        since = server(admin, "hv-1").connected_since

        second = run_cli("agent.cli", "run", "--home", str(agent.home))

        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert second.stderr.splitlines() == [
            f"sitepair-agent: error: agent home {agent.home} is in use by another process "
            f"(pid {agent.proc.pid}: sitepair-agent run)",
            f"sitepair-agent: hint: {HINT}",
        ]
        # The first agent's control stream is the one it had: never replaced, still working.
        assert agent.proc.poll() is None
        current = server(admin, "hv-1")
        assert current.state == "connected" and current.connected_since == since
        ping = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1"))
        assert wait_job(admin, ping.id).state == "succeeded"
        assert server(admin, "hv-1").connected_since == since


def test_register_on_a_running_agents_home_is_refused_before_the_key_is_used(
    broker_with_agent: tuple[BrokerProcess, AgentProcess], tmp_path: Path
) -> None:
    """The refusal of a registered home hints "remove identity/ to register again"; an operator
    who does that while the agent runs must not get a new identity under the running agent."""
    broker, agent = broker_with_agent
    assert agent.proc is not None
    shutil.rmtree(agent.home / "identity")
    with broker.admin() as admin:
        keys = admin.call(
            admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()
        ).keys
        assert [k.uses_remaining for k in keys] == [1]

        reg = run_cli(
            "agent.cli",
            "register",
            "--credentials",
            str(tmp_path / "c.json"),
            "--name",
            "hv-2",
            "--home",
            str(agent.home),
        )

        assert reg.returncode == 1
        assert "Traceback" not in reg.stderr
        assert (
            f"agent home {agent.home} is in use by another process "
            f"(pid {agent.proc.pid}: sitepair-agent run)" in reg.stderr
        )
        assert not (agent.home / "identity").exists()
        keys = admin.call(
            admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()
        ).keys
        assert [k.uses_remaining for k in keys] == [1]
        names = [
            s.name
            for s in admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
        ]
        assert names == ["hv-1"]


def test_a_killed_agent_leaves_a_lock_file_that_does_not_block(
    broker_with_agent: tuple[BrokerProcess, AgentProcess],
) -> None:
    broker, agent = broker_with_agent
    assert agent.proc is not None
    dead = agent.proc.pid
    agent.stop(signal.SIGKILL)
    assert homelock.read_holder(agent.home) == (dead, "sitepair-agent run")

    agent.start()
    restarted = agent.proc
    assert restarted is not None
    eventually(
        lambda: homelock.read_holder(agent.home) == (restarted.pid, "sitepair-agent run"),
        what="the new agent to lock its home",
    )
    with broker.admin() as admin:
        # Only a live control stream answers a ping: the restarted agent is serving.
        ping = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1"))
        assert wait_job(admin, ping.id).state == "succeeded"
    assert restarted.poll() is None
