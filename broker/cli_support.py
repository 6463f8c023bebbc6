"""What the ``sitepair-broker`` command groups share: the admin client the global options name,
how a group adds its commands to the parser, and how a time from the wire is shown."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from broker.client import AdminClient, Profile
from broker.home import BrokerHome
from sitepair.clock import iso
from sitepair.errors import ConfigError
from sitepair.protoconv import seconds

PROG = "sitepair-broker"

#: A command: it reads its parsed arguments and returns the exit status.
Command = Callable[[argparse.Namespace], int]
#: The commands of a group (what ``add_subparsers`` returns).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: Adds a command (name, function, help) to a group and returns its parser, which accepts the
#: global options after the command's name too.
AddCommand = Callable[[Subcommands, str, Command, str], argparse.ArgumentParser]


def admin_client(args: argparse.Namespace) -> AdminClient:
    """A client for the broker named by ``--profile`` or ``--home``."""
    if args.profile:
        profile = Profile.load(Path(args.profile))
    elif args.home:
        home = BrokerHome(Path(args.home))
        profile = Profile.load(home.admin_dir, run_file=home.run_file)
    else:
        raise ConfigError(
            "no broker given", hint="pass --home DIR (a broker home) or --profile DIR"
        )
    return AdminClient(profile, timeout=args.timeout)


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``; anything else is refused with
    the range named."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}")
        return value

    return parse


def ts(t: Timestamp) -> str:
    """A time from the wire in ISO 8601, or ``-`` when it is not set."""
    value = seconds(t)
    return iso(value) if value else "-"
