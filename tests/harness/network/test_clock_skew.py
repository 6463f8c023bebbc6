"""Clock skew on one host: ``SITEPAIR_CLOCK_OFFSET`` shifts the agent's wall clock."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from sitepair.clock import (
    CLOCK_OFFSET_ENV,
    SYSTEM_CLOCK,
    ManualClock,
    OffsetClock,
    clock_from_env,
)
from sitepair.errors import ConfigError
from tests.support.agents import AgentProcess, register_agent
from tests.support.brokers import BrokerThread


def test_offset_clock_moves_wall_time_only() -> None:
    base = ManualClock(start=1_000_000.0)
    clock = OffsetClock(-90.5, base)
    assert clock.now() == 1_000_000.0 - 90.5
    assert clock.monotonic() == base.monotonic()
    base.advance(10)
    assert clock.now() == 1_000_010.0 - 90.5


def test_clock_from_env(caplog: pytest.LogCaptureFixture) -> None:
    assert clock_from_env({}) is SYSTEM_CLOCK
    assert clock_from_env({CLOCK_OFFSET_ENV: "  "}) is SYSTEM_CLOCK
    with caplog.at_level(logging.WARNING, logger="sitepair.clock"):
        clock = clock_from_env({CLOCK_OFFSET_ENV: "3600"})
    assert isinstance(clock, OffsetClock) and clock.offset == 3600
    assert abs(clock.now() - time.time() - 3600) < 60
    assert "skewed on purpose" in caplog.text
    assert isinstance(clock_from_env({CLOCK_OFFSET_ENV: "-2.5"}), OffsetClock)
    for bad in ("soon", "nan", "inf"):
        with pytest.raises(ConfigError, match=CLOCK_OFFSET_ENV):
            clock_from_env({CLOCK_OFFSET_ENV: bad})


def test_a_running_agent_reports_its_skewed_clock(
    broker: BrokerThread, credentials: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: ``sitepair-agent run`` with the variable set heartbeats in skewed time."""
    home = tmp_path / "agent"
    ident = register_agent(credentials, home, name="skewed")
    monkeypatch.setenv(CLOCK_OFFSET_ENV, "-7200")
    agent = AgentProcess(home)
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            with broker.ctx.store.read() as tx:
                server = tx.get_server(ident.host_id)
            if server is not None and server.last_heartbeat_sent_at is not None:
                break
            assert time.monotonic() < deadline, agent.log_path.read_text()
            time.sleep(0.1)
        assert server.last_heartbeat_at is not None
        skew = server.last_heartbeat_sent_at - server.last_heartbeat_at
        assert -7200 - 600 < skew < -7200 + 600  # the broker's clock vs the agent's
    finally:
        agent.stop()
    assert "skewed on purpose" in agent.log_path.read_text()
    assert os.environ[CLOCK_OFFSET_ENV] == "-7200"
