"""The real broker and agent, run with their unit's exact ExecStart=, talk to a real notify
socket: READY=1 once they serve, WATCHDOG=1 again and again, STOPPING=1 on SIGTERM, and a
SIGHUP that reloads [log]."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli as agent_cli
from broker import cli as broker_cli
from broker.home import BrokerHome
from tests.service.conftest import exec_start
from tests.service.notifysock import NotifySocket
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key, make_home, python_env

#: Ask for a ping every 0.25 s (half of WATCHDOG_USEC): several arrive within any test.
WATCHDOG_USEC = "500000"


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def start(argv: list[str], notify: NotifySocket, out: Path) -> subprocess.Popen[bytes]:
    env = python_env()
    env.update(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC=WATCHDOG_USEC)
    env.pop("WATCHDOG_PID", None)
    with out.open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)


def see_lifecycle(
    proc: subprocess.Popen[bytes], notify: NotifySocket, *, status: str = ""
) -> dict[str, str]:
    """READY=1, then (a STATUS= with ``status``,) WATCHDOG=1 three times, STOPPING=1."""
    ready = notify.wait_for(lambda m: m.get("READY") == "1")
    assert ready["MAINPID"] == str(proc.pid)
    if status:
        notify.wait_for(lambda m: status in m.get("STATUS", ""))
    for _ in range(3):
        notify.wait_for(lambda m: m.get("WATCHDOG") == "1")
    proc.send_signal(signal.SIGTERM)
    notify.wait_for(lambda m: m.get("STOPPING") == "1")
    assert proc.wait(30) == 0
    return ready


def broker_unit(home: BrokerHome, tmp_path: Path) -> list[str]:
    args = ["service", "install", "--home", str(home.root), "--unit-dir", str(tmp_path / "u")]
    assert broker_cli.main([*args, "--no-enable"]) == 0
    return exec_start(tmp_path / "u" / "sitepair-broker.service")


def test_broker_under_its_unit_command_line(tmp_path: Path, notify: NotifySocket) -> None:
    home = make_home(tmp_path / "broker")
    proc = start(broker_unit(home, tmp_path), notify, tmp_path / "broker.out")
    try:
        ready = see_lifecycle(proc, notify)
    finally:
        stop(proc)
    # Ready means serving: the status names the ports it bound, not the configured port 0.
    assert "control 127.0.0.1:" in ready["STATUS"]
    assert "127.0.0.1:0" not in ready["STATUS"]


def test_agent_under_its_unit_command_line(
    tmp_path: Path, broker: BrokerThread, notify: NotifySocket
) -> None:
    creds = tmp_path / "creds.json"
    create_key(broker.admin(), creds)
    home = tmp_path / "agent"
    register_agent(creds, home, name="web-host")
    args = ["service", "install", "--home", str(home), "--unit-dir", str(tmp_path / "u")]
    assert agent_cli.main([*args, "--no-enable"]) == 0
    argv = exec_start(tmp_path / "u" / "sitepair-agent.service")
    proc = start(argv, notify, tmp_path / "agent.out")
    try:
        # The status follows the broker connection: systemctl status shows it connected.
        ready = see_lifecycle(proc, notify, status="connected to the broker")
    finally:
        stop(proc)
    assert "replication ports: certificate" in ready["STATUS"]
    assert "connecting to the broker" in ready["STATUS"]
    assert "certificate 0," not in ready["STATUS"]


def log_lines(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_sighup_reloads_the_log_level(tmp_path: Path, notify: NotifySocket) -> None:
    log_file = tmp_path / "broker.log"
    home = make_home(tmp_path / "broker", log_file=log_file)
    config = home.config.read_text()
    home.config.write_text(config.replace('level = "info"', 'level = "error"'))
    proc = start(broker_unit(home, tmp_path), notify, tmp_path / "broker.out")
    try:
        notify.wait_for(lambda m: m.get("READY") == "1")
        # At level error the broker says nothing of its start.
        assert not [x for x in log_lines(log_file) if x["level"] == "info"]

        home.config.write_text(config.replace('level = "info"', 'level = "loud"'))
        os.kill(proc.pid, signal.SIGHUP)
        notify.wait_for(lambda m: m.get("RELOADING") == "1")
        refused = notify.wait_for(lambda m: m.get("READY") == "1")
        assert "reload refused" in refused["STATUS"]
        assert "debug, info, warning, error, critical" in refused["STATUS"]
        assert proc.poll() is None  # a bad file keeps the running configuration

        home.config.write_text(config)  # level = "info"
        os.kill(proc.pid, signal.SIGHUP)
        reloaded = notify.wait_for(lambda m: m.get("READY") == "1")
        assert "log level info" in reloaded["STATUS"]
        events = [x for x in log_lines(log_file) if x["event"] == "configuration reloaded"]
        assert events and events[0]["level"] == "info" and events[0]["log_level"] == "info"
    finally:
        assert stop(proc) == 0
