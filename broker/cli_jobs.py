"""``sitepair-broker jobs ...``, and how every command that starts a job shows it.

A command that starts a job is made with :func:`job_command`: with ``--wait`` it follows the job
until it is final, otherwise it shows the job as the broker answered; the exit status is an error
when the job failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from broker.cli_support import PROG, AddCommand, Command, Subcommands, admin_client, ts
from broker.client import AdminClient
from broker.services.admin_checks import JOB_STATES
from sitepair.cliutil import (
    EXIT_ERROR,
    EXIT_OK,
    Interrupted,
    ProgressRate,
    print_json,
    print_table,
    progress_bar,
)
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2

#: Asks the broker to start a job (or to change one) and returns the job it answered with.
StartJob = Callable[[argparse.Namespace, AdminClient], admin_pb2.Job]


def add_wait(sp: argparse.ArgumentParser) -> None:
    """Add ``--wait`` to a command made with :func:`job_command`."""
    sp.add_argument(
        "--wait",
        action="store_true",
        help="follow the job until it finishes, with its progress (exit status 1 if it fails; "
        "Ctrl-C stops following, not the job)",
    )


def job_command(start: StartJob) -> Command:
    """A command that starts a job, then follows it (``--wait``) or shows it."""

    def run(args: argparse.Namespace) -> int:
        with admin_client(args) as c:
            job = start(args, c)
            if getattr(args, "wait", False):
                return watch(args, c, job.id)
        return show_job_result(args, job)

    return run


def print_job(job: admin_pb2.Job) -> None:
    print(f"job {job.id}  {job.kind}  {job.target}")
    print(f"  state    {job.state}" + (f"  error: {job.error}" if job.error else ""))
    print(f"  created  {ts(job.created_at)} by {job.created_by}")
    if job.finished_at.seconds:
        print(f"  finished {ts(job.finished_at)}")
    for s in job.steps:
        progress = (
            f" {progress_bar(s.progress_done, s.progress_total, 20)}" if s.progress_total else ""
        )
        msg = f"  {s.message}" if s.message else ""
        print(f"  {s.index + 1:>2}. {s.state:<10} {s.name}{progress}{msg}")


def show_job_result(args: argparse.Namespace, job: admin_pb2.Job) -> int:
    """Show a job; the exit status says whether it failed."""
    if args.json:
        print_json(job)
    else:
        print_job(job)
    return EXIT_OK if job.state != "failed" else EXIT_ERROR


def watch(args: argparse.Namespace, client: AdminClient, job_id: str) -> int:
    """Follow a job until it is final: one line per change (a progress line on a terminal), a
    step's progress with its rate and time left. Ctrl-C stops following, not the job: the error
    says so and how to follow it again (exit status 130)."""
    last: admin_pb2.Job | None = None
    tty = sys.stdout.isatty() and not args.json
    rates: dict[int, ProgressRate] = {}
    try:
        for job in client.watch_job(job_id):
            last = job
            if args.json:
                continue
            line = progress_line(job, rates, time.monotonic())
            if tty:
                sys.stdout.write("\r\033[K" + line[:200])
                sys.stdout.flush()
            else:
                print(line, flush=True)
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped following job {job_id}; the job keeps running on the broker",
            hint=f"follow it with `{PROG} jobs watch {job_id}`",
        ) from None
    finally:
        if tty:
            sys.stdout.write("\n")
    if last is None:
        raise InvalidArgument(f"no job {job_id}")
    return show_job_result(args, last)


def progress_line(job: admin_pb2.Job, rates: dict[int, ProgressRate], now: float) -> str:
    """A job's state as one line: its running step, and that step's progress (``rates`` keeps
    each step's samples across lines)."""
    running = [s for s in job.steps if s.state == "running"]
    step = running[0] if running else None
    line = f"{job.state:<9} {job.kind} {job.target}"
    if step is None:
        return line
    line += f" | {step.index + 1}/{len(job.steps)} {step.name}"
    if step.progress_total:
        rate = rates.setdefault(step.index, ProgressRate())
        line += " " + progress_bar(step.progress_done, step.progress_total)
        speed = rate.sample(now, step.progress_done, step.progress_total)
        if speed:
            line += f" {speed}"
    elif step.message:
        line += f": {step.message}"
    return line


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
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
        [[j.id, j.kind, j.target, j.state, ts(j.created_at), j.error[:60]] for j in jobs],
    )
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        job = c.call(c.stub.GetJob, admin_pb2.GetJobRequest(id=args.id))
    if args.json:
        print_json(job)
    else:
        print_job(job)
    return EXIT_OK


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        return watch(args, c, args.id)


cmd_jobs_cancel = job_command(
    lambda a, c: c.call(c.stub.CancelJob, admin_pb2.GetJobRequest(id=a.id))
)


def register(sub: Subcommands, add: AddCommand) -> None:
    """Add the ``jobs`` commands."""
    jobs = sub.add_parser("jobs", help="operations and their progress").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    sp = add(jobs, "list", cmd_jobs_list, "list recent jobs")
    sp.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    sp.add_argument("--kind", help="only jobs of this kind, e.g. enable-protection")
    sp.add_argument(
        "--limit", type=int, default=50, help="show the newest N jobs (0 = all; default 50)"
    )
    for name, fn, text in (
        ("show", cmd_jobs_show, "show a job and its steps"),
        ("watch", cmd_jobs_watch, "follow a job with a progress bar until it finishes"),
        ("cancel", cmd_jobs_cancel, "cancel a job where that is possible"),
    ):
        add(jobs, name, fn, text).add_argument("id", help="the job's id (see `jobs list`)")
