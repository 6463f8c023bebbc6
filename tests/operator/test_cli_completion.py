"""Shell completion of the three programs: argcomplete's protocol, as the shell code that
``completion SHELL`` prints drives it (the program run with ``_ARGCOMPLETE`` and ``COMP_LINE``
set, its answer written to a file here instead of the shell's descriptor 8)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.brokers import python_env

MODULES = {
    "sitepair-broker": "broker.cli",
    "sitepair-agent": "agent.cli",
    "sitepair-vdisk": "sitepair.vdisk.cli",
}


def complete(prog: str, line: str, tmp_path: Path) -> set[str]:
    """What the shell offers after ``line`` (the cursor at its end)."""
    answer = tmp_path / "answer"
    env = python_env() | {
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "COMP_TYPE": "9",  # a Tab
    }
    r = subprocess.run(
        [sys.executable, "-m", MODULES[prog]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return {w.strip() for w in answer.read_text().split("\n") if w.strip()}


def test_commands_and_their_subcommands_complete(tmp_path: Path) -> None:
    assert {"vms", "jobs", "plans", "servers", "completion"} <= complete(
        "sitepair-broker", "sitepair-broker ", tmp_path
    )
    assert complete("sitepair-broker", "sitepair-broker vms fa", tmp_path) == {"failover"}
    assert {"planned", "unplanned", "test"} == complete(
        "sitepair-broker", "sitepair-broker vms failover web01 --type ", tmp_path
    )
    assert "--wait" in complete("sitepair-broker", "sitepair-broker vms resync web01 --", tmp_path)
    assert {"register", "run", "status", "service"} <= complete(
        "sitepair-agent", "sitepair-agent ", tmp_path
    )
    assert {"info", "create", "convert", "merge"} <= complete(
        "sitepair-vdisk", "sitepair-vdisk ", tmp_path
    )


@pytest.mark.parametrize("prog", sorted(MODULES))
def test_completion_prints_shell_code_bash_accepts(prog: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", MODULES[prog], "completion", "bash"],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "complete " in r.stdout and prog in r.stdout
    bash = shutil.which("bash")
    if bash is not None:
        script = tmp_path / "completion.bash"
        script.write_text(r.stdout)
        checked = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
