"""The exact proof of a test failover (``agent/replication/failover.py``, ``prove_test``): real
VHDX/VHD replicas with recovery points, test VMs made by the ``directory`` backend, every block
of the test VM's disks compared with its recovery point's own chain."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from agent.hosts.base import RegisteredVm
from agent.hosts.directory import DirectoryBackend
from agent.replication import failover as fo
from agent.replication.replica import DiskState, ReplicaStore
from agent.replication.state import ReplicationState
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.v1 import control_pb2
from sitepair.vdisk import ops as vdisk_ops

MiB = 1 << 20
OS, DATA = "os", "data"
OS_SIZE, DATA_SIZE = 8 * MiB, 3 * MiB + 4096  # the data disk ends in a partial proof block
REL = "rel-1"
VM: dict[str, Any] = {
    "id": "vm-source-1",
    "name": "web01",
    "cpu_count": 1,
    "memory_mb": 512,
    "nics": [],
}


@pytest.fixture
def backend(tmp_path: Path) -> DirectoryBackend:
    return DirectoryBackend(tmp_path / "vms")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ReplicationState]:
    s = ReplicationState(tmp_path / "state" / "replication.db")
    yield s
    s.close()


@pytest.fixture
def store(tmp_path: Path) -> ReplicaStore:
    """A replica that committed sequence 3 of two disks, sealed it as a recovery point, and
    went on to sequence 4 (written into the active layer above the point)."""
    store = ReplicaStore.create(tmp_path / "replica", relationship=REL, vm_id=VM["id"], epoch=1)
    disks = {}
    for disk_id, fmt, size in ((OS, "vhdx", OS_SIZE), (DATA, "vhd", DATA_SIZE)):
        rel = f"disks/{disk_id}/base.{fmt}"
        store.path(rel).parent.mkdir(parents=True, exist_ok=True)
        with vdisk.create_disk(store.path(rel), format=fmt, subformat="dynamic", size=size) as d:
            d.write(0, b"boot sector of " + disk_id.encode())
            d.write(2 * MiB + 100, bytes(range(256)) * 40)
            d.write(size - 4096, b"the last sector")
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
        store.seal(60.0)
        for disk_id in disks:
            with vdisk.open_disk(store.latest_chain(disk_id)) as d:
                d.write(MiB, b"sequence 4, after the point")
        store.state.committed_sequence = 4
        store.save()
    return store


def proven_test_failover(
    store: ReplicaStore, backend: Any, state: ReplicationState, *, start: bool = True
) -> control_pb2.FailoverResult:
    """A test failover to point 3 with an exact proof, as ReplicationService.failover does it."""
    made = fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind="sequence",
        sequence=3,
        vm=VM,
        nic_networks={},
        start=start,
        test=True,
        now=100.0,
        prove_exact=True,
    )
    assert not made.started and not made.HasField("exact")  # registered off, not proven yet
    return fo.prove_test(store, backend, start=start)


def point_digest(store: ReplicaStore, disk_id: str) -> str:
    """What the proof must report for a disk, computed here on its own: BLAKE3 over the
    per-block digests of the point's layer (opened with its parents)."""
    layer = store.path(store.point(3).layers[disk_id])
    with vdisk.open_disk(layer, read_only=True) as d:
        return blake3.blake3(b"".join(vdisk_ops.digest(d, fo.PROOF_BLOCK))).hexdigest()


def rot(store: ReplicaStore, disk_id: str) -> None:
    """Bytes of the point's layer change at rest, as bit rot or a stray writer would."""
    with vdisk.open_disk(store.path(store.point(3).layers[disk_id])) as d:
        d.write(2 * MiB + 300, b"\x00rotten\x00")


def test_a_test_vm_is_proven_exact_then_started(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    result = proven_test_failover(store, backend, state)
    proof = result.exact
    assert proof.checked and proof.block_size == MiB
    assert proof.mismatched_blocks == 0
    assert proof.blocks_compared == 8 + 4 and proof.bytes_compared == OS_SIZE + DATA_SIZE
    assert dict(proof.disk_digests) == {
        OS: point_digest(store, OS),
        DATA: point_digest(store, DATA),
    }
    assert dict(proof.earlier_digests) == {}  # the point's first proof
    assert result.started and backend.vm_state(result.vm_id) == "running"
    # The point keeps its first proven digests, in the state file.
    reopened = ReplicaStore.open(store.root)
    assert reopened.point(3).proven_digests == dict(proof.disk_digests)
    assert reopened.state.tests["test"]["exact"]["mismatched_blocks"] == 0
    # What the test VM reads is the point, not the replica's later state (sequence 4).
    with vdisk.open_disk(backend.disk_chains(result.vm_id)[OS][-1], read_only=True) as d:
        assert d.read(MiB, 8) == bytes(8)


def test_a_point_changed_at_rest_shows_in_a_later_proof(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    first = proven_test_failover(store, backend, state)
    assert fo.cleanup_test(store, backend).done
    rot(store, DATA)
    later = proven_test_failover(store, backend, state)
    # The test VM reads the point as it is now, so no block differs between them; but the
    # data disk's digest moved since the point was first proven.
    assert later.exact.mismatched_blocks == 0
    assert dict(later.exact.earlier_digests) == dict(first.exact.disk_digests)
    assert later.exact.disk_digests[OS] == first.exact.disk_digests[OS]
    assert later.exact.disk_digests[DATA] != first.exact.disk_digests[DATA]
    assert later.exact.disk_digests[DATA] == point_digest(store, DATA)
    # The finding is not an error; the VM is made, and kept off.
    assert not later.started and backend.vm_state(later.vm_id) == "off"
    assert store.point(3).proven_digests == dict(first.exact.disk_digests)


class WrongCopyBackend(DirectoryBackend):
    """A backend whose test VM does not read its point: after registering, one block of the
    new child layer holds other bytes (a faulty copy or differencing layer)."""

    def register_vm(self, name: str, **kw: Any) -> RegisteredVm:
        made = super().register_vm(name, **kw)
        with vdisk.open_disk(self.disk_chains(name)[OS][-1]) as child:
            child.write(5 * MiB + 7, b"not the point")
        return made


def test_a_test_vm_that_differs_from_its_point_is_found_and_kept_off(
    store: ReplicaStore, state: ReplicationState, tmp_path: Path
) -> None:
    backend = WrongCopyBackend(tmp_path / "vms")
    result = proven_test_failover(store, backend, state)
    assert result.exact.mismatched_blocks == 1
    assert dict(result.exact.disk_digests) == {
        OS: point_digest(store, OS),  # the point's digests, not the copy's
        DATA: point_digest(store, DATA),
    }
    assert not result.started and backend.vm_state(result.vm_id) == "off"


def test_a_repeated_command_answers_the_recorded_proof(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    first = proven_test_failover(store, backend, state, start=False)
    rot(store, OS)  # a proof made again would read this
    again = fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind="sequence",
        sequence=3,
        vm=VM,
        nic_networks={},
        start=False,
        test=True,
        now=200.0,
        prove_exact=True,
    )
    assert again == first
    assert fo.prove_test(store, backend, start=False) == first
    # After an agent restart too, from the state file.
    assert fo.prove_test(ReplicaStore.open(store.root), backend, start=False) == first
    # A start a crash cut short is finished by the repetition, from the recorded proof.
    started = fo.prove_test(store, backend, start=True)
    assert started.started and started.exact == first.exact
    assert backend.vm_state(first.vm_id) == "running"


def test_the_disks_are_read_without_the_store_lock(
    store: ReplicaStore,
    backend: DirectoryBackend,
    state: ReplicationState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replication commits into the replica (under the store's lock) while a proof reads."""
    real = vdisk_ops.iter_digests
    free: list[bool] = []

    def reading(disk: vdisk.VirtualDisk, block: int) -> Iterator[Any]:
        def other_thread() -> None:
            got = store.lock.acquire(blocking=False)
            free.append(got)
            if got:
                store.lock.release()

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        yield from real(disk, block)

    monkeypatch.setattr(vdisk_ops, "iter_digests", reading)
    assert proven_test_failover(store, backend, state).exact.mismatched_blocks == 0
    assert free == [True] * 4  # two disks, two sides


def test_proofs_of_what_cannot_be_proven_are_refused(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    with pytest.raises(FailedPrecondition, match="no test failover of rel-1 is in place"):
        fo.prove_test(store, backend, start=True)
    with pytest.raises(InvalidArgument, match="test failover only"):
        fo.failover(
            store,
            backend,
            state,
            epoch=2,
            point_kind=fo.LATEST,
            sequence=0,
            vm=VM,
            nic_networks={},
            start=False,
            test=False,
            now=100.0,
            prove_exact=True,
        )
    assert store.state.failover is None
    # A test VM made without a proof may have run and written its disks: not proven later.
    fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind=fo.LATEST,
        sequence=0,
        vm=VM,
        nic_networks={},
        start=True,
        test=True,
        now=100.0,
    )
    with pytest.raises(FailedPrecondition, match="made without an exact proof"):
        fo.prove_test(store, backend, start=True)


def test_a_state_file_from_before_exact_proofs_loads(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind="sequence",
        sequence=3,
        vm=VM,
        nic_networks={},
        start=False,
        test=True,
        now=100.0,
    )
    # Written by an agent that knew no proofs: no proven_digests, no prove_exact in the record.
    doc = json.loads((store.root / "state.json").read_bytes())
    for point in doc["points"]:
        del point["proven_digests"]
    del doc["tests"]["test"]["prove_exact"]
    (store.root / "state.json").write_text(json.dumps(doc))
    old = ReplicaStore.open(store.root)
    assert old.point(3).proven_digests == {}
    assert not fo.failover_result(REL, old.state.tests["test"]).HasField("exact")
    assert fo.cleanup_test(old, backend).done
    assert proven_test_failover(old, backend, state).exact.mismatched_blocks == 0


def test_pruning_leaves_the_layers_of_a_pinned_later_point_alone(
    store: ReplicaStore, backend: DirectoryBackend, state: ReplicationState
) -> None:
    """A test VM over the newest of several points: replication goes on and seals more points
    than the policy keeps; merging the oldest ones away would rewrite and delete layers the
    test VM runs on (they are below its point), so no point is merged while one is pinned."""

    def commit_and_seal(sequence: int) -> None:
        with store.lock:
            for disk_id in store.state.disks:
                with vdisk.open_disk(store.latest_chain(disk_id)) as d:
                    d.write(3 * MiB, f"sequence {sequence}".encode())
            store.state.committed_sequence = sequence
            store.save()
        store.maybe_seal(max_points=3, interval=0, app_consistent=False, force=True)

    commit_and_seal(5)  # sequence 4 is in the layer sealed with 5
    commit_and_seal(6)
    assert [p.sequence for p in store.state.points] == [3, 5, 6]
    made = fo.failover(
        store,
        backend,
        state,
        epoch=1,
        point_kind="sequence",
        sequence=6,
        vm=VM,
        nic_networks={},
        start=False,
        test=True,
        now=100.0,
        prove_exact=True,
    )
    proof = fo.prove_test(store, backend, start=False).exact
    commit_and_seal(7)
    commit_and_seal(8)
    assert [p.sequence for p in store.state.points] == [3, 5, 6, 7, 8]  # 6 is pinned
    again = fo.compare_chains(
        fo.point_chains(store, store.point(6)), backend.disk_chains(made.vm_id)
    )
    assert again["mismatched_blocks"] == 0 and again["disk_digests"] == dict(proof.disk_digests)
    # Once the test VM is cleaned up, the next seal prunes back to the policy's three points.
    fo.cleanup_test(store, backend)
    commit_and_seal(9)
    assert [p.sequence for p in store.state.points] == [7, 8, 9]
