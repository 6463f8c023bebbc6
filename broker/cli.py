"""``sitepair-broker``: create and run a broker, and operate it through the admin API.

``init`` and ``serve`` work on a broker home. Every other command is an admin API call over
mutual TLS with an operator profile: ``--home DIR`` uses the local profile in ``DIR/admin``
(and the address the running broker actually bound), ``--profile DIR`` one made by
``operators add``. ``SITEPAIR_HOME`` / ``SITEPAIR_PROFILE`` set the defaults. ``--json`` prints
machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from broker import config as config_mod
from broker.client import AdminClient, Profile
from broker.home import BrokerHome
from sitepair import __version__, log, pki
from sitepair.cliutil import (
    EXIT_ERROR,
    EXIT_OK,
    confirm,
    print_json,
    print_table,
    progress_bar,
    proto_to_dict,
    run_main,
)
from sitepair.clock import iso
from sitepair.durations import format_size, parse_duration
from sitepair.errors import ConfigError, InvalidArgument
from sitepair.fsutil import atomic_write
from sitepair.protoconv import seconds
from sitepair.v1 import admin_pb2

PROG = "sitepair-broker"


def _ts(t: Any) -> str:
    value = seconds(t)
    return iso(value) if value else "-"


# -- profile / client ---------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> AdminClient:
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
    )
    if args.json:
        print_json(
            {
                "home": str(home.root),
                "vault": args.vault,
                "config": str(home.config),
                "store": store.backend,
            }
        )
    else:
        print(f"broker home created in {home.root} (vault {args.vault})")
        print(f"  configuration  {home.config}")
        print(f"  store          {store.backend}")
        print(f"  CA             {home.ca_cert}")
        print(f"  local operator {home.admin_dir}")
        print(f"start it with:   {PROG} serve --home {home.root}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.app import Broker

    if not args.home:
        raise InvalidArgument("serve needs --home DIR")
    home = BrokerHome(Path(args.home))
    cfg = config_mod.load(home.config)
    log.setup(
        level=cfg.log.level,
        json_format=cfg.log.format == "json",
        file=Path(cfg.log.file) if cfg.log.file else None,
    )
    broker = Broker(home.root, config=cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, broker.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(broker.request_stop))
        await broker.run()

    asyncio.run(main())
    return EXIT_OK


# -- info ---------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.call(c.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
    if args.json:
        print_json(info)
        return EXIT_OK
    print(f"vault               {info.vault}")
    print(f"version             {info.version}")
    print(f"started             {_ts(info.started_at)}")
    print(f"enrollment          {', '.join(info.enrollment_addresses)}")
    print(f"control             {', '.join(info.control_addresses)}")
    print(f"store               {info.store}")
    print(f"connected servers   {info.connected_servers}")
    print(f"serving cert until  {_ts(info.server_certificate_not_after)}")
    print(f"CA until            {_ts(info.ca_not_after)}")
    return EXIT_OK


# -- keys ---------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    valid = parse_duration(args.valid, what="--valid") if args.valid else 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InvalidArgument(f"{out} exists", hint="choose another --out, or pass --force")
    with _client(args) as c:
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
        print(f"  uses {k.uses_total}, expires {_ts(k.expires_at)}")
        print(f"  credentials written to {out} (mode 0600; treat it like a password)")
        print(f"  on the host: sitepair-agent register --credentials {out} --name NAME --home DIR")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
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
                _ts(k.expires_at),
                k.created_by,
            ]
            for k in keys
        ],
    )
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _client(args) as c:
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
    with _client(args) as c:
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
                _ts(s.last_heartbeat_at),
                _ts(s.certificate_not_after),
                s.id,
            ]
            for s in servers
        ],
    )
    return EXIT_OK


def cmd_servers_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.call(c.stub.GetServer, admin_pb2.GetServerRequest(server=args.server))
    if args.json:
        print_json(s)
        return EXIT_OK
    print(f"name             {s.name}")
    print(f"id               {s.id}")
    print(f"site             {s.site}")
    print(f"state            {s.state}")
    print(f"cloud            {s.cloud or '-'}")
    print(f"registered       {_ts(s.registered_at)}")
    print(f"last heartbeat   {_ts(s.last_heartbeat_at)}")
    print(f"clock            {s.clock_offset_seconds:+.1f} s from the broker's")
    print(f"certificate to   {_ts(s.certificate_not_after)}")
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
    with _client(args) as c:
        job = c.call(c.stub.RemoveServer, admin_pb2.RemoveServerRequest(server=args.server))
    return _show_job_result(args, job)


def cmd_servers_ping(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.call(
            c.stub.PingServer, admin_pb2.PingServerRequest(server=args.server, note=args.note)
        )
        if args.wait:
            return _watch(args, c, job.id)
    return _show_job_result(args, job)


def cmd_servers_refresh(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.call(c.stub.RefreshServer, admin_pb2.RefreshServerRequest(server=args.server))
        if args.wait:
            return _watch(args, c, job.id)
    return _show_job_result(args, job)


# -- operators ----------------------------------------------------------------------------------


def cmd_operators_add(args: argparse.Namespace) -> int:
    from broker.ca import write_operator_profile

    out = Path(args.out)
    if (out / "admin.key").exists():
        raise InvalidArgument(f"{out} already holds an operator profile")
    key = pki.generate_key()
    valid = parse_duration(args.valid, what="--valid") if args.valid else 0
    with _client(args) as c:
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
    with _client(args) as c:
        resp = c.call(c.stub.ListOperators, admin_pb2.ListOperatorsRequest())
    if args.json:
        print_json(list(resp.operators))
        return EXIT_OK
    print_table(
        ["NAME", "ID", "CREATED", "CERT UNTIL"],
        [[o.name, o.id, _ts(o.created_at), _ts(o.certificate_not_after)] for o in resp.operators],
    )
    return EXIT_OK


# -- jobs ---------------------------------------------------------------------------------------


def _print_job(job: admin_pb2.Job) -> None:
    print(f"job {job.id}  {job.kind}  {job.target}")
    print(f"  state    {job.state}" + (f"  error: {job.error}" if job.error else ""))
    print(f"  created  {_ts(job.created_at)} by {job.created_by}")
    if job.finished_at.seconds:
        print(f"  finished {_ts(job.finished_at)}")
    for s in job.steps:
        progress = (
            f" {progress_bar(s.progress_done, s.progress_total, 20)}" if s.progress_total else ""
        )
        msg = f"  {s.message}" if s.message else ""
        print(f"  {s.index + 1:>2}. {s.state:<10} {s.name}{progress}{msg}")


def _show_job_result(args: argparse.Namespace, job: admin_pb2.Job) -> int:
    if args.json:
        print_json(job)
    else:
        _print_job(job)
    return EXIT_OK if job.state != "failed" else EXIT_ERROR


def _watch(args: argparse.Namespace, client: AdminClient, job_id: str) -> int:
    last: admin_pb2.Job | None = None
    tty = sys.stdout.isatty() and not args.json
    for job in client.watch_job(job_id):
        last = job
        if args.json:
            continue
        running = [s for s in job.steps if s.state == "running"]
        step = running[0] if running else None
        line = f"{job.state:<9} {job.kind} {job.target}"
        if step is not None:
            line += f" | {step.index + 1}/{len(job.steps)} {step.name}"
            if step.progress_total:
                line += " " + progress_bar(step.progress_done, step.progress_total)
            elif step.message:
                line += f": {step.message}"
        if tty:
            sys.stdout.write("\r\033[K" + line[:200])
            sys.stdout.flush()
        else:
            print(line)
    if tty:
        sys.stdout.write("\n")
    if last is None:
        raise InvalidArgument(f"no job {job_id}")
    return _show_job_result(args, last)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        jobs = c.list_all(
            c.stub.ListJobs,
            admin_pb2.ListJobsRequest(
                state=args.state or "", kind=args.kind or "", page_size=max(args.limit, 0)
            ),
            lambda page: page.jobs,
            limit=max(args.limit, 0),
        )
    if args.json:
        print_json(jobs)
        return EXIT_OK
    print_table(
        ["ID", "KIND", "TARGET", "STATE", "CREATED", "ERROR"],
        [[j.id, j.kind, j.target, j.state, _ts(j.created_at), j.error[:60]] for j in jobs],
    )
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.call(c.stub.GetJob, admin_pb2.GetJobRequest(id=args.id))
    if args.json:
        print_json(job)
    else:
        _print_job(job)
    return EXIT_OK


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _watch(args, c, args.id)


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.call(c.stub.CancelJob, admin_pb2.GetJobRequest(id=args.id))
    return _show_job_result(args, job)


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    def options(*, top: bool) -> argparse.ArgumentParser:
        # The global options are accepted before and after the command; the copies after it
        # default to SUPPRESS so they do not overwrite values given before it.
        def default(value: Any) -> Any:
            return value if top else argparse.SUPPRESS

        o = argparse.ArgumentParser(add_help=False)
        o.add_argument(
            "--home", default=default(os.environ.get("SITEPAIR_HOME")), help="broker home"
        )
        o.add_argument(
            "--profile",
            default=default(os.environ.get("SITEPAIR_PROFILE")),
            help="operator profile folder",
        )
        o.add_argument(
            "--json", action="store_true", default=default(False), help="machine-readable output"
        )
        o.add_argument("--timeout", type=float, default=default(30.0), help="seconds per call")
        return o

    common = options(top=False)
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], parents=[options(top=True)]
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_text, parents=[common])
        sp.set_defaults(fn=fn)
        return sp

    sp = add(sub, "init", cmd_init, "create a broker home (CA, config, store, local operator)")
    sp.add_argument("--vault", required=True, help="vault name (a DNS label)")
    sp.add_argument("--enrollment", default="127.0.0.1:8444", help="enrollment listen address")
    sp.add_argument("--control", default="127.0.0.1:8443", help="control/admin listen address")
    sp.add_argument("--server-name", action="append", help="extra DNS name for the broker cert")
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
    add(sub, "serve", cmd_serve, "run the broker until SIGTERM/SIGINT")
    add(sub, "info", cmd_info, "show the broker's state")

    keys = sub.add_parser("keys", help="registration keys").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(keys, "create", cmd_keys_create, "create a key and write its credentials file")
    sp.add_argument("--site", required=True)
    sp.add_argument("--valid", help="validity, e.g. 5d (default from broker.toml)")
    sp.add_argument("--uses", type=int, default=1, help="how many hosts may use it (default 1)")
    sp.add_argument("--out", required=True, help="credentials file to write (mode 0600)")
    sp.add_argument("--force", action="store_true", help="overwrite --out")
    sp = add(keys, "list", cmd_keys_list, "list keys")
    sp.add_argument("--all", action="store_true", help="include expired, used up and revoked")
    sp = add(keys, "revoke", cmd_keys_revoke, "revoke a key")
    sp.add_argument("id")

    servers = sub.add_parser("servers", help="registered hosts").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(servers, "list", cmd_servers_list, "list servers")
    sp.add_argument("--site")
    sp.add_argument("--all", action="store_true", help="include removed servers")
    sp = add(servers, "show", cmd_servers_show, "show one server")
    sp.add_argument("server", help="id or name")
    sp = add(servers, "remove", cmd_servers_remove, "remove (deny-list) a server")
    sp.add_argument("server", help="id or name")
    sp.add_argument("--yes", action="store_true", help="do not ask")
    sp = add(servers, "ping", cmd_servers_ping, "send a ping command through the control stream")
    sp.add_argument("server", help="id or name")
    sp.add_argument("--note", default="", help="text the agent echoes back")
    sp.add_argument("--wait", action="store_true", help="watch the job until it finishes")
    sp = add(servers, "refresh", cmd_servers_refresh, "ask a server to resend its inventory")
    sp.add_argument("server", help="id or name")
    sp.add_argument("--wait", action="store_true", help="watch the job until it finishes")

    ops = sub.add_parser("operators", help="operator certificates").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(ops, "add", cmd_operators_add, "issue an operator profile (key made here)")
    sp.add_argument("name")
    sp.add_argument("--out", required=True, help="folder for the new profile")
    sp.add_argument("--valid", help="certificate validity, e.g. 365d")
    add(ops, "list", cmd_operators_list, "list operators")

    jobs = sub.add_parser("jobs", help="operations and their progress").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    from broker.cli_protection import register as register_protection

    register_protection(sub, add, _client, _watch, _show_job_result)
    from broker.cli_plans import register as register_plans

    register_plans(sub, add, _client, _watch, _show_job_result)

    sp = add(jobs, "list", cmd_jobs_list, "list recent jobs")
    sp.add_argument("--state")
    sp.add_argument("--kind")
    sp.add_argument(
        "--limit", type=int, default=50, help="show the newest N jobs (0 = all; default 50)"
    )
    for name, fn, text in (
        ("show", cmd_jobs_show, "show a job and its steps"),
        ("watch", cmd_jobs_watch, "follow a job with a progress bar until it finishes"),
        ("cancel", cmd_jobs_cancel, "cancel a job where that is possible"),
    ):
        add(jobs, name, fn, text).add_argument("id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: int(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
