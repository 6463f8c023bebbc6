"""Helpers for the service tests: homes whose units can be written and run."""

from __future__ import annotations

import shlex
from pathlib import Path


def exec_start(unit: Path) -> list[str]:
    """The unit's ExecStart= command line, as systemd would split it."""
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart=").replace("$$", "$"))
    raise AssertionError(f"no ExecStart= in {unit}")


def setting(unit: Path, key: str) -> str:
    values = [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith(key + "=")
    ]
    assert len(values) == 1, (key, values)
    return values[0]
