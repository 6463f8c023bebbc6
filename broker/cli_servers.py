"""``sitepair-broker keys|servers|operators ...``: who may join and operate the vault.

Registration keys let hosts register; servers are the registered hosts; operators are the people
(certificates) allowed to use the admin API.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from broker.cli_jobs import add_wait, job_command, show_job_result
from broker.cli_support import PROG, AddCommand, Subcommands, admin_client, int_range, ts
from broker.services.admin import MAX_KEY_USES
from sitepair import addresses, pki
from sitepair.cliutil import EXIT_ERROR, EXIT_OK, confirm, print_json, print_table, proto_to_dict
from sitepair.clock import iso
from sitepair.durations import format_size, parse_duration
from sitepair.errors import InvalidArgument
from sitepair.fsutil import atomic_write
from sitepair.v1 import admin_pb2

# -- registration keys --------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    valid = parse_duration(args.valid, what="--valid") if args.valid else 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InvalidArgument(f"{out} exists", hint="choose another --out, or pass --force")
    with admin_client(args) as c:
        resp = c.call(
            c.stub.CreateRegistrationKey,
            admin_pb2.CreateRegistrationKeyRequest(
                site=args.site, valid_seconds=int(valid), uses=args.uses
            ),
        )
    atomic_write(out, resp.credentials_file, private=True)
    if args.json:
        doc = proto_to_dict(resp.key)
        doc["credentials_file"] = str(out)
        print_json(doc)
    else:
        k = resp.key
        print(f"registration key {k.id} for site {k.site}")
        print(f"  uses {k.uses_total}, expires {ts(k.expires_at)}")
        print(f"  credentials written to {out} (mode 0600; treat it like a password)")
        print(f"  on the host: sitepair-agent register --credentials {out} --name NAME --home DIR")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        keys = c.list_all(
            c.stub.ListRegistrationKeys,
            admin_pb2.ListRegistrationKeysRequest(include_inactive=args.all),
            lambda page: page.keys,
        )
    if args.json:
        print_json(keys)
        return EXIT_OK
    print_table(
        ["ID", "SITE", "STATE", "USES LEFT", "EXPIRES", "CREATED BY"],
        [
            [
                k.id,
                k.site,
                k.state,
                f"{k.uses_remaining}/{k.uses_total}",
                ts(k.expires_at),
                k.created_by,
            ]
            for k in keys
        ],
    )
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        key = c.call(
            c.stub.RevokeRegistrationKey, admin_pb2.RevokeRegistrationKeyRequest(id=args.id)
        )
    if args.json:
        print_json(key)
    else:
        print(f"registration key {key.id} revoked")
    return EXIT_OK


# -- servers ------------------------------------------------------------------------------------


def cmd_servers_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        servers = c.list_all(
            c.stub.ListServers,
            admin_pb2.ListServersRequest(site=args.site or "", include_removed=args.all),
            lambda page: page.servers,
        )
    if args.json:
        print_json(servers)
        return EXIT_OK
    print_table(
        ["NAME", "SITE", "STATE", "VMS", "LAST HEARTBEAT", "CERT UNTIL", "ID"],
        [
            [
                s.name,
                s.site,
                s.state,
                s.vm_count,
                ts(s.last_heartbeat_at),
                ts(s.certificate_not_after),
                s.id,
            ]
            for s in servers
        ],
    )
    return EXIT_OK


def cmd_servers_show(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        s = c.call(c.stub.GetServer, admin_pb2.GetServerRequest(server=args.server))
    if args.json:
        print_json(s)
        return EXIT_OK
    print(f"name             {s.name}")
    print(f"id               {s.id}")
    print(f"site             {s.site}")
    print(f"state            {s.state}")
    print(f"cloud            {s.cloud or '-'}")
    print(f"registered       {ts(s.registered_at)}")
    print(f"last heartbeat   {ts(s.last_heartbeat_at)}")
    print(f"clock            {s.clock_offset_seconds:+.1f} s from the broker's")
    print(f"certificate to   {ts(s.certificate_not_after)}")
    f = s.facts
    print(f"host             {f.hostname} ({f.os}), backend {f.backend}, agent {s.agent_version}")
    m = s.metrics
    print(
        f"cpu / memory     {m.cpu_percent:.0f}% / "
        f"{format_size(m.memory_available_bytes)} free of {format_size(m.memory_total_bytes)}"
    )
    for v in m.volumes:
        print(
            f"volume           {v.path}: "
            f"{format_size(v.free_bytes)} free of {format_size(v.total_bytes)}"
        )
    if s.withheld:
        print(
            f"withheld         {', '.join(s.withheld)} (stored over the broker's size caps; "
            "the host's next report replaces them)"
        )
    inv = s.inventory
    if inv.vms:
        print()
        print_table(
            ["VM", "STATE", "CPU", "MEMORY", "DISKS", "NETWORKS"],
            [
                [
                    vm.name,
                    vm.state,
                    vm.cpu_count,
                    f"{vm.memory_mb} MiB",
                    len(vm.disks),
                    ", ".join(sorted({n.network for n in vm.nics if n.network})),
                ]
                for vm in inv.vms
            ],
        )
    return EXIT_OK


def cmd_servers_remove(args: argparse.Namespace) -> int:
    if not confirm(
        f"Remove server {args.server}? Its certificate is refused at once and it must "
        "register again with a new key.",
        assume_yes=args.yes,
    ):
        return EXIT_ERROR
    with admin_client(args) as c:
        job = c.call(c.stub.RemoveServer, admin_pb2.RemoveServerRequest(server=args.server))
    return show_job_result(args, job)


cmd_servers_ping = job_command(
    lambda a, c: c.call(
        c.stub.PingServer, admin_pb2.PingServerRequest(server=a.server, note=a.note)
    )
)
cmd_servers_refresh = job_command(
    lambda a, c: c.call(c.stub.RefreshServer, admin_pb2.RefreshServerRequest(server=a.server))
)


# -- operators ----------------------------------------------------------------------------------


def cmd_operators_add(args: argparse.Namespace) -> int:
    from broker.ca import write_operator_profile

    out = Path(args.out)
    if (out / "admin.key").exists():
        raise InvalidArgument(f"{out} already holds an operator profile")
    key = pki.generate_key()
    valid = parse_duration(args.valid, what="--valid") if args.valid else 0
    with admin_client(args) as c:
        resp = c.call(
            c.stub.AddOperator,
            admin_pb2.AddOperatorRequest(
                name=args.name, csr_der=pki.make_csr(key, args.name), valid_seconds=int(valid)
            ),
        )
    cert = pki.load_cert_pem(resp.certificate_pem)
    write_operator_profile(
        out,
        key=key,
        cert=cert,
        ca_pem=resp.ca_pem,
        vault=resp.vault,
        addresses=list(resp.control_addresses),
    )
    if args.json:
        print_json({"profile": str(out), "not_after": iso(pki.not_after(cert))})
    else:
        print(f"operator {args.name} added; profile written to {out}")
        print(f"  use it with: {PROG} --profile {out} servers list")
    return EXIT_OK


def cmd_operators_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        request = admin_pb2.ListOperatorsRequest(include_revoked=args.all)
        resp = c.call(c.stub.ListOperators, request)
    if args.json:
        print_json(list(resp.operators))
        return EXIT_OK
    headers = ["NAME", "ID", "CREATED", "CERT UNTIL"] + (["REVOKED"] if args.all else [])
    print_table(
        headers,
        [
            [
                o.name + (" (this home)" if o.local else ""),
                o.id,
                ts(o.created_at),
                ts(o.certificate_not_after),
            ]
            + ([ts(o.revoked_at) if o.HasField("revoked_at") else ""] if args.all else [])
            for o in resp.operators
        ],
    )
    return EXIT_OK


def cmd_operators_revoke(args: argparse.Namespace) -> int:
    if not confirm(
        f"Revoke operator {args.operator}? Its certificate is refused from now on, for good.",
        assume_yes=args.yes,
    ):
        return EXIT_ERROR
    with admin_client(args) as c:
        op = c.call(c.stub.RevokeOperator, admin_pb2.RevokeOperatorRequest(operator=args.operator))
    if args.json:
        print_json(op)
    else:
        print(f"operator {op.name} ({op.id}) revoked; its certificate is refused from now on")
    return EXIT_OK


def dashboard_url(address: str, dialed: str, token: str) -> str:
    """The sign-in URL of a dashboard bound at ``address``; a wildcard host is replaced by the
    host the admin API was dialed at (the same broker)."""
    host, port = addresses.check_host_port(address, "the dashboard address")
    if addresses.is_wildcard(host):
        host, _ = addresses.check_host_port(dialed, "the broker address")
    return f"https://{addresses.join(host, port)}/login?token={token}"


def _has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_operators_login(args: argparse.Namespace) -> int:
    if not args.browser:
        raise InvalidArgument(
            "say where to sign in: --browser",
            hint=f"`{PROG} operators login --browser` prints a one-time link that signs a web "
            "browser in to the dashboard",
        )
    with admin_client(args) as c:
        login = c.call(c.stub.CreateDashboardLogin, admin_pb2.CreateDashboardLoginRequest())
        url = dashboard_url(login.address, c.address, login.token)
    if args.json:
        print_json({"url": url, "expires_at": ts(login.expires_at)})
        return EXIT_OK
    print(f"open this link within a minute; it signs one browser in, once:\n  {url}")
    if not args.no_open and _has_display():
        import webbrowser

        if not webbrowser.open(url):
            print("(no web browser could be started here: open the link yourself)")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------


def register(sub: Subcommands, add: AddCommand) -> None:
    """Add the ``keys``, ``servers`` and ``operators`` commands."""
    keys = sub.add_parser("keys", help="registration keys").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(keys, "create", cmd_keys_create, "create a key and write its credentials file")
    sp.add_argument("--site", required=True, help="the site the hosts that use it join")
    sp.add_argument("--valid", help="validity, e.g. 5d (default from broker.toml)")
    sp.add_argument(
        "--uses",
        type=int_range(1, MAX_KEY_USES),
        default=1,
        help=f"how many hosts may use it, 1 to {MAX_KEY_USES} (default 1)",
    )
    sp.add_argument("--out", required=True, help="credentials file to write (mode 0600)")
    sp.add_argument("--force", action="store_true", help="overwrite --out")
    sp = add(keys, "list", cmd_keys_list, "list keys")
    sp.add_argument("--all", action="store_true", help="include expired, used up and revoked")
    sp = add(keys, "revoke", cmd_keys_revoke, "revoke a key")
    sp.add_argument("id", help="the key's id (see `keys list`)")

    servers = sub.add_parser("servers", help="registered hosts").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(servers, "list", cmd_servers_list, "list servers")
    sp.add_argument("--site", help="only this site's servers")
    sp.add_argument("--all", action="store_true", help="include removed servers")
    sp = add(servers, "show", cmd_servers_show, "show one server")
    sp.add_argument("server", help="id or name")
    sp = add(servers, "remove", cmd_servers_remove, "remove (deny-list) a server")
    sp.add_argument("server", help="id or name")
    sp.add_argument("--yes", action="store_true", help="do not ask")
    sp = add(servers, "ping", cmd_servers_ping, "send a ping command through the control stream")
    sp.add_argument("server", help="id or name")
    sp.add_argument("--note", default="", help="text the agent echoes back")
    add_wait(sp)
    sp = add(servers, "refresh", cmd_servers_refresh, "ask a server to resend its inventory")
    sp.add_argument("server", help="id or name")
    add_wait(sp)

    ops = sub.add_parser("operators", help="operator certificates").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(ops, "add", cmd_operators_add, "issue an operator profile (key made here)")
    sp.add_argument("name", help="the operator's name, shown in jobs they start")
    sp.add_argument("--out", required=True, help="folder for the new profile")
    sp.add_argument("--valid", help="certificate validity, e.g. 365d (default from broker.toml)")
    sp = add(ops, "list", cmd_operators_list, "list operators (this home's own one too)")
    sp.add_argument("--all", action="store_true", help="include revoked operators")
    sp = add(
        ops,
        "revoke",
        cmd_operators_revoke,
        "revoke an operator: the broker refuses its certificate from then on",
    )
    sp.add_argument("operator", help='name or id ("local-admin" for a home\'s own operator)')
    sp.add_argument("--yes", action="store_true", help="do not ask")
    sp = add(
        ops,
        "login",
        cmd_operators_login,
        "sign a web browser in to the dashboard as this profile's operator",
    )
    sp.add_argument(
        "--browser",
        action="store_true",
        help="print a one-time sign-in link for the dashboard (valid for a minute), and open "
        "it when this machine has a display",
    )
    sp.add_argument("--no-open", action="store_true", help="only print the link")
