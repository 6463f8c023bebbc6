"""``sitepair-broker plans ...`` for drills: a plan's checks, drills now and on a schedule, and
the drills history (see :mod:`broker.drills`).

``add-check`` is made the way ``add-action`` is: the plan, then what to run (``--script`` on the
recovery host or ``--guest`` inside a test VM), repeated ``--arg``, a timeout and a name.
"""

from __future__ import annotations

import argparse

from broker.cli_jobs import add_wait, job_command
from broker.cli_support import AddCommand, Subcommands, admin_client, int_range, ts
from broker.drill_checks import MAX_CHECK_TIMEOUT
from sitepair.cliutil import EXIT_ERROR, EXIT_OK, print_json, print_table
from sitepair.durations import format_duration, parse_duration
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2


def _check_line(c: admin_pb2.PlanCheck) -> str:
    where = f" in {c.vm}" if c.kind == "guest" else (f" for {c.vm}" if c.vm else "")
    args = "".join(f" {a}" for a in c.args)
    return f"  check {c.name}: {c.kind} {c.program}{args}{where} (timeout {c.timeout_seconds}s)"


def show_checks(args: argparse.Namespace, plan: admin_pb2.RecoveryPlan) -> int:
    """A plan's checks and drill schedule (``--json``: the whole plan)."""
    if args.json:
        print_json(plan)
        return EXIT_OK
    print(f"recovery plan {plan.name}: {len(plan.checks)} check(s)")
    for c in plan.checks:
        print(_check_line(c))
    if plan.drill_every_seconds:
        print(f"  drilled every {format_duration(plan.drill_every_seconds)}")
    return EXIT_OK


def _every(text: str) -> float:
    """``--every``: a duration, or ``off`` (0)."""
    if text.strip().lower() == "off":
        return 0.0
    every = parse_duration(text, what="--every")
    if every <= 0:
        raise InvalidArgument("--every must be a positive duration, or off")
    return every


def cmd_drill(args: argparse.Namespace) -> int:
    """A drill now, or (``--every``) the plan's schedule."""
    if args.every is None:
        return job_command(lambda a, c: c.call(c.stub.DrillPlan, admin_pb2.PlanRef(name=a.name)))(
            args
        )
    if args.wait:
        raise InvalidArgument("--wait follows a drill run now; it does not go with --every")
    every = _every(args.every)
    with admin_client(args) as c:
        schedule = c.call(
            c.stub.SetDrillSchedule,
            admin_pb2.SetDrillScheduleRequest(plan=args.name, every_seconds=int(every)),
        )
    if args.json:
        print_json(schedule)
    elif schedule.every_seconds:
        print(
            f"recovery plan {schedule.plan} is drilled every "
            f"{format_duration(schedule.every_seconds)}; next drill {ts(schedule.next_at)}"
        )
        if not schedule.checks:
            print(
                "  it has no checks: a drill proves the test VMs exact and that they start; "
                "add checks with `plans add-check`"
            )
    else:
        print(f"recovery plan {schedule.plan} has no scheduled drills")
    return EXIT_OK


def cmd_drills(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        drills = c.list_all(
            c.stub.ListDrills,
            admin_pb2.ListDrillsRequest(plan=args.name or "", page_size=max(args.limit, 0)),
            lambda page: page.drills,
            limit=max(args.limit, 0),
        )
    if args.json:
        print_json(drills)
        return EXIT_OK
    print_table(
        ["ID", "PLAN", "STATE", "STARTED", "BY", "RTO", "REASON"],
        [
            [
                d.id,
                d.plan,
                d.state,
                ts(d.started_at),
                d.started_by,
                f"{d.rto_seconds:.0f}s" if d.rto_seconds else "-",
                d.reason[:70],
            ]
            for d in drills
        ],
    )
    return EXIT_OK


def cmd_drill_show(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        d = c.call(c.stub.GetDrill, admin_pb2.GetDrillRequest(id=args.id))
    if args.json:
        print_json(d)
        return EXIT_OK if d.state != "failed" else EXIT_ERROR
    print(f"drill {d.id} of recovery plan {d.plan}: {d.state}")
    if d.reason:
        print(f"  reason   {d.reason}")
    print(
        f"  started  {ts(d.started_at)} by {d.started_by}"
        + (f", job {d.job_id}" if d.job_id else "")
    )
    if d.finished_at.seconds:
        print(f"  finished {ts(d.finished_at)}")
    if d.rto_seconds:
        print(f"  RTO      {d.rto_seconds:.1f} s until every test VM ran")
    for v in d.vms:
        if v.error:
            print(f"  VM {v.vm}: test failover failed: {v.error}")
            continue
        proof = v.exact
        exact = (
            f"exact: {proof.blocks_compared} blocks ({proof.bytes_compared} bytes) compared, "
            f"{proof.mismatched_blocks} mismatched"
            if proof.checked
            else "exact: not proven"
        )
        if v.changed_at_rest:
            exact += ", CHANGED AT REST since an earlier proof"
        print(
            f"  VM {v.vm}: test VM {v.test_vm} on {v.recovery_host}, point {v.point} "
            f"cut {ts(v.cut_at)} (RPO {v.rpo_seconds:.0f} s), running after "
            f"{v.running_after_seconds:.1f} s; {exact}"
        )
        for disk, digest in sorted(proof.disk_digests.items()):
            print(f"      disk {disk} {digest}")
    for ch in d.checks:
        outcome = "passed" if ch.passed else "FAILED"
        how = ch.error or ("timed out" if ch.timed_out else f"exit status {ch.exit_status}")
        print(f"  check {ch.name}: {outcome} ({how}, {ch.seconds:.1f} s)")
        for line in ch.output_tail.strip().splitlines()[-5:]:
            print(f"      | {line}")
    if d.state in ("passed", "failed"):
        print(
            "  cleanup  done"
            if d.cleaned_up
            else f"  cleanup  NOT DONE: {d.cleanup_error or 'see the job'}"
        )
    return EXIT_OK if d.state != "failed" else EXIT_ERROR


def register(plans: Subcommands, add: AddCommand) -> None:
    """Add the drill commands to the ``plans`` group."""

    def add_check(args: argparse.Namespace) -> int:
        with admin_client(args) as c:
            plan = c.call(
                c.stub.AddPlanCheck,
                admin_pb2.AddPlanCheckRequest(
                    plan=args.name,
                    check=admin_pb2.PlanCheck(
                        name=args.check_name or "",
                        kind="script" if args.script else "guest",
                        vm=args.vm or "",
                        program=args.script or args.guest,
                        args=args.arg or [],
                        timeout_seconds=args.check_timeout,
                    ),
                ),
            )
        return show_checks(args, plan)

    sp = add(plans, "add-check", add_check, "add a check that drills of the plan run")
    sp.add_argument("name", help="the recovery plan's name (see `plans list`)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--script",
        help="file name in the recovery agent's scripts folder, run on the recovery host "
        "(env: SITEPAIR_PLAN, SITEPAIR_DRILL, SITEPAIR_VMS, SITEPAIR_TEST_VMS, and with --vm "
        "SITEPAIR_VM, SITEPAIR_TEST_VM)",
    )
    g.add_argument("--guest", help="absolute path of a program inside the test VM (needs --vm)")
    sp.add_argument(
        "--vm", help="the plan's VM the check is for (a guest check runs in its test VM)"
    )
    sp.add_argument("--arg", action="append", help="argument (repeat)")
    sp.add_argument(
        "--check-timeout",
        type=int_range(1, MAX_CHECK_TIMEOUT),
        default=60,
        help="seconds the check may take (default 60)",
    )
    sp.add_argument("--check-name", help="how the check is shown (default: what it runs)")

    def remove_check(args: argparse.Namespace) -> int:
        with admin_client(args) as c:
            plan = c.call(
                c.stub.RemovePlanCheck,
                admin_pb2.RemovePlanCheckRequest(plan=args.name, name=args.check),
            )
        return show_checks(args, plan)

    sp = add(plans, "remove-check", remove_check, "remove a check from a plan")
    sp.add_argument("name", help="the recovery plan's name (see `plans list`)")
    sp.add_argument("check", help="the check's name (see `plans add-check` output)")

    sp = add(
        plans,
        "drill",
        cmd_drill,
        "drill a plan now (test failover, exact proof, checks, cleanup), or schedule drills",
    )
    sp.add_argument("name", help="the recovery plan's name (see `plans list`)")
    sp.add_argument(
        "--every",
        help="schedule a drill this often (e.g. 7d; at least 1h; the first one interval from "
        "now), or off",
    )
    add_wait(sp)

    sp = add(plans, "drills", cmd_drills, "list drills, newest first")
    sp.add_argument("name", nargs="?", help="only this plan's drills")
    sp.add_argument(
        "--limit", type=int, default=50, help="show the newest N drills (0 = all; default 50)"
    )

    sp = add(plans, "drill-show", cmd_drill_show, "show a drill's evidence")
    sp.add_argument("id", help="the drill's id (see `plans drills`)")
