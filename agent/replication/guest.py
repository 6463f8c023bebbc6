"""Running a program inside a relationship's test VM: the ``GuestRun`` command (a DR drill's
check, such as "does the database answer", run where the test copy booted).

The command names a relationship, never a VM: the program runs in the test VM that the
relationship's test failover made on this host (its record in the replica's state), so no
production VM, no failed-over VM and no other VM of the host can be targeted, whatever the
broker sends. Without a test failover in place the command is refused. Every field is checked
on arrival (:func:`check_guest_run`); the host backend then runs the program through its guest
channel (:meth:`agent.hosts.base.HostBackend.guest_run`).
"""

from __future__ import annotations

import dataclasses
import logging
import re

from agent.hosts.base import HostBackend
from agent.replication.replica import ReplicaStore
from sitepair import pki
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.logsafe import shown
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.agent.guest")

MAX_PROGRAM = 1024
MAX_ARGS = 64
MAX_ARG = 4096
MAX_ARGS_TOTAL = 64 * 1024
MAX_TIMEOUT = 3600
#: An absolute path in a Linux guest (/bin/sh) or a Windows guest (C:\Windows\...).
_ABSOLUTE = re.compile(r"/|[A-Za-z]:[\\/]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class GuestRequest:
    relationship: str
    program: str
    args: tuple[str, ...]
    timeout: int


def check_guest_run(cmd: control_pb2.GuestRun) -> GuestRequest:
    """The command's fields, checked: a relationship id, an absolute guest path without control
    characters, bounded arguments without NUL, a timeout of 1 to 3600 seconds."""
    relationship = pki.check_identifier(cmd.relationship_id, "relationship id")
    program = cmd.program
    if not program or len(program) > MAX_PROGRAM:
        raise InvalidArgument(
            f"the program to run in the guest must be a path of 1 to {MAX_PROGRAM} characters"
        )
    if _CONTROL.search(program) or not _ABSOLUTE.match(program):
        raise InvalidArgument(
            f"the program to run in the guest must be an absolute path inside the guest "
            f"without control characters, not {shown(program, 80)}",
            hint="for example /bin/sh, with the command in args",
        )
    args = tuple(cmd.args)
    if len(args) > MAX_ARGS:
        raise InvalidArgument(f"{len(args)} arguments for a guest program; at most {MAX_ARGS}")
    for i, arg in enumerate(args):
        if len(arg) > MAX_ARG:
            raise InvalidArgument(f"argument {i} of the guest program is over {MAX_ARG} characters")
        if "\x00" in arg:
            raise InvalidArgument(f"argument {i} of the guest program holds a NUL character")
    if sum(len(a) for a in args) > MAX_ARGS_TOTAL:
        raise InvalidArgument(f"the guest program's arguments are over {MAX_ARGS_TOTAL} characters")
    if not 1 <= cmd.timeout_seconds <= MAX_TIMEOUT:
        raise InvalidArgument(
            f"the guest program's timeout must be 1 to {MAX_TIMEOUT} seconds, "
            f"not {cmd.timeout_seconds}"
        )
    return GuestRequest(relationship, program, args, cmd.timeout_seconds)


def run_in_test_vm(
    store: ReplicaStore, backend: HostBackend, request: GuestRequest
) -> control_pb2.GuestRunResult:
    """Run the checked request in the test VM of the replica's test failover."""
    with store.lock:
        record = store.state.tests.get("test")
        if record is None:
            raise FailedPrecondition(
                f"no test failover of {request.relationship} is in place on this host: "
                "programs run only in a test VM",
                hint="make a test failover first (a drill does), then run the program",
            )
        vm_id, vm_name = str(record["vm_id"]), str(record["vm_name"])
    log.info(
        "running a program in a test VM",
        extra={
            "fields": {
                "relationship": request.relationship,
                "vm": vm_name,
                "program": request.program,
                "timeout": request.timeout,
            }
        },
    )
    result = backend.guest_run(vm_id, request.program, list(request.args), request.timeout)
    return control_pb2.GuestRunResult(
        vm_name=vm_name,
        exit_status=result.exit_status,
        output=result.output,
        timed_out=result.timed_out,
    )
