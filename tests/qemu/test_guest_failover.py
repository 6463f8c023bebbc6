"""A running guest protected, replicated while it writes, failed over and booted on the
recovery site, failed back, and lost with its host: the guest itself checks its data each time.

What each test shows (issue 13):
* replication of a running guest: after each cycle the replica equals the source's cut byte for
  byte, for sitepair and for ``qemu-img compare``;
* test failover: a test VM boots on the recovery host from a recovery point, with no network,
  while replication goes on; cleanup removes it;
* planned failover with reverse replication: the guest is shut down through ACPI, the last cycle
  sent, and the VM boots on the recovery host, where the guest finds every record it
  acknowledged before the shutdown; it writes more, and a failback boots it on the original
  host with every record written on the recovery site;
* unplanned failover after the source's QEMU and agent are killed: the VM boots from the latest
  recovery point, fsck finds the filesystem consistent (or replays its journal), and every record
  acknowledged before that point's cut is there;
* the source agent restarted while the guest runs: the next cycle is still byte-exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sitepair import vdisk
from sitepair.v1 import admin_pb2
from tests.qemu.conftest import Sites, eventually, inventory_has
from tests.support.guest import ConsoleLog

pytestmark = pytest.mark.timeout(900)


def protect(s: Sites, vm: str = "web01") -> None:
    s.make_guest(vm)
    eventually(lambda: inventory_has(s.admin, vm), what="the VM in the broker's inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))
    eventually(lambda: s.protected(vm).state == "protected", timeout=120, what="protected")


def same_bytes(source: Path, replica: Path) -> None:
    """The replica holds exactly the source's guest bytes: as sitepair reads both, and as QEMU's
    own ``qemu-img`` reads the source (it cannot open the replica's differencing VHDX layers)."""
    with (
        vdisk.open_disk(source, read_only=True) as ds,
        vdisk.open_disk(replica, read_only=True) as dr,
    ):
        assert ds.virtual_size == dr.virtual_size
        ours = dr.read(0, dr.virtual_size)
        assert ds.read(0, ds.virtual_size) == ours, (source, replica)
    raw = replica.with_name(replica.name + ".qemu.raw")
    out = subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", str(source), str(raw)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    try:
        assert raw.read_bytes() == ours
    finally:
        raw.unlink()


def source_bases(s: Sites, vm: str) -> dict[str, Path]:
    """The source VM's base images: once a cycle is released they are exactly its cut."""
    return {d: chain[0] for d, chain in s.a.backend.disk_chains(vm).items()}


def boots_and_verifies(console: ConsoleLog, *, at_least: int) -> None:
    verify = console.wait_for(lambda c: c.verify(), timeout=180, what="SITEPAIR VERIFY")
    fsck = console.fsck()
    assert fsck is not None and fsck.consistent, console.tail()
    assert verify.ok, console.tail()
    assert verify.last >= at_least, (verify, at_least)
    assert verify.count == verify.last


def test_replicate_test_failover_planned_failover_and_failback(sites: Sites) -> None:
    s = sites
    protect(s)
    a_console = s.a.console("web01")

    # Replication while the guest writes: each cycle's replica is the source's cut.
    for _ in range(2):
        goal = a_console.last_ack() + 3
        a_console.wait_for(lambda c, goal=goal: c.last_ack() >= goal, timeout=120)
        s.cycle("web01")
        replica = s.replica_tops("web01")
        for disk, base in source_bases(s, "web01").items():
            same_bytes(base, replica[disk])

    # A test failover boots from a recovery point on the recovery host, with no network,
    # while replication continues; cleanup removes it.
    acked = a_console.last_ack()
    s.cycle("web01")
    s.job(s.admin.call(s.admin.stub.Failover, admin_pb2.FailoverRequest(vm="web01", type="test")))
    boots_and_verifies(s.b.console("web01-test"), at_least=acked)
    s.cycle("web01")  # replication is not disturbed
    s.job(s.admin.call(s.admin.stub.CleanupTestFailover, admin_pb2.CleanupTestRequest(vm="web01")))
    assert s.b.backend.vm_id_of("web01-test") is None

    # Planned failover: ACPI shutdown, the last cycle, the VM boots on site B and finds every
    # record it acknowledged on site A.
    s.job(
        s.admin.call(
            s.admin.stub.Failover,
            admin_pb2.FailoverRequest(vm="web01", type="planned", reverse=True),
        )
    )
    assert a_console.shutdown_clean(), a_console.tail()
    last_on_a = a_console.last_ack()
    b_console = s.b.console("web01")
    boots_and_verifies(b_console, at_least=last_on_a)
    b_console.wait_for(lambda c: c.last_ack() >= last_on_a + 5, timeout=120)

    # Failback: reverse replication runs from B to A; a planned failover brings the VM home,
    # where it finds every record written on site B.
    eventually(
        lambda: s.protected("web01").state == "protected", timeout=180, what="reverse protected"
    )
    s.cycle("web01")
    s.job(
        s.admin.call(
            s.admin.stub.Failover,
            admin_pb2.FailoverRequest(vm="web01", type="planned", reverse=True),
        )
    )
    assert b_console.shutdown_clean(), b_console.tail()
    boots_and_verifies(s.a.console("web01"), at_least=b_console.last_ack())


def test_unplanned_failover_after_the_source_host_dies(sites: Sites) -> None:
    s = sites
    protect(s)
    a_console = s.a.console("web01")
    a_console.wait_for(lambda c: c.last_ack() >= 5, timeout=120)

    # The source agent restarts while the guest runs: tracking goes on (or resyncs), and the
    # next cycle is byte-exact either way.
    s.a.stop()
    s.a.start()
    acked_before_cut = a_console.last_ack()
    s.cycle("web01")
    replica = s.replica_tops("web01")
    for disk, base in source_bases(s, "web01").items():
        same_bytes(base, replica[disk])

    # The site is lost: QEMU and the agent killed mid-write.
    pid = s.a.qemu_pid("web01")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    s.a.stop()
    s.job(
        s.admin.call(s.admin.stub.Failover, admin_pb2.FailoverRequest(vm="web01", type="unplanned"))
    )
    boots_and_verifies(s.b.console("web01"), at_least=acked_before_cut)
