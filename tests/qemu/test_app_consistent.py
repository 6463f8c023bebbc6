"""Application-consistent cuts of a guest that runs the real qemu-guest-agent.

The cut freezes the guest's filesystems (``guest-fsfreeze-freeze``) for the QMP snapshot
transaction only. A VM booted from such a cut finds its ext4 filesystem clean: nothing to replay
from the journal, every acknowledged record there. The guest keeps writing after the cut (it was
thawed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hosts import qemu_vm
from agent.hosts.qemu import QemuBackend
from agent.hosts.qemu_vm import Runtime
from tests.support.guest import ConsoleLog, GuestImage

pytestmark = pytest.mark.timeout(600)


def test_an_app_consistent_cut_boots_clean_and_the_guest_goes_on(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    backend = QemuBackend(tmp_path / "vms", accel="tcg", stop_timeout=30)
    boot, data = guest_image.copy_disks(tmp_path / "images")
    backend.create_vm("db01", disks=[("boot", "vhdx", boot), ("data", "vhdx", data)])
    backend.set_vm_state("db01", "running")
    folder, _ = backend.find_vm("db01")
    console = ConsoleLog(Runtime(folder).serial)
    try:
        console.wait_for(
            lambda c: "SITEPAIR QGA started" in c.text() and c.last_ack() >= 3,
            timeout=180,
            what="the guest agent and three records",
        )
        acked = console.last_ack()
        cut = backend.take_cut("db01", app_consistent=True)
        assert cut.app_consistent
        # Thawed: the guest goes on writing.
        console.wait_for(lambda c: c.last_ack() >= acked + 3, timeout=120, what="more records")

        # A VM of the cut (as a failover makes one) boots on a clean filesystem.
        chains = {fd.disk_id: list(fd.chain) for fd in cut.disks}
        backend.register_vm(
            "db01-copy",
            vm_id="db01-copy",
            disks=[("boot", chains["boot"]), ("data", chains["data"])],
            cpu=1,
            memory_mb=256,
            generation=1,
            state="running",
        )
        copy_folder, _ = backend.find_vm("db01-copy")
        copy = ConsoleLog(Runtime(copy_folder).serial)
        verify = copy.wait_for(lambda c: c.verify(), timeout=180, what="SITEPAIR VERIFY")
        fsck = copy.fsck()
        assert fsck is not None and fsck.verdict == "clean", copy.tail()
        assert verify.ok and verify.last >= acked, (verify, acked)
        backend.release_cut("db01", cut.cut_id)
    finally:
        for f in backend.list_vm_dirs():
            inst = qemu_vm.running_instance(Runtime(f))
            if inst is not None:
                qemu_vm.kill(inst)
