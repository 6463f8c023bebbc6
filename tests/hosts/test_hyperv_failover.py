"""Agent-side failover (``agent/replication/failover.py``) on the ``hyperv`` backend: the same
code that runs on the directory backend, here over ``HyperVBackend`` and ``FakeHyperVApi`` (a
simulation of Hyper-V over real VHDX/VHD files; Hyper-V itself cannot run here). A failover
and its cancel, a failback over the fenced old primary and its cancel, a test failover and its
cleanup each leave the host and the replica as they were."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.hosts.hyperv import HyperVBackend
from agent.hosts.hyperv_api import HvVm
from agent.replication import failover as fo
from agent.replication.replica import DiskState, ReplicaStore
from agent.replication.state import ReplicationState
from sitepair import vdisk
from tests.hosts.fake_hyperv import FakeHyperVApi

MiB = 1 << 20
OS, DATA = "scsi0-0", "scsi0-1"
REL = "rel-1"


@pytest.fixture
def hv(tmp_path: Path) -> FakeHyperVApi:
    return FakeHyperVApi(tmp_path / "host")


@pytest.fixture
def backend(hv: FakeHyperVApi, tmp_path: Path) -> HyperVBackend:
    return HyperVBackend(tmp_path / "agent", hv)


@pytest.fixture
def state(tmp_path: Path) -> ReplicationState:
    return ReplicationState(tmp_path / "state" / "replication.db")


def make_replica(root: Path, vm_id: str) -> ReplicaStore:
    """A replica that committed sequence 3 of a Hyper-V VM's two disks (named by slot, as the
    hyperv backend names the disks of a VM sitepair did not make)."""
    store = ReplicaStore.create(root, relationship=REL, vm_id=vm_id, epoch=1)
    disks = {}
    for disk_id, fmt, size, data in (
        (OS, "vhdx", 4 * MiB, b"replica os"),
        (DATA, "vhd", 2 * MiB, b"replica data"),
    ):
        rel = f"disks/{disk_id}/base.{fmt}"
        store.path(rel).parent.mkdir(parents=True, exist_ok=True)
        with vdisk.create_disk(
            store.path(rel),
            format=fmt,
            subformat="dynamic",
            size=size,
            block_size=MiB if fmt == "vhdx" else None,
        ) as d:
            d.write(0, data)
            logical, physical = d.logical_sector_size, d.physical_sector_size
        disks[disk_id] = DiskState(
            virtual_size=size,
            format=fmt,
            logical_sector_size=logical,
            physical_sector_size=physical,
            chain=[rel],
        )
    with store.lock:
        store.state.disks = disks
        store.state.committed_sequence = 3
        store.state.cut_at = 50.0
        store.save()
    return store


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def vm_doc(vm_id: str) -> dict[str, Any]:
    return {
        "id": vm_id,
        "name": "web01",
        "cpu_count": 2,
        "memory_mb": 2048,
        "generation": 2,
        "nics": [{"name": "eth0"}, {"name": "mgmt"}],
    }


def test_failover_and_cancel(
    backend: HyperVBackend, hv: FakeHyperVApi, state: ReplicationState, tmp_path: Path
) -> None:
    store = make_replica(tmp_path / "replica", "vm-source-1")
    result = fo.failover(
        store,
        backend,
        state,
        epoch=2,
        point_kind=fo.LATEST,
        sequence=0,
        vm=vm_doc("vm-source-1"),
        nic_networks={"eth0": "dmz"},
        start=True,
        test=False,
        now=100.0,
    )
    replica_before = files_under(tmp_path / "replica" / "disks")  # the point sealed
    record = store.state.failover  # what the agent keeps; the broker is told ``result``
    assert record is not None and result == fo.failover_result(store.state.relationship, record)
    assert (result.vm_name, result.epoch, result.test, result.started) == ("web01", 2, False, True)
    assert record["vm_folder"] == str(backend.vm_dir("web01")) and record["previous_vm"] is None
    (made,) = hv.vms.values()
    assert (made.name, made.state) == ("web01", "Running")
    assert backend.vm_id_of("web01") == "vm-source-1"
    assert [(n.name, n.switch) for n in made.nics] == [("eth0", "dmz"), ("mgmt", "")]
    assert sorted(str(d.chain[-1]) for d in made.drives.values()) == sorted(record["children"])
    assert hv.guest_read(made.id, OS, 0, 10) == b"replica os"
    hv.guest_write(made.id, OS, 0, b"the failed-over VM writes its own layer")
    assert files_under(tmp_path / "replica" / "disks") == replica_before

    # The agent restarts: the record comes back from the replica's state.json.
    store = ReplicaStore.open(tmp_path / "replica")
    assert store.state.failover == record
    assert fo.cancel(store, HyperVBackend(tmp_path / "agent", hv), state, epoch=2).done
    assert not hv.vms and not backend.vm_dir("web01").exists()
    assert not any(Path(c).exists() for c in record["children"])
    assert files_under(tmp_path / "replica" / "disks") == replica_before
    after = ReplicaStore.open(tmp_path / "replica").state  # as saved
    assert after.failover is None and all(not p.pins for p in after.points)
    assert fo.cancel(store, backend, state, epoch=2).done is False


@pytest.fixture
def old_primary(hv: FakeHyperVApi, backend: HyperVBackend) -> HvVm:
    """The old primary on this host, fenced (off): a VM sitepair did not make, so its sitepair
    id is its Hyper-V id; protected before (tracking state of it exists)."""
    made = hv.add_vm(
        "web01",
        [(OS, "vhdx", 4 * MiB), (DATA, "vhd", 2 * MiB)],
        nics=[("eth0", "prod"), ("mgmt", "")],
        block_size=MiB,
    )
    hv.set_power(made.id, "start")
    hv.guest_write(made.id, OS, 0, b"old primary")
    cut = backend.take_cut(made.id)
    backend.release_cut(made.id, cut.cut_id)
    hv.set_power(made.id, "stop")
    return hv.get_vm(made.id)


def test_failback_over_the_old_primary_and_cancel(
    backend: HyperVBackend,
    hv: FakeHyperVApi,
    state: ReplicationState,
    old_primary: HvVm,
    tmp_path: Path,
) -> None:
    old = old_primary
    old_files = files_under(tmp_path / "host")
    store = make_replica(tmp_path / "replica", old.id)
    fo.failover(
        store,
        backend,
        state,
        epoch=3,
        point_kind=fo.LATEST,
        sequence=0,
        vm=vm_doc(old.id),
        nic_networks={"eth0": "prod"},
        start=False,
        test=False,
        now=100.0,
    )
    # The old VM was replaced (same name and id); its definition is in the record, as JSON.
    assert old.id not in hv.vms and len(hv.vms) == 1
    record = store.state.failover
    assert record is not None
    assert json.loads(record["previous_vm"])["drives"] == [
        {"slot": d.slot, "path": d.path} for d in old.drives
    ]
    (new,) = hv.vms.values()
    assert hv.guest_read(new.id, OS, 0, 10) == b"replica os"

    store = ReplicaStore.open(tmp_path / "replica")
    fo.cancel(store, HyperVBackend(tmp_path / "agent", hv), state, epoch=3)
    (back,) = hv.vms.values()
    assert backend.vm_id_of("web01") == old.id  # the broker's id of it, kept in its Notes
    got = hv.get_vm(back.id)
    assert got.drives == old.drives and (got.cpu_count, got.memory_mb) == (2, 2048)
    assert [(n.name, n.switch) for n in got.nics] == [("eth0", "prod"), ("mgmt", "")]
    assert files_under(tmp_path / "host") == old_files  # its disks untouched
    assert hv.guest_read(back.id, OS, 0, 11) == b"old primary"
    assert not backend.vm_dir("web01").exists()
    # Its tracking did not survive the replace: the next cut of it is untrusted.
    backend.set_vm_state(old.id, "running")
    assert not backend.take_cut(old.id).trusted


def test_test_failover_and_cleanup(
    backend: HyperVBackend, hv: FakeHyperVApi, state: ReplicationState, tmp_path: Path
) -> None:
    store = make_replica(tmp_path / "replica", "vm-source-1")
    result = fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind=fo.LATEST,
        sequence=0,
        vm=vm_doc("vm-source-1"),
        nic_networks={},
        start=True,
        test=True,
        now=100.0,
    )
    replica_before = files_under(tmp_path / "replica" / "disks")
    (made,) = hv.vms.values()
    assert made.name == "web01-test" and made.state == "Running"
    assert result.test and result.vm_name == "web01-test"
    assert result.vm_id != "vm-source-1" and backend.vm_id_of("web01-test") == result.vm_id
    assert all(n.switch == "" for n in made.nics)  # isolated: not connected
    hv.guest_write(made.id, DATA, 0, b"test")
    cleaned = fo.cleanup_test(store, backend)
    assert cleaned.done and cleaned.vm_name == "web01-test"
    assert not hv.vms and not backend.vm_dir("web01-test").exists()
    assert files_under(tmp_path / "replica" / "disks") == replica_before
    assert not store.state.tests
    assert fo.cleanup_test(store, backend).done is False
