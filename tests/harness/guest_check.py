"""How a copy is checked when the VM is a real guest (``--backend qemu``).

With the ``directory`` backend the harness writes into the disks itself and checks each copy
against its own write log (:func:`tests.harness.workload.check_prefix`). A real guest's disks
are written by its own kernel through QEMU, so the checks are:

* **the guest's own verification at boot** (:func:`check_boot`): a copy that was failed over
  (test, planned, unplanned, failback) is booted, and the guest runs ``e2fsck`` on its data
  disk (``SITEPAIR FSCK``: consistent means clean, or clean once its journal was replayed) and
  then checks every record its log lists against the record's digest (``SITEPAIR VERIFY``:
  ``ok=1``, no gap, no bad digest). The records must reach at least the last one the guest
  acknowledged on its console before the cut that copy was made from: for a planned failover
  the last one before its clean shutdown (the final cycle), for a test or unplanned failover
  the last one acknowledged before the latest committed cycle was asked for. Acknowledged
  means durable in the guest (written, fsynced, logged, fsynced), so a copy with fewer lost
  writes the guest was told were safe.
* **byte equality at a quiet point** (:func:`check_same_bytes`): once a cycle is released, the
  source's base image (``disk_chains(vm)[disk][0]``; the qemu backend's tracking overlays sit
  above it) is exactly that cycle's cut, so it must equal the replica's latest layer, both
  read with ``sitepair.vdisk`` (the replica's is a differencing VHDX chain).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sitepair import vdisk
from tests.harness.report import ScenarioReport
from tests.support.guest import ConsoleLog, GuestTimeout, VerifyReport

#: Seconds a failed-over guest gets to boot and verify under TCG (it takes well under one).
BOOT_TIMEOUT = 240.0
#: Seconds a running guest gets to acknowledge the awaited record (one takes about a second).
ACK_TIMEOUT = 180.0
_CHUNK = 4 << 20


class GuestStopped(AssertionError):
    """The guest's writer stopped (its data disk is full, or it refused to write) while a
    scenario waited for more records."""


def wait_ack(console: ConsoleLog, seq: int, *, timeout: float = ACK_TIMEOUT) -> int:
    """Wait until the guest has acknowledged record ``seq`` in this boot; its last ACK."""

    def reached(c: ConsoleLog) -> int | None:
        last = c.last_ack()
        if last >= seq:
            return last
        for line in c.lines():
            if line.startswith(("SITEPAIR WRITER ", "SITEPAIR READY writer=0")):
                raise GuestStopped(f"waiting for record {seq}: {line}; console {c.path}")
        return None

    return console.wait_for(reached, timeout, what=f"SITEPAIR ACK {seq}")


def check_boot(
    report: ScenarioReport, what: str, console: ConsoleLog, *, at_least: int
) -> VerifyReport | None:
    """The copy booted and the guest found its filesystem consistent and every record up to
    at least ``at_least`` (acknowledged before the copy's cut) intact. Two checks in the report;
    returns the guest's VERIFY (None if it never printed one)."""
    try:
        verify = console.wait_for(ConsoleLog.verify, BOOT_TIMEOUT, what="SITEPAIR VERIFY")
    except GuestTimeout as exc:
        report.check(f"{what}: boots and verifies its data", False, str(exc)[-800:])
        return None
    fsck = console.fsck()
    report.check(
        f"{what}: fsck finds the data filesystem consistent",
        fsck is not None and fsck.consistent,
        (
            f"verdict {fsck.verdict} (e2fsck -p {fsck.preen}, -fn {fsck.check}, "
            f"journal replayed: {fsck.journal})"
            if fsck is not None
            else f"no SITEPAIR FSCK line; console {console.path}:\n{console.tail(15)}"
        ),
    )
    detail = (
        f"VERIFY count={verify.count} last={verify.last} ok={int(verify.ok)} "
        f"torn={int(verify.torn)}; {at_least} acknowledged before the cut"
    )
    if verify.bad is not None:
        detail += f"; bad record {verify.bad} ({verify.reason})"
    report.check(
        f"{what}: every record acknowledged before the cut is there, intact",
        verify.ok and verify.count == verify.last and verify.last >= at_least,
        detail,
    )
    return verify


def check_same_bytes(
    report: ScenarioReport, what: str, source: dict[str, Path], replica: dict[str, Path]
) -> None:
    """Each disk's ``source`` image (a released cut: the source VM's base) holds exactly the
    bytes of the ``replica``'s layer (with its parents), as ``sitepair.vdisk`` reads both; one
    check per disk, named ``what (<disk> disk)``."""
    for disk in sorted(source):
        if disk not in replica:
            report.check(f"{what} ({disk} disk)", False, f"no {disk} disk in {sorted(replica)}")
            continue
        report.check(f"{what} ({disk} disk)", *_compare(source[disk], replica[disk]))


def _compare(a: Path, b: Path) -> tuple[bool, str]:
    with vdisk.open_disk(a, read_only=True) as da, vdisk.open_disk(b, read_only=True) as db:
        if da.virtual_size != db.virtual_size:
            return False, f"virtual size {da.virtual_size} vs {db.virtual_size}"
        digest = hashlib.sha256()
        for offset in range(0, da.virtual_size, _CHUNK):
            n = min(_CHUNK, da.virtual_size - offset)
            ours, theirs = da.read(offset, n), db.read(offset, n)
            if ours != theirs:
                first = next(i for i in range(n) if ours[i] != theirs[i])
                return False, f"first difference at byte {offset + first} ({a.name} vs {b.name})"
            digest.update(ours)
        return True, f"{da.virtual_size >> 20} MiB, sha256 {digest.hexdigest()[:16]}"
