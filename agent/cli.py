"""``sitepair-agent``: register this host with a broker, run the agent, show its state."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent import config as config_mod
from agent import service_unit
from sitepair import __version__, addresses, cliutil, log
from sitepair.cliutil import EXIT_OK, Parser, print_json
from sitepair.clock import clock_from_env, iso
from sitepair.errors import InvalidArgument
from sitepair.service.cli import add_commands as add_service_commands

PROG = "sitepair-agent"


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1-65535, or 0 for any")
    return value


#: The register options that go into agent.toml, with their defaults.
CONFIG_OPTIONS = {
    "backend": "directory",
    "accel": "auto",
    "vm_root": "vms",
    "cloud": None,
    "storage": None,
    "network": None,
    "certificate_port": 8084,
    "ticket_port": 8083,
    "listen": "127.0.0.1",
    "advertise": None,
    "advertise_certificate_port": 0,
    "advertise_ticket_port": 0,
}


def replication_hosts(listen: str, advertise: str | None) -> tuple[str, str]:
    """``--listen`` and ``--advertise``, checked before anything is written: addresses, and an
    advertised address for a receiver listening on every interface."""
    listen = addresses.check_host(listen, "--listen")
    advertised = addresses.check_host(advertise, "--advertise") if advertise else ""
    if advertised and addresses.is_wildcard(advertised):
        raise InvalidArgument(
            f"--advertise {advertised} is not an address other hosts can dial",
            hint="advertise this host's IP address or DNS name",
        )
    if addresses.is_wildcard(listen) and not advertised:
        raise InvalidArgument(
            f"--listen {listen} (every interface) needs --advertise HOST: the IP address or DNS "
            "name other hosts dial to reach this one"
        )
    return listen, advertised


def cmd_register(args: argparse.Namespace) -> int:
    from agent.enroll import register

    listen_host, advertise_host = replication_hosts(args.listen, args.advertise)

    storage = {}
    for item in args.storage or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidArgument(f"--storage must be NAME=FOLDER, got {item!r}")
        storage[name] = path
    networks = []
    qemu_networks = {}
    for item in args.network or []:
        name, _, rest = item.partition("=")
        if not name:
            raise InvalidArgument(f"--network must be NAME[=CIDR,CIDR][@ATTACH], got {item!r}")
        subnets, _, attach = rest.partition("@")
        networks.append((name, [s for s in subnets.split(",") if s]))
        if attach:
            qemu_networks[name] = attach
    toml = config_mod.render(
        vm_root=args.vm_root,
        cloud=args.cloud or "",
        storage=storage,
        networks=networks,
        certificate_port=args.certificate_port,
        ticket_port=args.ticket_port,
        listen_host=listen_host,
        advertise_host=advertise_host,
        advertise_certificate_port=args.advertise_certificate_port,
        advertise_ticket_port=args.advertise_ticket_port,
        backend=args.backend,
        accel=args.accel,
        qemu_networks=qemu_networks,
    )
    given = any(getattr(args, k) != v for k, v in CONFIG_OPTIONS.items())
    home = Path(args.home)
    ident = register(
        Path(args.credentials), name=args.name, home=home, agent_toml=toml, options_given=given
    )
    if args.json:
        print_json({"host_id": ident.host_id, "site": ident.site, "vault": ident.vault})
    else:
        print(
            f"registered {ident.name} as {ident.host_id} (site {ident.site}, vault {ident.vault})"
        )
        print(f"  certificate valid until {iso(ident.not_after)}; identity in {home / 'identity'}")
        print(f"  run it with: {PROG} run --home {home}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import AgentDaemon
    from sitepair.service.runtime import ServiceRuntime, log_reloader

    home = Path(args.home)
    cfg = config_mod.load(home)
    log.configure(cfg.log)
    daemon = AgentDaemon(home, clock=clock_from_env())

    def status() -> str:
        ports = daemon.replication.ports
        brokers = ", ".join(daemon.identity.get().control_addresses)
        connected = "connected to" if daemon.control.connected.is_set() else "connecting to"
        return (
            f"replication ports: certificate {ports.get('certificate', 0)}, "
            f"ticket {ports.get('ticket', 0)}; {connected} the broker {brokers}"
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []

        def stop() -> None:
            stopping.append(loop.create_task(daemon.shutdown()))

        service = ServiceRuntime(stop=stop, reload=log_reloader(lambda: config_mod.load(home).log))
        service.install_signal_handlers()
        try:
            await daemon.run(on_ready=lambda: service.ready(status(), refresh=status))
        finally:
            await service.close()

    asyncio.run(main())
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.identity import AgentIdentity

    home = Path(args.home)
    ident = AgentIdentity.load(home)
    cfg = config_mod.load(home)
    doc = {
        "host_id": ident.host_id,
        "name": ident.name,
        "site": ident.site,
        "vault": ident.vault,
        "broker": list(ident.control_addresses),
        "certificate_not_after": iso(ident.not_after),
        "renew_at": iso(ident.renew_at()),
        "backend": cfg.backend.kind,
        "vm_root": str(cfg.backend.vm_root),
        "listen": cfg.replication.listen_host,
        "certificate_port": cfg.replication.certificate_port,
        "ticket_port": cfg.replication.ticket_port,
        "advertise": cfg.replication.advertise_host,
        "advertise_certificate_port": cfg.replication.advertise_certificate_port,
        "advertise_ticket_port": cfg.replication.advertise_ticket_port,
    }
    if args.json:
        print_json(doc)
    else:
        for k, v in doc.items():
            print(f"{k:<26} {v if v != '' else '-'}")
    return EXIT_OK


HOME_HELP = "the agent home folder `register` made"
JSON_HELP = "machine-readable output (errors too, as JSON on standard error)"


def build_parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("register", help="enroll this host with a broker")
    sp.add_argument("--credentials", required=True, help="file from `sitepair-broker keys create`")
    sp.add_argument("--name", required=True, help="server name shown in the broker")
    sp.add_argument("--home", required=True, help="agent home folder to create")
    sp.add_argument(
        "--backend",
        default="directory",
        choices=config_mod.BACKENDS,
        help="host backend: directory (portable), hyperv (Windows), qemu (Linux)",
    )
    sp.add_argument(
        "--accel",
        default="auto",
        choices=config_mod.ACCELS,
        help="qemu backend: accelerator (default auto: KVM where it works)",
    )
    sp.add_argument(
        "--vm-root",
        default="vms",
        help="directory and qemu backends: the folder of VM folders, relative to the home "
        "(default vms)",
    )
    sp.add_argument("--cloud", help="cloud this host joins (default: none yet)")
    sp.add_argument(
        "--storage",
        action="append",
        help="storage classification NAME=FOLDER where replicas may go (repeat for several)",
    )
    sp.add_argument(
        "--network",
        action="append",
        help="VM network NAME[=CIDR,CIDR][@ATTACH]; qemu: ATTACH is bridge:BR, tap:IF, user "
        "or isolated",
    )
    sp.add_argument(
        "--certificate-port",
        type=port,
        default=8084,
        help="mutual-TLS replication port (default 8084; 0: any free one)",
    )
    sp.add_argument(
        "--ticket-port",
        type=port,
        default=8083,
        help="ticket replication port (default 8083; 0: any free one)",
    )
    sp.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the replica receiver listens on (default 127.0.0.1: replicas from this "
        "machine only; an address of this host, or 0.0.0.0 with --advertise, for other hosts)",
    )
    sp.add_argument(
        "--advertise",
        metavar="HOST",
        help="IP address or DNS name other hosts dial to send replicas here (default: the "
        "--listen address)",
    )
    sp.add_argument(
        "--advertise-certificate-port",
        type=port,
        default=0,
        metavar="PORT",
        help="certificate port other hosts dial, when a NAT or proxy maps it (default: "
        "--certificate-port)",
    )
    sp.add_argument(
        "--advertise-ticket-port",
        type=port,
        default=0,
        metavar="PORT",
        help="ticket port other hosts dial, when a NAT or proxy maps it (default: --ticket-port)",
    )
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_register)

    sp = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT (SIGHUP reloads [log])")
    sp.add_argument("--home", required=True, help=HOME_HELP)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("status", help="show this agent's identity and configuration")
    sp.add_argument("--home", required=True, help=HOME_HELP)
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_status)

    add_service_commands(sub, service_unit.program(), parents=[], home_option=True)
    cliutil.add_completion_command(sub, PROG)
    return p


def main(argv: list[str] | None = None) -> int:
    return cliutil.main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
