"""[log]: a bad level is a configuration error naming the levels; the file rotates by size."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as agent_config
from broker import cli as broker_cli
from broker import config as broker_config
from broker.app import init_home
from sitepair import log
from sitepair.errors import ConfigError
from tests.support.brokers import python_env


def test_broker_refuses_an_unknown_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = init_home(tmp_path / "broker", vault="v1")
    home.config.write_text(home.config.read_text().replace('level = "info"', 'level = "loud"'))
    assert broker_cli.main(["serve", "--home", str(home.root)]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert "[log] level must be one of debug, info, warning, error, critical, not 'loud'" in err


def test_agent_refuses_an_unknown_level(tmp_path: Path) -> None:
    text = agent_config.render().replace('level = "info"', 'level = "verbose"')
    with pytest.raises(ConfigError, match="level must be one of debug, info"):
        agent_config.parse(text, tmp_path)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_bytes = 100", "max_bytes must be 0 (never rotate) or at least 65536"),
        ("backups = 0", "backups must be at least 1"),
        ('max_bytes = "big"', "max_bytes must be an integer"),
    ],
)
def test_rotation_settings_are_checked(tmp_path: Path, setting: str, message: str) -> None:
    key = setting.split(maxsplit=1)[0]
    agent_text = "\n".join(
        setting if line.startswith(key + " ") else line
        for line in agent_config.render().splitlines()
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        agent_config.parse(agent_text, tmp_path)
    broker_text = "\n".join(
        setting if line.startswith(key + " ") else line
        for line in broker_config.render(
            "v1", enrollment="127.0.0.1:1", control="127.0.0.1:2", names=("localhost",)
        ).splitlines()
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        broker_config.parse(broker_text)


def test_the_log_file_rotates_at_max_bytes(tmp_path: Path) -> None:
    file = tmp_path / "logs" / "agent.log"
    log.setup(level="info", file=file, max_bytes=64 * 1024, backups=2)
    try:
        for i in range(3000):
            logging.getLogger("sitepair.test").info(
                "line", extra={"fields": {"i": i, "pad": "x" * 40}}
            )
    finally:
        log.setup(level="warning")
    assert file.exists()
    assert (tmp_path / "logs" / "agent.log.1").exists()
    assert (tmp_path / "logs" / "agent.log.2").exists()
    assert not (tmp_path / "logs" / "agent.log.3").exists()
    assert file.stat().st_size <= 64 * 1024


def test_grpc_core_is_quiet_unless_asked() -> None:
    env: dict[str, str] = {}
    log.quiet_grpc_core(env)
    assert env["GRPC_VERBOSITY"] == "NONE"
    env = {"GRPC_VERBOSITY": "debug"}
    log.quiet_grpc_core(env)
    assert env["GRPC_VERBOSITY"] == "debug"


@pytest.mark.parametrize("verbosity", [None, "ERROR"])
def test_grpc_core_lines_stay_off_stderr_unless_asked(
    tmp_path: Path, verbosity: str | None
) -> None:
    """An address gRPC cannot bind (TEST-NET-1, on no interface here): the broker says so in its
    own words; gRPC's C core adds its unformatted line only when GRPC_VERBOSITY asks for it."""
    home = init_home(tmp_path / "broker", vault="v1")
    text = home.config.read_text().replace(
        'enrollment = "127.0.0.1:8444"', 'enrollment = "192.0.2.1:8444"'
    )
    home.config.write_text(text)
    env = python_env()
    env.pop("GRPC_VERBOSITY", None)
    if verbosity:
        env["GRPC_VERBOSITY"] = verbosity
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--home", str(home.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot listen on 192.0.2.1:8444" in done.stderr
    core_line = "add_port.cc" in done.stderr
    assert core_line is (verbosity is not None), done.stderr
