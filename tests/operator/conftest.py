"""Fixtures of the operator tests: the two sites of :mod:`tests.protection.conftest` and the
``sitepair-broker`` command line run against them as an operator runs it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.cli import main as cli_main
from tests.protection.conftest import Sites, sites  # noqa: F401 - a fixture, used by name

Run = Callable[..., str]


@pytest.fixture
def cli(sites: Sites, capsys: pytest.CaptureFixture[str]) -> Run:  # noqa: F811 - the fixture
    """Run one command with ``--home``; check its exit status; return what it printed (its
    standard error when it fails)."""
    home = str(sites.broker.home.root)

    def run(*args: str, status: int = 0) -> str:
        got = cli_main(["--home", home, *args])
        out, err = capsys.readouterr()
        assert got == status, (args, out, err)
        return out if status == 0 else err

    return run
