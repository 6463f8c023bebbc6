"""What a drill's checks and a recovery host's exact proof may be: each checked before it is
stored or believed (a plan's checks live in its document, ``doc["checks"]``; a proof comes from
another host). :mod:`broker.drills` runs the drills."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from broker.orchestration import StepFailed
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2, control_pb2

CHECK_KINDS = ("script", "guest")
#: Checks one plan may have.
MAX_CHECKS = 32
#: Arguments of one check, and characters of one argument.
MAX_ARGS, MAX_ARG, MAX_ARGS_TOTAL = 64, 4096, 64 * 1024
#: Characters of a check's name and of a guest program's path.
MAX_NAME, MAX_PROGRAM = 128, 1024
#: A check's timeout, seconds: 1 s to 1 h.
MAX_CHECK_TIMEOUT = 3600
#: Characters of a check's output kept in the evidence (its tail).
OUTPUT_TAIL = 4096
#: Disks of one exact proof, and characters of a disk id or a digest in it.
MAX_PROOF_DISKS, MAX_PROOF_TEXT = 64, 256


# -- checks: stored in the plan's document, ``doc["checks"]`` ---------------------------------
def check_text(value: str, what: str, limit: int) -> str:
    if not value or len(value) > limit or not value.isprintable():
        raise InvalidArgument(f"{what} must be 1 to {limit} printable characters, not {value!r}")
    return value


def check_program(kind: str, program: str) -> str:
    """A script is a bare file name in the recovery agent's scripts folder (the agent refuses
    anything else too); a guest program is an absolute path inside the test VM."""
    if kind == "script":
        check_text(program, "a check script", MAX_NAME)
        if PurePosixPath(program).name != program or "\\" in program or program.startswith("."):
            raise InvalidArgument(
                f"--script {program!r} must be a file name in the recovery agent's scripts "
                "folder (no folders, not hidden)",
                hint="put the script in the scripts folder of the recovery hosts' agents",
            )
        return program
    check_text(program, "a guest program", MAX_PROGRAM)
    if not (PurePosixPath(program).is_absolute() or PureWindowsPath(program).is_absolute()):
        raise InvalidArgument(
            f"--guest {program!r} must be an absolute path inside the VM "
            "(e.g. /usr/local/bin/check-web)"
        )
    return program


def checks_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = doc.setdefault("checks", [])
    return checks


def plan_vms(doc: dict[str, Any]) -> list[str]:
    return [rid for g in doc["groups"] for rid in g["vms"]]


def check_proto(check: dict[str, Any], names: dict[str, str]) -> admin_pb2.PlanCheck:
    """A stored check as the admin API shows it (``names``: relationship id -> VM name)."""
    rid = check.get("relationship", "")
    return admin_pb2.PlanCheck(
        name=check["name"],
        kind=check["kind"],
        vm=names.get(rid, rid),
        relationship_id=rid,
        program=check["program"],
        args=check.get("args", []),
        timeout_seconds=int(check.get("timeout", 0)),
    )


# -- evidence from the wire ------------------------------------------------------------------
def accept_proof(proof: control_pb2.ExactProof) -> control_pb2.ExactProof:
    """An exact proof as a recovery host sent it, checked before it is kept: bounded maps of
    printable disk ids and hexadecimal digests."""
    for field in (proof.disk_digests, proof.earlier_digests):
        if len(field) > MAX_PROOF_DISKS:
            raise StepFailed(
                f"the exact proof names {len(field)} disks (at most {MAX_PROOF_DISKS})"
            )
        for disk, digest in field.items():
            if not disk or len(disk) > MAX_PROOF_TEXT or not disk.isprintable():
                raise StepFailed("the exact proof names a disk by an unprintable or long id")
            if len(digest) > MAX_PROOF_TEXT or any(c not in "0123456789abcdef" for c in digest):
                raise StepFailed(f"the exact proof of disk {disk} has a digest that is not hex")
    return proof


def changed_at_rest(proof: control_pb2.ExactProof) -> list[str]:
    """Disks whose digest differs from the one an earlier proof of the same point recorded."""
    return sorted(
        d
        for d, earlier in proof.earlier_digests.items()
        if earlier and earlier != proof.disk_digests.get(d)
    )


def output_tail(text: str) -> str:
    return text[-OUTPUT_TAIL:]
