"""``sitepair-broker plans ...``: recovery plans."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from broker import cli_drills
from broker.cli_jobs import add_wait, job_command
from broker.cli_support import AddCommand, Command, Subcommands, admin_client
from broker.client import AdminClient
from sitepair.cliutil import EXIT_OK, print_json, print_table
from sitepair.v1 import admin_pb2


def show_plan(args: argparse.Namespace, plan: admin_pb2.RecoveryPlan) -> int:
    if args.json:
        print_json(plan)
        return EXIT_OK
    print(f"recovery plan {plan.name}" + (f": {plan.description}" if plan.description else ""))
    for g in plan.groups:
        for a in g.before:
            print(f"  group {g.index} before  {_action(a)}")
        print(f"  group {g.index} VMs     {', '.join(g.vms) or '-'}")
        for a in g.after:
            print(f"  group {g.index} after   {_action(a)}")
    return EXIT_OK


def _action(a: admin_pb2.PlanAction) -> str:
    if a.kind == "manual":
        return f"manual: {a.name}: {a.instructions}"
    args = " ".join(a.args)
    return f"script: {a.name}: {a.script} {args} (timeout {a.timeout_seconds}s)".replace("  ", " ")


def plan_command(
    fn: Callable[[argparse.Namespace, AdminClient], admin_pb2.RecoveryPlan],
) -> Command:
    """A command that changes or reads a plan and shows it as the broker answered."""

    def run(args: argparse.Namespace) -> int:
        with admin_client(args) as c:
            return show_plan(args, fn(args, c))

    return run


PLAN = "the recovery plan's name (see `plans list`)"
GROUP = "the group's number, 1 for the first (default 1)"


def register(sub: Subcommands, add: AddCommand) -> None:
    """Add the ``plans`` commands."""
    plans = sub.add_parser("plans", help="recovery plans").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )

    sp = add(
        plans,
        "create",
        plan_command(
            lambda a, c: c.call(
                c.stub.CreatePlan,
                admin_pb2.CreatePlanRequest(name=a.name, description=a.description or ""),
            )
        ),
        "create a recovery plan (with group 1)",
    )
    sp.add_argument("name", help=PLAN)
    sp.add_argument("--description", help="free text shown with the plan")
    sp = add(
        plans,
        "show",
        plan_command(lambda a, c: c.call(c.stub.GetPlan, admin_pb2.PlanRef(name=a.name))),
        "show a plan",
    )
    sp.add_argument("name", help=PLAN)

    def plans_list(args: argparse.Namespace) -> int:
        with admin_client(args) as c:
            resp = c.call(c.stub.ListPlans, admin_pb2.ListPlansRequest())
        if args.json:
            print_json(list(resp.plans))
            return EXIT_OK
        print_table(
            ["PLAN", "GROUPS", "VMS", "DESCRIPTION"],
            [
                [p.name, len(p.groups), sum(len(g.vms) for g in p.groups), p.description]
                for p in resp.plans
            ],
        )
        return EXIT_OK

    add(plans, "list", plans_list, "list plans")
    sp = add(
        plans,
        "delete",
        plan_command(lambda a, c: c.call(c.stub.DeletePlan, admin_pb2.PlanRef(name=a.name))),
        "delete a plan",
    )
    sp.add_argument("name", help=PLAN)
    sp = add(
        plans,
        "add-group",
        plan_command(lambda a, c: c.call(c.stub.AddPlanGroup, admin_pb2.PlanRef(name=a.name))),
        "add the next group",
    )
    sp.add_argument("name", help=PLAN)
    sp = add(
        plans,
        "add-vm",
        plan_command(
            lambda a, c: c.call(
                c.stub.AddPlanVm,
                admin_pb2.AddPlanVmRequest(plan=a.name, group=a.group, vm=a.vm),
            )
        ),
        "add a protected VM to a group",
    )
    sp.add_argument("name", help=PLAN)
    sp.add_argument("vm", help="the protected VM's name or id (see `vms protected`)")
    sp.add_argument("--group", type=int, default=1, help=GROUP)

    def add_action(a: argparse.Namespace) -> admin_pb2.AddPlanActionRequest:
        return admin_pb2.AddPlanActionRequest(
            plan=a.name,
            group=a.group,
            when=a.when,
            action=admin_pb2.PlanAction(
                name=a.action_name or "",
                script=a.script or "",
                args=a.arg or [],
                timeout_seconds=a.script_timeout,
                instructions=a.manual or "",
            ),
        )

    sp = add(
        plans,
        "add-action",
        plan_command(lambda a, c: c.call(c.stub.AddPlanAction, add_action(a))),
        "add a script or manual action before/after a group",
    )
    sp.add_argument("name", help=PLAN)
    sp.add_argument("--group", type=int, default=1, help=GROUP)
    sp.add_argument(
        "--when",
        choices=["before", "after"],
        default="after",
        help="run it before or after the group's VMs fail over (default after)",
    )
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--script", help="file name in the recovery agent's scripts folder")
    g.add_argument(
        "--manual", help="instructions for the operator; the plan waits for `plans resume`"
    )
    sp.add_argument("--arg", action="append", help="script argument (repeat)")
    sp.add_argument(
        "--script-timeout", type=int, default=300, help="script timeout in seconds (default 300)"
    )
    sp.add_argument(
        "--action-name", help="how the action is shown in the job (default: the script's name)"
    )

    sp = add(
        plans,
        "failover",
        job_command(
            lambda a, c: c.call(
                c.stub.PlanFailover,
                admin_pb2.PlanFailoverRequest(plan=a.name, type=a.type, point=a.point or ""),
            )
        ),
        "fail a whole plan over, group by group",
    )
    sp.add_argument("name", help=PLAN)
    sp.add_argument(
        "--type",
        choices=["planned", "unplanned", "test"],
        required=True,
        help="planned, unplanned or test failover of every VM, as `vms failover --type`",
    )
    sp.add_argument("--point", help="unplanned/test: latest (default), latest-app-consistent, N")
    add_wait(sp)
    sp = add(
        plans,
        "cleanup-test",
        job_command(
            lambda a, c: c.call(
                c.stub.PlanCleanupTest,
                admin_pb2.PlanCleanupRequest(plan=a.name, notes=a.notes or ""),
            )
        ),
        "clean up a plan's test failover",
    )
    sp.add_argument("name", help=PLAN)
    sp.add_argument("--notes", help="what the test showed; kept in the job")
    add_wait(sp)
    sp = add(
        plans,
        "commit",
        job_command(lambda a, c: c.call(c.stub.PlanCommit, admin_pb2.PlanRef(name=a.name))),
        "commit the failover of every VM in the plan",
    )
    sp.add_argument("name", help=PLAN)
    add_wait(sp)
    sp = add(
        plans,
        "resume",
        job_command(lambda a, c: c.call(c.stub.PlanResume, admin_pb2.PlanRef(name=a.name))),
        "let a plan waiting at a manual action go on",
    )
    sp.add_argument("name", help=PLAN)
    cli_drills.register(plans, add)
