"""A program run inside a test VM made by the qemu backend, through the real qemu-guest-agent
in the test guest (tests/support/guest.py starts it when the VM has the
``org.qemu.guest_agent.0`` port, which every qemu-backend VM has, test VMs included).

The replica here is the guest's disks placed as a replica's base layers; the test failover
flattens them into the test VM's own VHDX files, the exact proof compares those with the point,
and the VM boots from them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.hosts import qemu_vm
from agent.hosts.qemu import QemuBackend
from agent.hosts.qemu_vm import Runtime
from agent.replication import failover as fo
from agent.replication import guest
from agent.replication.replica import DiskState, ReplicaStore
from agent.replication.state import ReplicationState
from sitepair import vdisk
from sitepair.errors import FailedPrecondition
from sitepair.v1 import control_pb2
from tests.support.guest import ConsoleLog, GuestImage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def guest_replica(root: Path, image: GuestImage, scratch: Path) -> ReplicaStore:
    """A replica that committed sequence 1: the guest's boot and data disks."""
    store = ReplicaStore.create(root, relationship="rel-1", vm_id="vm-1", epoch=1)
    boot, data = image.copy_disks(scratch)
    disks = {}
    for disk_id, source in (("boot", boot), ("data", data)):
        rel = f"disks/{disk_id}/base.vhdx"
        store.path(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, store.path(rel))
        with vdisk.open_disk(store.path(rel), read_only=True) as d:
            disks[disk_id] = DiskState(
                virtual_size=d.virtual_size,
                format="vhdx",
                logical_sector_size=d.logical_sector_size,
                physical_sector_size=d.physical_sector_size,
                chain=[rel],
            )
    with store.lock:
        store.state.disks = disks
        store.state.committed_sequence = 1
        store.save()
    return store


def request(*args: str, timeout: int = 120, program: str = "/bin/sh") -> guest.GuestRequest:
    return guest.check_guest_run(
        control_pb2.GuestRun(
            relationship_id="rel-1", program=program, args=list(args), timeout_seconds=timeout
        )
    )


def test_a_program_runs_in_a_proven_test_vm(guest_image: GuestImage, tmp_path: Path) -> None:
    backend = QemuBackend(tmp_path / "vms", accel="tcg", stop_timeout=30)
    store = guest_replica(tmp_path / "replica", guest_image, tmp_path / "images")
    state = ReplicationState(tmp_path / "state" / "replication.db")
    vm = {"id": "vm-1", "name": "db01", "cpu_count": 1, "memory_mb": 256, "generation": 1}
    try:
        fo.failover(
            store,
            backend,
            state,
            epoch=1,
            point_kind=fo.LATEST,
            sequence=0,
            vm=vm,
            nic_networks={},
            start=True,
            test=True,
            now=100.0,
            prove_exact=True,
        )
        result = fo.prove_test(store, backend, start=True)
        # The flattened copy is the point, block for block.
        assert result.exact.checked and result.exact.mismatched_blocks == 0
        assert result.exact.blocks_compared > 0 and result.started

        folder, _ = backend.find_vm("db01-test")
        console = ConsoleLog(Runtime(folder).serial)
        console.wait_for(
            lambda c: "SITEPAIR QGA started" in c.text(),
            timeout=180,
            what="the guest agent in the test VM",
        )
        ran = guest.run_in_test_vm(
            store, backend, request("-c", "echo hello; echo trouble >&2; exit 3")
        )
        assert ran.vm_name == "db01-test"
        assert (ran.exit_status, ran.timed_out) == (3, False)
        assert ran.output == "hello\ntrouble\n"

        slow = guest.run_in_test_vm(store, backend, request("-c", "sleep 60", timeout=2))
        assert slow.timed_out and slow.exit_status == -1

        with pytest.raises(FailedPrecondition, match="the guest agent refused guest-exec"):
            guest.run_in_test_vm(store, backend, request(program="/no/such/program"))
    finally:
        state.close()
        for f in backend.list_vm_dirs():
            inst = qemu_vm.running_instance(Runtime(f))
            if inst is not None:
                qemu_vm.kill(inst)
