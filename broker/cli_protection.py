"""``sitepair-broker`` commands for protection: clouds, pairs, mappings, protected VMs."""

from __future__ import annotations

import argparse
import datetime as dt
import functools

from broker.cli_jobs import StartJob, add_wait, job_command
from broker.cli_support import AddCommand, Subcommands, admin_client, ts
from broker.client import AdminClient
from broker.policy import AUTH_PORTS
from sitepair.cliutil import EXIT_OK, print_json, print_table, progress_bar
from sitepair.durations import format_size, parse_duration, parse_size
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2, control_pb2

# -- protection policy --------------------------------------------------------------------------


def policy_from_args(args: argparse.Namespace) -> admin_pb2.Policy:
    freq = int(parse_duration(args.copy_frequency, what="--copy-frequency"))
    at = None
    if args.initial_at:
        try:
            at = dt.datetime.fromisoformat(args.initial_at.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidArgument(
                f"--initial-at {args.initial_at!r} is not a date and time"
            ) from exc
        if at.tzinfo is None:
            at = at.replace(tzinfo=dt.UTC)
    policy = admin_pb2.Policy(
        copy_frequency_seconds=freq,
        recovery_points=args.recovery_points,
        app_consistent_hours=args.app_consistent_hours,
        compression=not args.no_compression,
        authentication=args.authentication,
        port=args.port,
        initial_method=args.initial,
        export_path=args.export_path or "",
        import_path=args.import_path or "",
        delete_replica_on_disable=args.delete_replica_on_disable,
        bandwidth_limit=parse_size(args.bandwidth) if args.bandwidth else 0,
    )
    if at is not None:
        policy.initial_at.FromDatetime(at)
    return policy


def add_policy_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--copy-frequency", default="5m", help="30s, 5m or 15m (default 5m)")
    sp.add_argument(
        "--recovery-points", type=int, default=0, help="additional hourly points, 0-24 (default 0)"
    )
    sp.add_argument(
        "--app-consistent-hours",
        type=int,
        default=0,
        help="hours between app-consistent points, 0-12, fewer than the points (default 0: none)",
    )
    sp.add_argument(
        "--no-compression",
        action="store_true",
        help="send blocks uncompressed (default: compressed)",
    )
    sp.add_argument(
        "--authentication",
        choices=["certificate", "ticket"],
        default="certificate",
        help="how the replica host authenticates the primary: mutual TLS certificates "
        "(default) or a ticket over TLS",
    )
    sp.add_argument("--port", type=int, default=0, help="replication port (default 8084 / 8083)")
    sp.add_argument(
        "--initial",
        choices=["network", "scheduled", "offline"],
        default="network",
        help="initial replication: over the network now (default), at --initial-at, or "
        "offline through --export-path/--import-path",
    )
    sp.add_argument("--initial-at", help="start time of a scheduled initial replication (ISO 8601)")
    sp.add_argument("--export-path", help="offline: folder on the primary hosts")
    sp.add_argument("--import-path", help="offline: folder on the recovery hosts")
    sp.add_argument(
        "--delete-replica-on-disable",
        action="store_true",
        help="delete the replica when protection is disabled (default: keep it)",
    )
    sp.add_argument(
        "--bandwidth", help="per-VM limit in bytes per second, e.g. 50M (default: no limit)"
    )


# -- clouds and pairs ---------------------------------------------------------------------------


def show_cloud(args: argparse.Namespace, cloud: admin_pb2.Cloud) -> int:
    if args.json:
        print_json(cloud)
    else:
        pair = f"{cloud.role} of a pair with {cloud.paired_with}" if cloud.role else "not paired"
        print(f"cloud {cloud.name} (site {cloud.site}), {pair}")
        print(f"  hosts: {', '.join(cloud.hosts) or '-'}")
    return EXIT_OK


def cmd_clouds_create(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        cloud = c.call(
            c.stub.CreateCloud,
            admin_pb2.CreateCloudRequest(
                name=args.name, site=args.site, description=args.description or ""
            ),
        )
    return show_cloud(args, cloud)


def cmd_clouds_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        resp = c.call(c.stub.ListClouds, admin_pb2.ListCloudsRequest())
    if args.json:
        print_json(list(resp.clouds))
        return EXIT_OK
    print_table(
        ["CLOUD", "SITE", "ROLE", "PAIRED WITH", "HOSTS"],
        [[cl.name, cl.site, cl.role, cl.paired_with, ", ".join(cl.hosts)] for cl in resp.clouds],
    )
    return EXIT_OK


def cmd_clouds_show(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        return show_cloud(args, c.call(c.stub.GetCloud, admin_pb2.CloudRef(name=args.name)))


def cmd_clouds_delete(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        cloud = c.call(c.stub.DeleteCloud, admin_pb2.CloudRef(name=args.name))
    if not args.json:
        print(f"cloud {cloud.name} deleted")
        return EXIT_OK
    return show_cloud(args, cloud)


def cmd_clouds_add_host(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        request = admin_pb2.CloudHostRequest(cloud=args.cloud, server=args.server)
        return show_cloud(args, c.call(c.stub.AddCloudHost, request))


def cmd_clouds_remove_host(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        request = admin_pb2.CloudHostRequest(cloud=args.cloud, server=args.server)
        return show_cloud(args, c.call(c.stub.RemoveCloudHost, request))


def cmd_clouds_unpair(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        pair = c.call(c.stub.UnpairClouds, admin_pb2.CloudRef(name=args.primary))
    if args.json:
        print_json(pair)
    else:
        print(f"pairing {pair.primary} -> {pair.recovery} removed")
    return EXIT_OK


def cmd_clouds_pairs(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        resp = c.call(c.stub.ListPairs, admin_pb2.ListPairsRequest())
    if args.json:
        print_json(list(resp.pairs))
        return EXIT_OK
    print_table(
        [
            "PRIMARY",
            "RECOVERY",
            "COPY EVERY",
            "POINTS",
            "APP-CONS.",
            "AUTH",
            "PORT",
            "INITIAL",
            "VMS",
        ],
        [
            [
                p.primary,
                p.recovery,
                f"{p.policy.copy_frequency_seconds}s",
                p.policy.recovery_points,
                f"{p.policy.app_consistent_hours}h" if p.policy.app_consistent_hours else "-",
                p.policy.authentication,
                p.policy.port or AUTH_PORTS.get(p.policy.authentication, 0),
                p.policy.initial_method,
                p.protected_vms,
            ]
            for p in resp.pairs
        ],
    )
    return EXIT_OK


# -- mappings -----------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace, kind: str) -> int:
    with admin_client(args) as c:
        m = c.call(
            c.stub.Map,
            admin_pb2.MapRequest(kind=kind, source=args.source, target=args.target),
        )
    if args.json:
        print_json(m)
    else:
        print(f"{kind} {m.source} -> {m.target}")
    return EXIT_OK


def cmd_unmap(args: argparse.Namespace, kind: str) -> int:
    with admin_client(args) as c:
        m = c.call(c.stub.Unmap, admin_pb2.MapRequest(kind=kind, source=args.source))
    if args.json:
        print_json(m)
    else:
        print(f"{kind} mapping {m.source} -> {m.target} removed")
    return EXIT_OK


def cmd_mappings_list(args: argparse.Namespace, kind: str) -> int:
    with admin_client(args) as c:
        resp = c.call(c.stub.ListMappings, admin_pb2.ListMappingsRequest(kind=kind))
    if args.json:
        print_json(list(resp.mappings))
        return EXIT_OK
    print_table(
        ["SOURCE", "TARGET", "SOURCE CLOUDS", "TARGET CLOUDS"],
        [
            [m.source, m.target, ", ".join(m.source_clouds), ", ".join(m.target_clouds)]
            for m in resp.mappings
        ],
    )
    return EXIT_OK


# -- VMs and their protection -------------------------------------------------------------------

#: What the RPO column shows for a protected VM before its first cycle.
NO_RPO = "\u2014"


def format_rpo(seconds: int) -> str:
    """An RPO lag as an operator reads it: 42s, 3m, 5h, 2d (whole units, rounded down)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def rpo_cell(v: admin_pb2.VmInfo | admin_pb2.ProtectedVm, protected: bool) -> str:
    """The RPO of a VM as a table shows it: "" (shown "-") for a VM not protected."""
    if v.HasField("rpo_seconds"):
        return format_rpo(v.rpo_seconds)
    return NO_RPO if protected else ""


def where_it_runs(v: admin_pb2.ProtectedVm) -> tuple[str, str]:
    """(the host the VM runs on, the host replicating from it or "") as the tables show them."""
    running = v.running_on or v.primary_server
    return running, v.replica_server if running == v.primary_server else ""


def cmd_vms_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        vms = c.list_all(
            c.stub.ListVms,
            admin_pb2.ListVmsRequest(server=args.server or ""),
            lambda page: page.vms,
        )
    if args.json:
        print_json(vms)
        return EXIT_OK
    print_table(
        ["VM", "HOST", "CLOUD", "STATE", "DISKS", "PROTECTION", "HEALTH", "RPO"],
        [
            [
                v.vm.name,
                v.server_name,
                v.cloud,
                v.vm.state,
                f"{len(v.vm.disks)} ({format_size(sum(d.virtual_size for d in v.vm.disks))})",
                v.protection_state,
                v.health,
                rpo_cell(v, v.protection_state not in ("", "replica", "test-failover")),
            ]
            for v in vms
        ],
    )
    return EXIT_OK


def cmd_vms_protected(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        protected = c.list_all(
            c.stub.ListProtected,
            admin_pb2.ListProtectedRequest(include_disabled=args.all),
            lambda page: page.vms,
        )
    if args.json:
        print_json(protected)
        return EXIT_OK
    print_table(
        ["VM", "STATE", "HEALTH", "PRIMARY", "REPLICA", "LAST CYCLE", "EPOCH", "RELATIONSHIP"],
        [
            [
                v.vm_name,
                v.state + (" (paused)" if v.paused else ""),
                v.health,
                *where_it_runs(v),
                ts(v.primary_status.last_success_at),
                v.epoch,
                v.relationship_id,
            ]
            for v in protected
        ],
    )
    return EXIT_OK


def cmd_vms_show(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        v = c.call(c.stub.GetProtected, admin_pb2.ProtectedRef(vm=args.vm))
    if args.json:
        print_json(v)
        return EXIT_OK
    p, ps, rs = v.policy, v.primary_status, v.replica_status
    print(f"VM {v.vm_name} ({v.vm_id}), relationship {v.relationship_id}")
    print(f"  state          {v.state}{' (paused)' if v.paused else ''}, epoch {v.epoch}")
    print(f"  health         {v.health}")
    for r in v.reasons:
        print(f"    {r.level:<9} {r.message}")
    running, replica = where_it_runs(v)
    if replica:
        print(f"  primary        {v.primary_server} in {v.primary_cloud}")
        print(f"  replica        {v.replica_server} in {v.recovery_cloud} {v.replica_folder}")
    else:
        was = v.primary_server
        print(f"  primary        {running} in {v.recovery_cloud} (failed over from {was})")
        print(
            f"  replica        none: nothing replicates until `vms reverse {v.vm_name}` "
            f"(the old VM is on {v.primary_server})"
        )
    if v.HasField("test_failover"):
        t = v.test_failover
        made = f"test VM {t.vm_name} from point {t.point}" if t.vm_name else "being made"
        print(
            f"  test failover  {made} on {t.host}, network {t.network or 'none'} "
            f"(job {t.job_id}); remove it with `vms cleanup-test {v.vm_name}`"
        )
    compression = "on" if p.compression else "off"
    port = p.port or AUTH_PORTS.get(p.authentication, 0)
    print(
        f"  policy         every {p.copy_frequency_seconds}s, {p.recovery_points} point(s), "
        f"{p.authentication} on {port}, compression {compression}"
    )
    print(
        f"  cycles         {ps.cycles_succeeded} ok, {ps.cycles_failed} failed, "
        f"{ps.cycles_missed} missed; last {ts(ps.last_success_at)}"
    )
    if ps.cycles_succeeded:
        print(
            f"  cycle size     avg {format_size(ps.avg_cycle_bytes)}, "
            f"max {format_size(ps.max_cycle_bytes)}; latency avg "
            f"{ps.avg_cycle_seconds:.1f}s, max {ps.max_cycle_seconds:.1f}s"
        )
    if ps.progress_total and ps.state in (
        control_pb2.STATE_INITIAL_REPLICATION,
        control_pb2.STATE_RESYNCHRONIZING,
    ):
        print(f"  progress       {progress_bar(ps.progress_done, ps.progress_total)}")
    if ps.last_error:
        print(f"  last error     {ps.last_error}")
    print(f"  replica holds  sequence {rs.committed_sequence} (cut {ts(rs.last_cut_at)})")
    print(f"  RPO            {rpo_cell(v, True)} (now minus the cut time of the latest point)")
    if v.HasField("last_verification"):
        lv = v.last_verification
        outcome = (
            "identical"
            if not lv.mismatched_bytes
            else f"{format_size(lv.mismatched_bytes)} differed"
            + (", repaired" if lv.repaired else ", NOT repaired")
        )
        print(
            f"  verified       {ts(lv.at)} at sequence {lv.sequence}: {outcome} "
            f"(by {lv.by}, job {lv.job_id})"
        )
    else:
        print("  verified       never")
    for pt in rs.points:
        flags = ", app-consistent" if pt.app_consistent else ""
        pinned = " (pinned)" if pt.pinned else ""
        print(f"    point {pt.sequence:<6} {ts(pt.cut_at)}{flags}{pinned}")
    return EXIT_OK


def _disable(a: argparse.Namespace, c: AdminClient) -> admin_pb2.Job:
    replica = admin_pb2.DisableProtectionRequest.POLICY
    if a.delete_replica:
        replica = admin_pb2.DisableProtectionRequest.DELETE
    elif a.keep_replica:
        replica = admin_pb2.DisableProtectionRequest.KEEP
    return c.call(
        c.stub.DisableProtection, admin_pb2.DisableProtectionRequest(vm=a.vm, replica=replica)
    )


def _replication_action(action: str) -> StartJob:
    def start(a: argparse.Namespace, c: AdminClient) -> admin_pb2.Job:
        request = admin_pb2.ReplicationActionRequest(
            vm=a.vm, action=action, no_repair=getattr(a, "no_repair", False)
        )
        return c.call(c.stub.ReplicationAction, request)

    return start


# -- failover -----------------------------------------------------------------------------------


def _failover(a: argparse.Namespace, c: AdminClient) -> admin_pb2.Job:
    request = admin_pb2.FailoverRequest(
        vm=a.vm, type=a.type, point=a.point or "", reverse=a.reverse, network=a.network or ""
    )
    return c.call(c.stub.Failover, request)


def _cleanup_test(a: argparse.Namespace, c: AdminClient) -> admin_pb2.Job:
    return c.call(
        c.stub.CleanupTestFailover, admin_pb2.CleanupTestRequest(vm=a.vm, notes=a.notes or "")
    )


# -- parser -------------------------------------------------------------------------------------

CLOUD = "the cloud's name (see `clouds list`)"
VM = "the protected VM's name or id (see `vms protected`)"
FAILOVER_TYPES = ["planned", "unplanned", "test"]
FAILOVER_TYPE_HELP = (
    "planned: shut down, send the last changes, start at the recovery site; unplanned: start "
    "from a recovery point (the primary is lost); test: a copy beside replication"
)


def register(sub: Subcommands, add: AddCommand) -> None:
    """Add the protection commands: clouds, mappings, VMs and their protection."""
    # -- clouds --
    clouds = sub.add_parser("clouds", help="clouds and cloud pairs").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )

    sp = add(clouds, "create", cmd_clouds_create, "create a cloud (a group of hosts at one site)")
    sp.add_argument("name", help="the new cloud's name")
    sp.add_argument("--site", required=True, help="the site its hosts are at")
    sp.add_argument("--description", help="free text shown with the cloud")
    add(clouds, "list", cmd_clouds_list, "list clouds")
    sp = add(clouds, "show", cmd_clouds_show, "show a cloud")
    sp.add_argument("name", help=CLOUD)
    sp = add(clouds, "delete", cmd_clouds_delete, "delete a cloud (not while paired)")
    sp.add_argument("name", help=CLOUD)
    for name, fn, text in (
        ("add-host", cmd_clouds_add_host, "add a host to a cloud"),
        ("remove-host", cmd_clouds_remove_host, "remove a host from a cloud"),
    ):
        sp = add(clouds, name, fn, text)
        sp.add_argument("cloud", help=CLOUD)
        sp.add_argument("server", help="the host's name or id (see `servers list`)")
    sp = add(
        clouds,
        "refresh",
        job_command(lambda a, c: c.call(c.stub.RefreshCloud, admin_pb2.CloudRef(name=a.name))),
        "ask every host of a cloud to resend its inventory",
    )
    sp.add_argument("name", help=CLOUD)
    add_wait(sp)
    sp = add(
        clouds,
        "pair",
        job_command(
            lambda a, c: c.call(
                c.stub.PairClouds,
                admin_pb2.PairCloudsRequest(
                    primary=a.primary, recovery=a.recovery, policy=policy_from_args(a)
                ),
            )
        ),
        "pair a primary cloud with a recovery cloud, with a protection policy",
    )
    sp.add_argument("primary", help="the cloud whose VMs are protected")
    sp.add_argument("recovery", help="the cloud their replicas go to")
    add_wait(sp)
    add_policy_arguments(sp)
    sp = add(
        clouds,
        "policy",
        job_command(
            lambda a, c: c.call(
                c.stub.SetPairPolicy,
                admin_pb2.PairCloudsRequest(primary=a.primary, policy=policy_from_args(a)),
            )
        ),
        "change the policy of a pair (applied to its protected VMs)",
    )
    sp.add_argument("primary", help="the pair's primary cloud")
    add_wait(sp)
    add_policy_arguments(sp)
    sp = add(clouds, "unpair", cmd_clouds_unpair, "remove a pairing (no VM may be protected)")
    sp.add_argument("primary", help="the pair's primary cloud")
    add(clouds, "pairs", cmd_clouds_pairs, "list cloud pairs and their policies")

    # -- mappings --
    for kind, src_help in (("network", "VM network"), ("storage", "storage classification")):
        grp = sub.add_parser(
            f"{kind}s" if kind == "network" else kind, help=f"{src_help} mappings"
        ).add_subparsers(dest="sub", required=True, metavar="ACTION")

        sp = add(
            grp,
            "map",
            functools.partial(cmd_map, kind=kind),
            f"map a source {src_help} to a target one",
        )
        sp.add_argument("source", help=f"the {src_help} at the primary site")
        sp.add_argument("target", help=f"the {src_help} at the recovery site to use for it")
        sp = add(grp, "unmap", functools.partial(cmd_unmap, kind=kind), "remove a mapping")
        sp.add_argument("source", help=f"the mapped {src_help} at the primary site")
        add(
            grp,
            "list",
            functools.partial(cmd_mappings_list, kind=kind),
            "list mappings with the clouds that offer them",
        )

    # -- VMs and protection --
    vms = sub.add_parser("vms", help="virtual machines and their protection").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )

    sp = add(vms, "list", cmd_vms_list, "list VMs in the inventory")
    sp.add_argument(
        "--server",
        help="only this host's VMs, replica copies too (default: every VM once, where it runs)",
    )
    sp = add(vms, "protected", cmd_vms_protected, "list protected VMs with state and health")
    sp.add_argument("--all", action="store_true", help="include disabled ones")
    sp = add(vms, "show", cmd_vms_show, "show a protected VM: state, health, statistics, points")
    sp.add_argument("vm", help=VM)

    protect = job_command(
        lambda a, c: c.call(
            c.stub.ProtectVm,
            admin_pb2.ProtectVmRequest(
                vm=a.vm, accept_no_network=a.accept_no_network, server=a.server or ""
            ),
        )
    )
    for parent, name in ((vms, "protect"), (sub, "protect")):
        sp = add(parent, name, protect, "enable protection of a VM")
        sp.add_argument("vm", help="the VM's name or id (see `vms list`)")
        sp.add_argument(
            "--accept-no-network",
            action="store_true",
            help="protect even if a NIC's network has no mapping",
        )
        sp.add_argument(
            "--server",
            help="the host whose copy of the VM to protect, when it is on several "
            "(default: where it runs)",
        )
        add_wait(sp)

    sp = add(vms, "disable", job_command(_disable), "disable protection of a VM")
    sp.add_argument("vm", help=VM)
    g = sp.add_mutually_exclusive_group()
    g.add_argument(
        "--delete-replica",
        action="store_true",
        help="delete the replica (default: as the pair's policy says)",
    )
    g.add_argument(
        "--keep-replica",
        action="store_true",
        help="keep the replica (default: as the pair's policy says)",
    )
    add_wait(sp)

    # -- failover --
    sp = add(vms, "failover", job_command(_failover), "fail a VM over: planned, unplanned or test")
    sp.add_argument("vm", help=VM)
    sp.add_argument("--type", choices=FAILOVER_TYPES, required=True, help=FAILOVER_TYPE_HELP)
    sp.add_argument(
        "--point",
        help="unplanned/test: latest (default), latest-app-consistent, or a sequence number",
    )
    sp.add_argument(
        "--reverse", action="store_true", help="planned: commit and replicate back at once"
    )
    sp.add_argument(
        "--network", help='test: "" (no network, default), an existing network, or "create"'
    )
    add_wait(sp)

    failover_steps: tuple[tuple[str, StartJob, str], ...] = (
        (
            "commit",
            lambda a, c: c.call(c.stub.CommitFailover, admin_pb2.ProtectedRef(vm=a.vm)),
            "commit a failover: other recovery points are discarded",
        ),
        (
            "cancel-failover",
            lambda a, c: c.call(c.stub.CancelFailover, admin_pb2.ProtectedRef(vm=a.vm)),
            "undo a failover that was not committed",
        ),
        (
            "reverse",
            lambda a, c: c.call(c.stub.ReverseReplication, admin_pb2.ProtectedRef(vm=a.vm)),
            "replicate a failed-over VM back to its old site",
        ),
    )
    for name, start, text in failover_steps:
        sp = add(vms, name, job_command(start), text)
        sp.add_argument("vm", help=VM)
        add_wait(sp)

    sp = add(
        vms, "cleanup-test", job_command(_cleanup_test), "remove a test failover's VM and network"
    )
    sp.add_argument("vm", help=VM)
    sp.add_argument("--notes", help="what the test showed; kept in the job")
    add_wait(sp)

    for action, text in (
        ("pause", "pause replication"),
        ("resume", "resume replication"),
        ("resync", "resynchronize: compare digests and send only blocks that differ"),
        ("verify", "compare source and replica digests without moving data, repair mismatches"),
        ("cycle", "run a replication cycle now"),
    ):
        sp = add(vms, action, job_command(_replication_action(action)), text)
        sp.add_argument("vm", help=VM)
        add_wait(sp)
        if action == "verify":
            sp.add_argument("--no-repair", action="store_true", help="only report mismatches")
