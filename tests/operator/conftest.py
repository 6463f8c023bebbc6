"""Fixtures of the operator tests: the two sites of :mod:`tests.protection.conftest` and the
``sitepair-broker`` command line run against them as an operator runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from broker.cli import main as cli_main
from tests.protection.conftest import Sites, sites  # noqa: F401 - a fixture, used by name
from tests.support.brokers import BrokerThread

Run = Callable[..., str]


def runner(home: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run one command with ``--home``; check its exit status (argparse's own refusals exit 2);
    return what it printed (its standard error when it fails)."""

    def run(*args: str, status: int = 0) -> str:
        try:
            got = cli_main(["--home", str(home), *args])
        except SystemExit as exc:
            got = int(exc.code or 0)
        out, err = capsys.readouterr()
        assert got == status, (args, out, err)
        return out if status == 0 else err

    return run


@pytest.fixture
def cli(sites: Sites, capsys: pytest.CaptureFixture[str]) -> Run:  # noqa: F811 - the fixture
    """The command line against the two sites' broker."""
    return runner(sites.broker.home.root, capsys)


@pytest.fixture
def broker_cli(broker: BrokerThread, capsys: pytest.CaptureFixture[str]) -> Run:
    """The command line against a broker with no hosts."""
    return runner(broker.home.root, capsys)
