"""``sitepair-broker``: create and run a broker, and operate it through the admin API.

``init`` and ``serve`` work on a broker home. Every other command is an admin API call over
mutual TLS with an operator profile: ``--home DIR`` uses the local profile in ``DIR/admin``
(and the address the running broker actually bound), ``--profile DIR`` one made by
``operators add``. ``SITEPAIR_HOME`` / ``SITEPAIR_PROFILE`` set the defaults. ``--json`` prints
machine-readable output.

This module holds the broker's own commands (``init``, ``serve``, ``info``) and the parser; each
group of admin commands lives in its own module: ``cli_servers`` (keys, servers, operators),
``cli_jobs`` (jobs, and how a command that starts one shows it), ``cli_protection`` (clouds,
mappings, VMs) and ``cli_plans`` (recovery plans).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from broker import cli_backup, cli_jobs, cli_plans, cli_protection, cli_servers, service_unit
from broker import config as config_mod
from broker.cli_ca import register as register_ca_commands
from broker.cli_support import PROG, Command, Subcommands, admin_client, ts
from broker.home import BrokerHome
from sitepair import __version__, cliutil, log
from sitepair.cliutil import EXIT_OK, Parser, print_json
from sitepair.errors import InvalidArgument
from sitepair.service.cli import add_commands as add_service_commands
from sitepair.v1 import admin_pb2

# -- init / serve -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from broker.app import init_home

    if not args.home:
        raise InvalidArgument("init needs --home DIR")
    if args.store == "postgresql" and not args.dsn:
        raise InvalidArgument(
            "--store postgresql needs --dsn postgresql://USER@HOST/DATABASE",
            hint="the password comes from SITEPAIR_DB_PASSWORD or ~/.pgpass, never the DSN",
        )
    if args.store == "sqlite" and args.dsn:
        raise InvalidArgument("--dsn is for --store postgresql")
    store = config_mod.StoreConfig(backend=args.store, dsn=args.dsn or "")
    home = init_home(
        Path(args.home),
        vault=args.vault,
        enrollment=args.enrollment,
        control=args.control,
        server_names=tuple(args.server_name or ("localhost",)),
        store=store,
        advertise=tuple(args.advertise or ()),
    )
    cfg = config_mod.load(home.config)
    dialled = list(cfg.advertise.enrollment) or [cfg.listen.enrollment]
    if args.json:
        print_json(
            {
                "home": str(home.root),
                "vault": args.vault,
                "config": str(home.config),
                "store": store.backend,
                "enrollment_addresses": dialled,
                "control_addresses": list(cfg.advertise.control) or [cfg.listen.control],
            }
        )
    else:
        print(f"broker home created in {home.root} (vault {args.vault})")
        print(f"  configuration  {home.config}")
        print(f"  store          {store.backend}")
        print(f"  agents enroll  {', '.join(dialled)}")
        print(f"  CA             {home.ca_cert}")
        print(f"  local operator {home.admin_dir}")
        print(f"start it with:   {PROG} serve --home {home.root}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.app import Broker, BrokerContext
    from sitepair.service.runtime import ServiceRuntime, log_reloader

    if not args.home:
        raise InvalidArgument("serve needs --home DIR")
    home = BrokerHome(Path(args.home))
    cfg = config_mod.load(home.config)
    log.configure(cfg.log)
    broker = Broker(home.root, config=cfg)

    def ready(ctx: BrokerContext) -> str:
        return (
            f"serving vault {cfg.vault}: control {ctx.bound_control}, "
            f"enrollment {ctx.bound_enrollment}, store {ctx.store.description}"
        )

    async def main() -> None:
        service = ServiceRuntime(
            stop=broker.request_stop,
            reload=log_reloader(lambda: config_mod.load(home.config).log),
        )
        service.install_signal_handlers()
        try:
            await broker.run(on_ready=lambda ctx: service.ready(ready(ctx)))
        finally:
            await service.close()

    asyncio.run(main())
    return EXIT_OK


# -- info ---------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        info = c.call(c.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
    if args.json:
        print_json(info)
        return EXIT_OK
    print(f"vault               {info.vault}")
    print(f"version             {info.version}")
    print(f"started             {ts(info.started_at)}")
    print(f"enrollment          {', '.join(info.enrollment_addresses)}")
    print(f"control             {', '.join(info.control_addresses)}")
    print(f"store               {info.store}")
    print(
        "leader              "
        + ("this broker" if info.is_leader else (info.leader or "none live (an election is due)"))
    )
    print(f"connected servers   {info.connected_servers}")
    print(f"serving cert until  {ts(info.server_certificate_not_after)}")
    print(f"CA until            {ts(info.ca_not_after)}")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    def options(*, top: bool) -> argparse.ArgumentParser:
        # The global options are accepted before and after the command; the copies after it
        # default to SUPPRESS so they do not overwrite values given before it.
        def default(value: Any) -> Any:
            return value if top else argparse.SUPPRESS

        o = argparse.ArgumentParser(add_help=False)
        o.add_argument(
            "--home",
            default=default(os.environ.get("SITEPAIR_HOME")),
            help="broker home folder (default $SITEPAIR_HOME); admin commands use its local "
            "operator",
        )
        o.add_argument(
            "--profile",
            default=default(os.environ.get("SITEPAIR_PROFILE")),
            help="operator profile folder made by `operators add` (default $SITEPAIR_PROFILE)",
        )
        o.add_argument(
            "--json",
            action="store_true",
            default=default(False),
            help="machine-readable output (errors too, as JSON on standard error)",
        )
        o.add_argument(
            "--timeout",
            type=float,
            default=default(30.0),
            help="seconds to wait for each answer of the broker (default 30)",
        )
        return o

    common = options(top=False)
    p: argparse.ArgumentParser = Parser(
        prog=PROG, description=__doc__.splitlines()[0], parents=[options(top=True)]
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Subcommands, name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_text, parents=[common])
        sp.set_defaults(fn=fn)
        return sp

    sp = add(sub, "init", cmd_init, "create a broker home (CA, config, store, local operator)")
    sp.add_argument("--vault", required=True, help="vault name (a DNS label)")
    sp.add_argument(
        "--enrollment",
        default="127.0.0.1:8444",
        metavar="HOST:PORT",
        help="where agents enroll (default 127.0.0.1:8444: this machine only; 0.0.0.0:8444 "
        "for every interface, with --advertise)",
    )
    sp.add_argument(
        "--control",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="control stream and admin API (default 127.0.0.1:8443: this machine only)",
    )
    sp.add_argument(
        "--advertise",
        action="append",
        metavar="HOST",
        help="an IP address or DNS name agents on other machines dial; repeat for several. "
        "Written into credentials files with the enrollment and control ports, and added to "
        "the broker certificate (IPs as IP names, names as DNS names)",
    )
    sp.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="an extra DNS name for the broker certificate (not advertised)",
    )
    sp.add_argument(
        "--store",
        choices=config_mod.STORE_BACKENDS,
        default="sqlite",
        help="where the broker keeps its state: sqlite (in the home, default) or postgresql "
        "(several brokers may share it)",
    )
    sp.add_argument(
        "--dsn",
        help="PostgreSQL connection string without a password, e.g. postgresql://USER@HOST/DB "
        "(the password comes from SITEPAIR_DB_PASSWORD or ~/.pgpass)",
    )
    add(sub, "serve", cmd_serve, "run the broker until SIGTERM/SIGINT (SIGHUP reloads [log])")
    add(sub, "info", cmd_info, "show the broker's state")

    cli_servers.register(sub, add)
    cli_jobs.register(sub, add)
    cli_protection.register(sub, add)
    cli_plans.register(sub, add)
    cli_backup.register(sub, add)
    register_ca_commands(sub, add)
    add_service_commands(sub, service_unit.PROGRAM, parents=[common], home_option=False)
    cliutil.add_completion_command(sub, PROG)
    return p


def main(argv: list[str] | None = None) -> int:
    return cliutil.main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
