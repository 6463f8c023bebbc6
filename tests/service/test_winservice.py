"""The agent's Windows service, as far as Linux allows: its logic behind the Win32 seam.

``FakeWin32`` below is a FAKE of the Windows Service Control Manager (the pywin32 calls in
``agent.winservice.PyWin32``): a boundary that cannot run on Linux. It records the calls and keeps
the services' states; it proves what the agent asks Windows for, not that Windows does it
(docs/windows-service.md has the checklist for a real host). The stop path is tested for real:
``ServiceHost`` runs a real agent against a real broker and stops it from another thread, as the
Service Control Manager's thread would.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.winservice import (
    HOME_OPTION,
    RECOVERY_ACTIONS,
    SERVICE_CLASS,
    RecoveryAction,
    ServiceHost,
    WindowsCommands,
)
from sitepair.errors import ConfigError, FailedPrecondition
from sitepair.homelock import HomeLock
from sitepair.service import cli as service_cli
from sitepair.service.cli import InstallOptions, ServiceProgram
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key


class FakeWin32:
    """FAKE of the Windows Service Control Manager (pywin32), which cannot run on Linux."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.services: dict[str, dict[str, Any]] = {}

    def install(
        self,
        name: str,
        *,
        class_string: str,
        display_name: str,
        description: str,
        account: str | None,
    ) -> None:
        self.calls.append(("install", name))
        self.services[name] = {
            "class": class_string,
            "display": display_name,
            "account": account,
            "options": {},
            "state": "stopped",
        }

    def set_option(self, name: str, option: str, value: str) -> None:
        self.calls.append(("set_option", name))
        self.services[name]["options"][option] = value

    def set_recovery(
        self,
        name: str,
        *,
        actions: tuple[RecoveryAction, ...],
        reset_seconds: int,
        on_error_exit: bool,
    ) -> None:
        self.calls.append(("set_recovery", name))
        self.services[name]["recovery"] = (actions, reset_seconds, on_error_exit)

    def remove(self, name: str) -> None:
        self.calls.append(("remove", name))
        del self.services[name]

    def start(self, name: str) -> None:
        self.calls.append(("start", name))
        self.services[name]["state"] = "running"

    def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        self.services[name]["state"] = "stopped"

    def state(self, name: str) -> str | None:
        svc = self.services.get(name)
        return None if svc is None else str(svc["state"])


def agent_home(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "agent.toml").write_text(agent_config.render())
    return root


def options(home: Path, *, enable: bool = True, user: str | None = None) -> InstallOptions:
    return InstallOptions(
        home=home, user=user, unit_dir=Path("unused"), enable=enable, name="sitepair-agent"
    )


def test_install_creates_the_service_with_recovery_and_starts_it(tmp_path: Path) -> None:
    win = FakeWin32()
    home = agent_home(tmp_path / "agent")
    out = WindowsCommands(win).command("install", options(home, user="NT SERVICE\\sitepair-agent"))
    svc = win.services["sitepair-agent"]
    assert svc["class"] == SERVICE_CLASS == "agent.winservice.AgentService"
    assert svc["account"] == "NT SERVICE\\sitepair-agent"
    assert svc["options"] == {HOME_OPTION: str(home)}
    actions, reset, on_error = svc["recovery"]
    assert [a.kind for a in actions] == ["restart"] * 3 and actions == RECOVERY_ACTIONS
    assert reset == 24 * 3600 and on_error is True
    # Recovery is configured before the service first runs.
    assert [c for c, _ in win.calls] == ["install", "set_option", "set_recovery", "start"]
    assert svc["state"] == "running" and "started" in out


def test_install_refuses_a_folder_that_is_no_home_and_a_second_service(tmp_path: Path) -> None:
    win = FakeWin32()
    with pytest.raises(ConfigError, match="no agent configuration"):
        WindowsCommands(win).command("install", options(tmp_path))
    assert win.calls == []
    home = agent_home(tmp_path / "agent")
    WindowsCommands(win).command("install", options(home, enable=False))
    assert win.services["sitepair-agent"]["state"] == "stopped"
    with pytest.raises(FailedPrecondition, match="already exists"):
        WindowsCommands(win).command("install", options(home))


def test_remove_stops_a_running_service_first_and_status_says_how_to_run(tmp_path: Path) -> None:
    win = FakeWin32()
    home = agent_home(tmp_path / "agent")
    commands = WindowsCommands(win)
    commands.command("install", options(home))
    assert commands.command("status", options(home)) == "sitepair-agent: running"
    commands.command("remove", options(home))
    assert win.calls[-2:] == [("stop", "sitepair-agent"), ("remove", "sitepair-agent")]
    assert f"sitepair-agent run --home {home}" in commands.command("status", options(home))


def test_the_service_commands_go_to_windows_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    win = FakeWin32()
    home = agent_home(tmp_path / "agent")
    program = ServiceProgram(
        prog="sitepair-agent",
        unit=lambda _: pytest.fail("no systemd unit on Windows"),
        windows=WindowsCommands(win),
    )
    monkeypatch.setattr(service_cli, "on_windows", lambda: True)
    args = argparse.Namespace(
        home=str(home), name="sitepair-agent", unit_dir="x", no_enable=False, user=None
    )
    assert service_cli.run(program, "install", args) == 0
    assert "installed and started the Windows service" in capsys.readouterr().out
    assert win.services["sitepair-agent"]["state"] == "running"


def test_stop_from_another_thread_shuts_the_real_agent_down(
    tmp_path: Path, broker: BrokerThread
) -> None:
    creds = tmp_path / "creds.json"
    create_key(broker.admin(), creds)
    home = tmp_path / "agent"
    register_agent(creds, home, name="hyperv-01")
    events: list[tuple[str, str]] = []
    host = ServiceHost(
        home, report=lambda kind, msg: events.append((kind, msg)), setup_logging=False
    )
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(host.run()))
    thread.start()
    deadline = time.monotonic() + 60
    while not any("running" in m for _, m in events):
        assert thread.is_alive(), events
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.05)
    host.request_stop()  # what AgentService.SvcStop does, from the service control thread
    thread.join(60)
    assert not thread.is_alive()
    assert result == [0]
    assert events[-1] == ("info", "sitepair agent stopped")
    # The daemon went through its own shutdown: the home is unlocked.
    HomeLock.acquire(home, what="agent home", holder="test").release()


def test_stop_before_the_agent_started_runs_nothing(tmp_path: Path) -> None:
    made: list[Path] = []
    host = ServiceHost(
        tmp_path,
        report=lambda *_: None,
        make_daemon=lambda h: made.append(h) or pytest.fail(),
        setup_logging=False,
    )
    host.request_stop()
    assert host.run() == 0
    assert made == []


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failing_agent_is_reported_and_exits_with_an_error(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    records = Records()  # stands for the Event Log handler AgentService adds
    host = ServiceHost(
        tmp_path,
        report=lambda k, m: events.append((k, m)),
        setup_logging=False,
        log_handler=records,
    )
    try:
        assert host.run() == 1  # no agent home here
    finally:
        logging.getLogger().removeHandler(records)
    assert events[-1][0] == "error" and "no agent configuration" in events[-1][1]
    assert [r.getMessage() for r in records.records] == ["agent service failed"]
