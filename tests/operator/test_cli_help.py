"""Every option and positional of every command of the three programs says what it is."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from agent import cli as agent_cli
from broker import cli as broker_cli
from sitepair.vdisk import cli as vdisk_cli

PARSERS = {
    "sitepair-broker": broker_cli.build_parser,
    "sitepair-agent": agent_cli.build_parser,
    "sitepair-vdisk": vdisk_cli.build_parser,
}


def commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from commands(sub)


def unexplained(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments and subcommands of one parser without help text."""
    missing = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing += [
                f"{parser.prog} {choice.dest}"
                for choice in action._choices_actions
                if not choice.help
            ]
        elif not action.help:
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_and_positional_has_help(prog: str) -> None:
    missing = [name for p in commands(PARSERS[prog]()) for name in unexplained(p)]
    assert not missing, "no help text:\n" + "\n".join(missing)


def test_the_walk_sees_every_command() -> None:
    """The walk reaches nested commands (else the test above would pass on nothing)."""
    progs = {p.prog for p in commands(broker_cli.build_parser())}
    assert "sitepair-broker vms failover" in progs
    assert "sitepair-broker service install" in progs
    assert len(progs) > 60
