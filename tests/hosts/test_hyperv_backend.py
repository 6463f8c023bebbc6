"""The ``hyperv`` backend against FakeHyperVApi (a simulation of Hyper-V over real VHDX/VHD
files; Hyper-V itself cannot run here): the same properties the directory backend's tests
check (cuts hold exactly what the guest wrote at that instant, ``changed`` is exact and unions
until released, release folds layers back, outstanding cuts survive restarts, lost RCT history
means untrusted until a resync), VM registration for failover, power and NICs, and the real
replication engine end to end."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, BackendConfig, NetworkConfig
from agent.hosts import make_backend
from agent.hosts.base import Cut, RegisteredVm
from agent.hosts.hyperv import HyperVBackend
from agent.hosts.hyperv_api import HvVm, QuiesceFailed
from agent.hosts.hyperv_cuts import align_ranges
from agent.hosts.hyperv_powershell import PowerShellHyperVApi
from agent.replication.engine import SourceRelationship
from agent.replication.state import SenderState, SourceConfig
from sitepair import vdisk
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from sitepair.v1 import control_pb2, replication_pb2
from tests.hosts.fake_hyperv import FakeHyperVApi
from tests.hosts.helpers import (
    BLOCK,
    blocks_of_ranges,
    differing_blocks,
    libvhdi_sha256,
    qemu_compare,
    read_cut,
    read_image,
)
from tests.replication import conftest as replication_conftest

MiB = 1 << 20
OS, DATA = "scsi0-0", "scsi0-1"
SIZES = {OS: 8 * MiB, DATA: 4 * MiB}


@pytest.fixture
def hv(tmp_path: Path) -> FakeHyperVApi:
    return FakeHyperVApi(tmp_path / "host", process_limit=3 * MiB)


@pytest.fixture
def backend(hv: FakeHyperVApi, tmp_path: Path) -> HyperVBackend:
    return HyperVBackend(tmp_path / "agent", hv)


@pytest.fixture
def vm(hv: FakeHyperVApi) -> HvVm:
    """A running VM with a VHDX and a VHD disk, like the directory backend's tests use."""
    made = hv.add_vm(
        "web01", [(OS, "vhdx", SIZES[OS]), (DATA, "vhd", SIZES[DATA])], nics=[("eth0", "prod")]
    )
    hv.set_power(made.id, "start")
    return made


def baseline(backend: HyperVBackend, vm: HvVm) -> Cut:
    """What initial replication does: a cut, released and trusted from then on."""
    cut = backend.take_cut(vm.id)
    backend.release_cut(vm.id, cut.cut_id)
    backend.reset_tracking(vm.id, cut.cut_id)
    return cut


class Guest:
    """The guest's writes, mirrored in a bytearray model of each disk."""

    def __init__(self, hv: FakeHyperVApi, vm: HvVm, seed: int) -> None:
        self.hv, self.vm = hv, vm
        self.rng = random.Random(seed)
        self.disks = {s: bytearray(n) for s, n in SIZES.items()}
        self.blocks: dict[str, set[int]] = {s: set() for s in SIZES}

    def write(self, slot: str, offset: int, data: bytes) -> None:
        self.hv.guest_write(self.vm.id, slot, offset, data)
        self.disks[slot][offset : offset + len(data)] = data
        self.blocks[slot].update(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))

    def random_writes(self, n: int) -> None:
        for _ in range(n):
            slot = self.rng.choice([OS, OS, DATA])
            length = self.rng.choice([512, 4096, 65536, 100_000])
            offset = self.rng.randrange(0, SIZES[slot] - length)
            self.write(slot, offset, self.rng.randbytes(length))

    def snapshot(self) -> dict[str, bytes]:
        return {s: bytes(b) for s, b in self.disks.items()}

    def take_blocks(self) -> dict[str, set[int]]:
        out, self.blocks = self.blocks, {s: set() for s in SIZES}
        return out


# -- cuts, changed, release -------------------------------------------------------------------
def test_first_cut_is_untrusted_until_a_reference_point_exists(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    guest = Guest(hv, vm, 1)
    guest.write(OS, 0, b"a" * 4096)
    first = backend.take_cut(vm.id)
    assert not first.trusted and all(d.changed is None for d in first.disks)
    assert "no RCT reference point of this disk from sitepair yet" in first.untrusted_reason
    assert f"VM web01 disk {OS}" in first.untrusted_reason
    assert read_cut(first)[OS][:4096] == b"a" * 4096
    # The cut is a recovery checkpoint named after it; the VM now writes a new AVHDX.
    (cp,) = hv.checkpoints.values()
    assert cp.name == f"sitepair-{first.cut_id}" and cp.type == "Recovery"
    assert hv.vms[vm.id].drives[OS].chain[-1].suffix == ".avhdx"
    assert hv.vms[vm.id].drives[DATA].chain[-1].suffix == ".avhd"

    backend.release_cut(vm.id, first.cut_id)
    backend.reset_tracking(vm.id, first.cut_id)
    assert not hv.checkpoints  # converted, and Hyper-V merged the AVHDX away
    assert len(hv.reference_points) == 1
    guest.write(DATA, 3 * BLOCK + 1, b"b")
    second = backend.take_cut(vm.id)
    assert second.trusted, second.untrusted_reason
    assert [d.changed for d in second.disks] == [(), ((3 * BLOCK, BLOCK),)]


def test_changed_is_exact_and_unions_until_released(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    baseline(backend, vm)
    guest = Guest(hv, vm, 2)
    guest.write(OS, 0, b"a" * BLOCK)
    guest.write(OS, 5 * BLOCK + 100, b"b" * 200)  # inside one block
    guest.write(OS, 9 * BLOCK - 10, b"c" * 20)  # straddles two blocks
    guest.write(DATA, 3 * BLOCK, bytes(2 * BLOCK))  # zeros are changes too
    guest.write(DATA, SIZES[DATA] - 10, b"z" * 10)  # the last block
    c1 = backend.take_cut(vm.id)
    assert c1.trusted and not c1.app_consistent
    by_disk = {d.disk_id: d for d in c1.disks}
    assert by_disk[OS].changed == ((0, BLOCK), (5 * BLOCK, BLOCK), (8 * BLOCK, 2 * BLOCK))
    last = SIZES[DATA] // BLOCK - 1
    assert by_disk[DATA].changed == ((3 * BLOCK, 2 * BLOCK), (last * BLOCK, BLOCK))
    assert [d.format for d in c1.disks] == ["vhdx", "vhd"]
    assert [d.virtual_size for d in c1.disks] == [SIZES[OS], SIZES[DATA]]
    assert [len(d.chain) for d in c1.disks] == [1, 1]

    guest.write(OS, 20 * BLOCK, b"d" * BLOCK)
    c2 = backend.take_cut(vm.id)  # c1 not released: c2 covers both
    by_disk = {d.disk_id: d for d in c2.disks}
    assert by_disk[OS].changed == (
        (0, BLOCK),
        (5 * BLOCK, BLOCK),
        (8 * BLOCK, 2 * BLOCK),
        (20 * BLOCK, BLOCK),
    )
    assert by_disk[DATA].changed == ((3 * BLOCK, 2 * BLOCK), (last * BLOCK, BLOCK))
    assert [len(d.chain) for d in c2.disks] == [2, 2]
    content = read_cut(c2)
    assert content == {OS: bytes(guest.disks[OS]), DATA: bytes(guest.disks[DATA])}

    # Releasing the older cut first: Hyper-V merges its layer, c2's chain shrinks, its view stays.
    backend.release_cut(vm.id, c1.cut_id)
    again = backend.outstanding_cut(vm.id)
    assert again is not None and again.cut_id == c2.cut_id
    assert [d.changed for d in again.disks] == [d.changed for d in c2.disks]
    assert [len(d.chain) for d in again.disks] == [1, 1]
    assert read_cut(again) == content

    backend.release_cut(vm.id, c2.cut_id)
    backend.release_cut(vm.id, c2.cut_id)  # idempotent
    backend.release_cut(vm.id, c1.cut_id)  # an older, released cut: nothing to do
    assert backend.outstanding_cut(vm.id) is None

    guest.write(DATA, 7 * BLOCK, b"e" * 10)
    c3 = backend.take_cut(vm.id)
    assert [d.changed for d in c3.disks] == [(), ((7 * BLOCK, BLOCK),)]
    assert read_cut(c3)[OS] == content[OS]
    backend.release_cut(vm.id, c3.cut_id)
    c4 = backend.take_cut(vm.id)  # nothing written: a new checkpoint, nothing changed
    assert c4.cut_id != c3.cut_id and [d.changed for d in c4.disks] == [(), ()]
    # Only sitepair's newest reference point and c4's checkpoint are left in Hyper-V.
    assert len(hv.reference_points) == 1
    assert [c.name for c in hv.checkpoints.values()] == [f"sitepair-{c4.cut_id}"]
    with pytest.raises(NotFound, match="VM web01 has no cut nope"):
        backend.release_cut(vm.id, "nope")


def test_cuts_hold_what_the_guest_wrote_at_that_instant(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path
) -> None:
    """Rounds of random writes; some cuts stay outstanding, the others are released. Each cut
    reads exactly the guest's disks at that instant, and its ``changed`` is exactly the blocks
    the guest wrote since the last released cut (so it holds every block that differs)."""
    baseline(backend, vm)
    guest = Guest(hv, vm, 3)
    released = {s: bytes(n) for s, n in SIZES.items()}
    pending: dict[str, set[int]] = {s: set() for s in SIZES}  # written since the last release
    for round_ in range(6):
        guest.random_writes(12)
        pending = {s: pending[s] | b for s, b in guest.take_blocks().items()}
        expected = guest.snapshot()
        cut = backend.take_cut(vm.id)
        guest.random_writes(4)  # the guest goes on after the checkpoint
        after = guest.take_blocks()
        assert cut.trusted, cut.untrusted_reason
        content = read_cut(cut)
        assert content == expected, f"round {round_}"
        for fd in cut.disks:
            assert fd.changed is not None
            got = blocks_of_ranges(fd.changed)
            assert differing_blocks(released[fd.disk_id], content[fd.disk_id]) <= got
            assert got == pending[fd.disk_id], f"round {round_} disk {fd.disk_id}"
        if round_ % 3 == 1:  # this cut stays outstanding and folds into the next one
            pending = {s: pending[s] | b for s, b in after.items()}
        else:
            backend.release_cut(vm.id, cut.cut_id)
            released, pending = content, after
    # Releasing merges the checkpoints away: each disk is its base file again, which holds the
    # guest's disk as it is now (qemu-img agrees, where it is installed).
    final = backend.take_cut(vm.id)
    backend.release_cut(vm.id, final.cut_id)
    for slot, disk in hv.vms[vm.id].drives.items():
        assert len(disk.chain) == 1
        assert read_image(disk.chain[0]) == bytes(guest.disks[slot])
        if shutil.which("qemu-img"):
            qemu_compare(disk.chain[0], bytes(guest.disks[slot]), tmp_path)


def test_libvhdi_reads_a_cut_chain_like_we_do(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    pytest.importorskip("pyvhdi", reason="libvhdi's Python binding")
    import hashlib

    guest = Guest(hv, vm, 4)
    guest.random_writes(10)
    backend.take_cut(vm.id)
    guest.random_writes(10)
    cut = backend.take_cut(vm.id)  # two outstanding checkpoints: two-layer chains
    assert [len(d.chain) for d in cut.disks] == [2, 2]
    for fd in cut.disks:
        assert libvhdi_sha256(fd.chain) == hashlib.sha256(guest.disks[fd.disk_id]).hexdigest()


def test_outstanding_cut_survives_a_restart(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path
) -> None:
    baseline(backend, vm)
    Guest(hv, vm, 5).write(OS, BLOCK, b"x" * 4096)
    cut = backend.take_cut(vm.id)
    fresh = HyperVBackend(tmp_path / "agent", hv)  # the agent restarted; Hyper-V did not
    assert fresh.outstanding_cut(vm.id) == cut
    assert fresh.outstanding_cut("web01") == cut  # by name too
    fresh.release_cut(vm.id, cut.cut_id)
    assert backend.outstanding_cut(vm.id) is None


class _Died(BaseException):
    """The agent process dying between two Hyper-V calls (not an error it could handle)."""


def test_an_agent_that_died_in_a_take_cut_leaves_no_checkpoint_behind(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path, monkeypatch: Any
) -> None:
    baseline(backend, vm)
    real = hv.create_recovery_checkpoint

    def create_then_die(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise _Died

    monkeypatch.setattr(hv, "create_recovery_checkpoint", create_then_die)
    with pytest.raises(_Died):
        backend.take_cut(vm.id)
    monkeypatch.undo()
    assert len(hv.checkpoints) == 1  # Hyper-V made it; the agent never recorded it
    fresh = HyperVBackend(tmp_path / "agent", hv)
    assert fresh.outstanding_cut(vm.id) is None
    assert not hv.checkpoints  # removed: nothing knew of it
    assert all(len(d.chain) == 1 for d in hv.vms[vm.id].drives.values())
    Guest(hv, vm, 6).write(OS, 2 * BLOCK, b"y")
    cut = fresh.take_cut(vm.id)
    assert cut.trusted and cut.disks[0].changed == ((2 * BLOCK, BLOCK),)


def test_an_agent_that_died_converting_a_cut_finishes_the_release(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path, monkeypatch: Any
) -> None:
    baseline(backend, vm)
    guest = Guest(hv, vm, 7)
    guest.write(OS, 0, b"1" * 10)
    cut = backend.take_cut(vm.id)
    real = hv.convert_to_reference_point

    def convert_then_die(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise _Died

    monkeypatch.setattr(hv, "convert_to_reference_point", convert_then_die)
    with pytest.raises(_Died):
        backend.release_cut(vm.id, cut.cut_id)
    monkeypatch.undo()
    fresh = HyperVBackend(tmp_path / "agent", hv)
    guest.write(OS, 4 * BLOCK, b"2" * 10)
    # The next operation finishes the release: the new reference point is the baseline, and
    # sitepair's older one is destroyed.
    assert fresh.outstanding_cut(vm.id) is None
    fresh.release_cut(vm.id, cut.cut_id)  # already done: nothing to do
    assert len(hv.reference_points) == 1
    nxt = fresh.take_cut(vm.id)
    assert nxt.trusted and nxt.disks[0].changed == ((4 * BLOCK, BLOCK),)


def test_a_moved_vm_needs_a_resync(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path
) -> None:
    baseline(backend, vm)
    hv.move_vm(vm.id, tmp_path / "host" / "new-storage")
    guest = Guest(hv, vm, 8)
    guest.write(OS, BLOCK, b"m" * 10)
    c1 = backend.take_cut(vm.id)
    assert not c1.trusted and all(d.changed is None for d in c1.disks)
    reason = c1.untrusted_reason
    assert f"VM web01 disk {OS} ({tmp_path / 'host' / 'new-storage'}" in reason
    assert "Hyper-V no longer knows the RCT id" in reason and "32773" in reason
    assert read_cut(c1)[OS][BLOCK : BLOCK + 10] == b"m" * 10  # the cut itself is fine to read
    # Still untrusted until a resync of a cut, even after a release.
    backend.release_cut(vm.id, c1.cut_id)
    c2 = backend.take_cut(vm.id)
    assert c2.untrusted_reason == reason
    backend.release_cut(vm.id, c2.cut_id)
    backend.reset_tracking(vm.id, c2.cut_id)
    guest.write(DATA, 0, b"n")
    c3 = backend.take_cut(vm.id)
    assert c3.trusted, c3.untrusted_reason
    assert [d.changed for d in c3.disks] == [(), ((0, BLOCK),)]


def test_a_disk_edited_outside_hyperv_needs_a_resync(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    baseline(backend, vm)
    backend.set_vm_state(vm.id, "off")
    base = hv.vms[vm.id].drives[DATA].chain[-1]
    hv.edit_offline(base, 5 * BLOCK, b"\x5a" * 4096)  # e.g. mounted and written while off
    backend.set_vm_state(vm.id, "running")
    c1 = backend.take_cut(vm.id)
    assert not c1.trusted
    assert f"VM web01 disk {DATA} ({base})" in c1.untrusted_reason
    assert f"disk {OS}" not in c1.untrusted_reason  # the other disk's history is intact
    assert read_cut(c1)[DATA][5 * BLOCK] == 0x5A
    # A resync of c1, then trusted again; the same change is not reported twice.
    backend.release_cut(vm.id, c1.cut_id)
    backend.reset_tracking(vm.id, c1.cut_id)
    Guest(hv, vm, 9).write(OS, 7 * BLOCK, b"y" * 4096)
    c2 = backend.take_cut(vm.id)
    assert c2.trusted, c2.untrusted_reason
    assert [d.changed for d in c2.disks] == [((7 * BLOCK, BLOCK),), ()]


def test_a_checkpoint_deleted_by_an_operator_loses_nothing(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    baseline(backend, vm)
    guest = Guest(hv, vm, 10)
    guest.write(OS, 0, b"a")
    cut = backend.take_cut(vm.id)
    hv.remove_checkpoint(vm.id, next(iter(hv.checkpoints)))  # Hyper-V Manager: Delete checkpoint
    assert backend.outstanding_cut(vm.id) is None
    backend.release_cut(vm.id, cut.cut_id)  # the engine committed it before: no error
    guest.write(OS, 3 * BLOCK, b"b")
    nxt = backend.take_cut(vm.id)
    # RCT still knows everything since the last baseline: both writes are in the next cut.
    assert nxt.trusted and nxt.disks[0].changed == ((0, BLOCK), (3 * BLOCK, BLOCK))


def test_application_consistent_cuts(hv: FakeHyperVApi, backend: HyperVBackend, vm: HvVm) -> None:
    assert backend.take_cut(vm.id, app_consistent=True).app_consistent
    assert not backend.take_cut(vm.id).app_consistent
    # A guest that cannot quiesce (no VSS): a crash-consistent cut, never claimed otherwise.
    legacy = hv.add_vm("legacy", [(OS, "vhdx", 4 * MiB)], vss=False)
    hv.set_power(legacy.id, "start")
    cut = backend.take_cut(legacy.id, app_consistent=True)
    assert not cut.app_consistent and len(cut.disks) == 1


def test_a_cut_that_fails_half_way_leaves_no_checkpoint(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, monkeypatch: Any
) -> None:
    """Hyper-V made the checkpoint, then asking RCT failed (a busy host): no cut, no checkpoint
    left behind, and the next cut still reports every change."""
    baseline(backend, vm)
    guest = Guest(hv, vm, 12)
    guest.write(OS, 2 * BLOCK, b"q" * 10)

    def busy(*args: Any) -> Any:
        raise Unavailable("GetVirtualDiskChanges of x: system is in use (32774)")

    monkeypatch.setattr(hv, "virtual_disk_changes", busy)
    with pytest.raises(Unavailable, match="system is in use"):
        backend.take_cut(vm.id)
    monkeypatch.undo()
    assert not hv.checkpoints
    assert all(len(d.chain) == 1 for d in hv.vms[vm.id].drives.values())
    assert backend.outstanding_cut(vm.id) is None
    cut = backend.take_cut(vm.id)
    assert cut.trusted and [d.changed for d in cut.disks] == [((2 * BLOCK, BLOCK),), ()]


def test_a_failed_quiesce_leaves_one_checkpoint(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, monkeypatch: Any
) -> None:
    """A VSS failure that still left a checkpoint behind: it is removed before the
    crash-consistent one is made, so the cut has exactly one checkpoint."""
    real = hv.create_recovery_checkpoint

    def vss_fails_late(vm_id: str, name: str, *, app_consistent: bool) -> Any:
        made = real(vm_id, name, app_consistent=app_consistent)
        if app_consistent:
            raise QuiesceFailed("CreateSnapshot failed: VSS (Hyper-V error 32768)")
        return made

    monkeypatch.setattr(hv, "create_recovery_checkpoint", vss_fails_late)
    cut = backend.take_cut(vm.id, app_consistent=True)
    assert not cut.app_consistent
    assert [c.name for c in hv.checkpoints.values()] == [f"sitepair-{cut.cut_id}"]
    assert all(len(d.chain) == 2 for d in hv.vms[vm.id].drives.values())


def test_a_damaged_state_file_is_named_with_what_to_do(
    backend: HyperVBackend, vm: HvVm, tmp_path: Path
) -> None:
    backend.take_cut(vm.id)
    state = tmp_path / "agent" / ".sitepair-tracking" / vm.id / "cuts.json"
    state.write_text('{"version": 1, "seq": "x"')
    with pytest.raises(ConfigError) as err:
        backend.outstanding_cut(vm.id)
    assert str(state) in str(err.value) and "is damaged" in str(err.value)
    assert err.value.hint is not None and "move it aside" in err.value.hint


def test_align_ranges() -> None:
    assert align_ranges([(100, 10), (BLOCK - 1, 2), (5 * BLOCK, 0)], 10 * BLOCK) == [(0, 2 * BLOCK)]
    assert align_ranges([(9 * BLOCK + 5, 10 * BLOCK)], 9 * BLOCK + 100) == [(9 * BLOCK, 100)]
    assert align_ranges([(3 * BLOCK, BLOCK), (BLOCK, BLOCK)], 4 * BLOCK) == [
        (BLOCK, BLOCK),
        (3 * BLOCK, BLOCK),
    ]


# -- inventory, power, NICs, writers ------------------------------------------------------------
def test_inventory(hv: FakeHyperVApi, vm: HvVm, tmp_path: Path) -> None:
    backend = HyperVBackend(
        tmp_path / "agent",
        hv,
        storage=(("gold", tmp_path / "host" / "Virtual Hard Disks"),),
        networks=(NetworkConfig("prod", ("10.0.0.0/24",)),),
    )
    inv = backend.inventory()
    (rec,) = inv.vms
    assert (rec.id, rec.name, rec.state, rec.cpu_count, rec.memory_mb) == (
        vm.id,
        "web01",
        "running",
        2,
        2048,
    )
    assert [(d.id, d.format, d.virtual_size, d.storage_class) for d in rec.disks] == [
        (OS, "vhdx", SIZES[OS], "gold"),
        (DATA, "vhd", SIZES[DATA], "gold"),
    ]
    assert all(d.file_size > 0 for d in rec.disks)
    assert [(n.name, n.network) for n in rec.nics] == [("eth0", "prod")]
    assert rec.nics[0].mac.startswith("00:15:5d:")
    assert [(n.name, n.subnets) for n in inv.networks] == [
        ("prod", ("10.0.0.0/24",)),
        ("dmz", ()),
        ("isolated", ()),
    ]
    assert [s.name for s in inv.storage] == ["gold"] and inv.storage[0].total_bytes > 0


def test_power_state_changes(backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm) -> None:
    assert backend.set_vm_state(vm.id, "paused").state == "paused"
    assert backend.set_vm_state(vm.id, "paused").state == "paused"  # no change, no error
    assert backend.set_vm_state("web01", "running").state == "running"
    hv.calls.clear()
    record = backend.set_vm_state(vm.id, "off")
    assert record.state == "off" and "set_power:stop" in hv.calls  # a guest shutdown
    with pytest.raises(
        FailedPrecondition, match="VM web01 is off in Hyper-V; it cannot become paused"
    ):
        backend.set_vm_state(vm.id, "paused")
    with pytest.raises(InvalidArgument, match="unknown VM state 'suspended'"):
        backend.set_vm_state(vm.id, "suspended")
    with pytest.raises(NotFound, match="no VM 'nope' on this Hyper-V host"):
        backend.set_vm_state("nope", "running")
    # Paused and saved VMs cannot shut down: they are turned off.
    backend.set_vm_state(vm.id, "running")
    backend.set_vm_state(vm.id, "paused")
    hv.calls.clear()
    assert backend.set_vm_state(vm.id, "off").state == "off"
    assert "set_power:turn-off" in hv.calls
    backend.set_vm_state(vm.id, "running")
    hv.save_vm(vm.id)
    assert backend.inventory().vms[0].state == "saved"
    assert backend.set_vm_state(vm.id, "running").state == "running"


def test_connect_nic(backend: HyperVBackend, vm: HvVm) -> None:
    record = backend.connect_nic(vm.id, "eth0", "dmz")
    assert [(n.name, n.network) for n in record.nics] == [("eth0", "dmz")]
    mac = record.nics[0].mac
    record = backend.connect_nic(vm.id, "eth0", "")
    assert [(n.name, n.network, n.mac) for n in record.nics] == [("eth0", "", mac)]
    with pytest.raises(NotFound, match=r"VM web01 has no NIC 'eth9' \(NICs: eth0\)"):
        backend.connect_nic(vm.id, "eth9", "dmz")
    with pytest.raises(
        InvalidArgument, match=r"no virtual switch 'lab' \(it offers: prod, dmz, isolated\)"
    ):
        backend.connect_nic(vm.id, "eth0", "lab")


def test_writers_are_refused_and_names_must_be_unique(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    with pytest.raises(
        FailedPrecondition, match="VM web01 runs on Hyper-V: its guest writes its disks"
    ):
        backend.open_writer(vm.id)
    twin = hv.add_vm("web01", [(OS, "vhdx", 4 * MiB)])  # Hyper-V allows duplicate names
    with pytest.raises(InvalidArgument, match="2 Hyper-V VMs are named 'web01'") as err:
        backend.take_cut("web01")
    assert vm.id in str(err.value) and twin.id in str(err.value)
    assert backend.take_cut(twin.id).vm_id == twin.id


# -- registering VMs (failover) ----------------------------------------------------------------
def replica_layers(tmp_path: Path) -> dict[str, list[Path]]:
    """Disk chains as a replica holds them: a VHDX base with data, and a VHD."""
    folder = tmp_path / "replicas" / "rel-1"
    folder.mkdir(parents=True)
    os_base = folder / "os.vhdx"
    with vdisk.create_disk(
        os_base, format="vhdx", subformat="dynamic", size=4 * MiB, block_size=MiB
    ) as d:
        d.write(0, b"replica os")
    data = folder / "data.vhd"
    with vdisk.create_disk(data, format="vhd", subformat="dynamic", size=2 * MiB) as d:
        d.write(BLOCK, b"replica data")
    return {"os": [os_base], DATA: [data]}


def test_register_a_vm_over_replica_chains(
    backend: HyperVBackend, hv: FakeHyperVApi, tmp_path: Path
) -> None:
    layers = replica_layers(tmp_path)
    before = {p: p.read_bytes() for chain in layers.values() for p in chain}
    registered = backend.register_vm(
        "web01",
        vm_id="vm-source-1",
        disks=[("os", layers["os"]), (DATA, layers[DATA])],
        cpu=4,
        memory_mb=4096,
        nics=[("eth0", "dmz"), ("mgmt", "")],
        state="running",
    )
    folder = backend.vm_dir("web01")
    assert (registered.vm_id, registered.name) == ("vm-source-1", "web01")
    assert registered.location == str(folder) and registered.previous is None
    assert backend.vm_state("vm-source-1") == "running"
    assert backend.vm_id_of("web01") == "vm-source-1" and backend.vm_id_of("nope") is None
    chains = backend.disk_chains("vm-source-1")
    assert list(chains) == ["os", DATA]
    for disk_id, chain in chains.items():
        assert chain[:-1] == layers[disk_id]
        assert chain[-1].parent == folder / "disks"
    # The new differencing children are what the registration made.
    assert sorted(registered.created) == sorted(str(c[-1]) for c in chains.values())
    # Hyper-V sees a VM with sitepair's id in its Notes; disks attached where their ids say.
    (made,) = [v for v in hv.vms.values() if v.name == "web01"]
    assert "sitepair-vm-id: vm-source-1" in made.notes
    assert sorted(made.drives) == [OS, DATA]  # "os" took the first free location
    assert (made.cpu, made.memory_mb, made.state) == (4, 4096, "Running")
    assert [(n.name, n.switch) for n in made.nics] == [("eth0", "dmz"), ("mgmt", "")]
    # The backend finds it by sitepair's id, with sitepair's disk names.
    config_folder, found = backend.find_vm("vm-source-1")
    assert config_folder == folder  # New-VM -Path: the folder sitepair gave it
    assert found.id == "vm-source-1" and [d.id for d in found.disks] == ["os", DATA]
    assert found.state == "running" and found.cpu == 4
    rec = backend.inventory().vms[0]
    assert rec.id == "vm-source-1" and [d.id for d in rec.disks] == ["os", DATA]
    # The guest writes its new layers; the replica's layers stay exactly as they were.
    hv.guest_write(made.id, OS, 0, b"guest")
    assert hv.guest_read(made.id, OS, 0, 10) == b"guestca os"  # over "replica os"
    assert hv.guest_read(made.id, DATA, BLOCK, 12) == b"replica data"
    assert {p: p.read_bytes() for p in before} == before
    # Power and NICs of the registered VM; a cut of it works like any other.
    assert backend.connect_nic("vm-source-1", "mgmt", "isolated").nics[1].network == "isolated"
    assert backend.take_cut("vm-source-1").vm_id == "vm-source-1"
    assert backend.set_vm_state("vm-source-1", "off").state == "off"

    with pytest.raises(AlreadyExists, match="a VM named 'web01' already exists"):
        backend.register_vm(
            "web01", vm_id="vm-source-1", disks=[("os", layers["os"])], cpu=1, memory_mb=512
        )
    again = backend.register_vm(
        "web01",
        vm_id="vm-source-1",
        disks=[("os", layers["os"])],
        cpu=1,
        memory_mb=512,
        replace=True,
    )
    assert list(backend.disk_chains("vm-source-1")) == ["os"] and made.id not in hv.vms
    assert backend.find_vm("vm-source-1")[1].cpu == 1
    assert again.previous is not None and json.loads(again.previous)["id"] == made.id

    removed = backend.remove_vm("vm-source-1")
    assert removed == folder and not folder.exists()
    assert not [v for v in hv.vms.values() if v.name == "web01"]
    assert {p: p.read_bytes() for p in before} == before  # the replica's layers are untouched
    with pytest.raises(NotFound):
        backend.find_vm("vm-source-1")


def test_register_vm_refuses_bad_input_before_making_anything(
    backend: HyperVBackend, hv: FakeHyperVApi, tmp_path: Path
) -> None:
    layers = replica_layers(tmp_path)
    good = [("os", layers["os"])]
    cases: list[tuple[dict[str, Any], type[Exception], str, str]] = [
        ({"generation": 3}, InvalidArgument, "generation 3 does not exist", "use 1 or 2"),
        ({"memory_mb": 1023}, InvalidArgument, "1023 MB of memory", "even number of MB"),
        ({"cpu": 0}, InvalidArgument, "0 virtual processors", "at least 1"),
        ({"vm_id": "a\nsitepair-vm-id: b"}, InvalidArgument, "cannot be kept", "VM id"),
        (
            {"disks": [("ide0-0", layers["os"])]},
            InvalidArgument,
            "a generation 2 VM has no IDE controller",
            "generation 1",
        ),
        (
            {"disks": [("scsi4-0", layers["os"])]},
            InvalidArgument,
            "names a controller location Hyper-V does not have",
            "SCSI controllers 0-3",
        ),
        ({"disks": [*good, *good]}, InvalidArgument, "disk os is given twice", ""),
        ({"disks": []}, InvalidArgument, "no disks", "replica"),
        (
            {"disks": [("os", [tmp_path / "missing.vhdx"])]},
            NotFound,
            "is not a virtual disk Hyper-V can open",
            "may read it",
        ),
        ({"state": "saved"}, InvalidArgument, "unknown VM state 'saved'", "running"),
    ]
    for change, error, message, hint in cases:
        args: dict[str, Any] = {
            "vm_id": "vm-1",
            "disks": good,
            "cpu": 1,
            "memory_mb": 1024,
            **change,
        }
        with pytest.raises(error) as err:
            backend.register_vm("web01", **args)
        assert message in str(err.value), change
        assert hint in (getattr(err.value, "hint", None) or ""), change
    assert not hv.vms and not backend.vm_dir("web01").exists()
    # Hyper-V refusing the VM itself (a switch that does not exist): the differencing disks
    # made for it are deleted again.
    with pytest.raises(NotFound, match="no virtual switch 'lab'"):
        backend.register_vm(
            "web01", vm_id="vm-1", disks=good, cpu=1, memory_mb=1024, nics=[("eth0", "lab")]
        )
    assert not hv.vms and not backend.vm_dir("web01").exists()


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unregister_leaves_no_vm_and_no_created_files(
    backend: HyperVBackend, hv: FakeHyperVApi, tmp_path: Path
) -> None:
    layers = replica_layers(tmp_path)
    before = files_under(tmp_path / "replicas")
    registered = backend.register_vm(
        "web01",
        vm_id="vm-source-1",
        disks=[("os", layers["os"]), (DATA, layers[DATA])],
        cpu=2,
        memory_mb=2048,
        nics=[("eth0", "prod")],
        state="running",
    )
    (made,) = hv.vms.values()
    hv.guest_write(made.id, OS, 0, b"failed over")
    # The VM was protected meanwhile: a cut leaves a checkpoint's AVHDX above each child, and
    # sitepair's tracking state of the VM.
    backend.take_cut("vm-source-1")
    tracking = tmp_path / "agent" / ".sitepair-tracking" / made.id
    assert tracking.is_dir() and all(len(d.chain) == 3 for d in made.drives.values())
    hv.calls.clear()

    backend.unregister_vm(registered)
    assert not hv.vms and not hv.checkpoints and not hv.reference_points
    assert "remove_vm" in hv.calls and "new_vm" not in hv.calls
    assert not any(Path(c).exists() for c in registered.created)
    assert not backend.vm_dir("web01").exists()  # the checkpoint's AVHDX went with it
    assert not tracking.exists()
    assert files_under(tmp_path / "replicas") == before  # the replica's layers are untouched
    assert backend.vm_id_of("web01") is None

    hv.calls.clear()
    backend.unregister_vm(registered)  # a second call finds nothing to do
    assert hv.calls == ["list_vms"] and not hv.vms


@pytest.fixture
def old_primary(backend: HyperVBackend, hv: FakeHyperVApi) -> HvVm:
    """A VM sitepair did not make (no Notes), protected (a released cut, so a reference point and
    tracking state), then fenced: off. Its sitepair id is its Hyper-V id."""
    made = hv.add_vm(
        "web01",
        [(OS, "vhdx", SIZES[OS]), (DATA, "vhd", SIZES[DATA])],
        nics=[("eth0", "prod"), ("mgmt", "")],
        cpu=3,
        memory_mb=1536,
    )
    hv.set_power(made.id, "start")
    Guest(hv, made, 20).write(OS, BLOCK, b"old primary")
    baseline(backend, made)
    Guest(hv, made, 21).write(DATA, 0, b"after the last cycle")
    backend.take_cut(made.id)  # outstanding when the primary was fenced
    backend.set_vm_state(made.id, "off")
    return hv.get_vm(made.id)


def test_unregister_after_replace_brings_the_old_vm_back(
    backend: HyperVBackend, hv: FakeHyperVApi, old_primary: HvVm, tmp_path: Path
) -> None:
    old = old_primary
    old_files = files_under(tmp_path / "host")
    tracking = tmp_path / "agent" / ".sitepair-tracking"
    assert (tracking / old.id).is_dir()
    layers = replica_layers(tmp_path)
    assert backend.vm_id_of("web01") == old.id

    registered = backend.register_vm(
        "web01",
        vm_id=old.id,
        disks=[(OS, layers["os"]), (DATA, layers[DATA])],
        cpu=4,
        memory_mb=4096,
        nics=[("eth0", "dmz")],
        state="running",
        replace=True,
    )
    assert registered.previous is not None
    assert old.id not in hv.vms and not (tracking / old.id).exists()
    (new,) = hv.vms.values()
    assert backend.vm_id_of("web01") == old.id and backend.vm_state(old.id) == "running"
    assert sorted(str(c[-1]) for c in backend.disk_chains(old.id).values()) == sorted(
        registered.created
    )
    assert files_under(tmp_path / "host") == old_files  # Remove-VM left the old VM's files

    backend.unregister_vm(registered)
    (back,) = hv.vms.values()
    assert back.id != old.id  # New-VM: Hyper-V gives the VM made again a new id...
    assert backend.vm_id_of("web01") == old.id  # ...and its Notes keep the id the broker knows
    assert f"sitepair-vm-id: {old.id}" in back.notes
    got = hv.get_vm(back.id)
    assert (got.name, got.generation, got.cpu_count, got.memory_mb, got.state) == (
        "web01",
        old.generation,
        3,
        1536,
        "Off",
    )
    assert got.drives == old.drives  # the same files at the same controller locations
    assert [(n.name, n.switch) for n in got.nics] == [("eth0", "prod"), ("mgmt", "")]
    assert files_under(tmp_path / "host") == old_files  # its disks untouched
    assert not any(Path(c).exists() for c in registered.created)
    assert not backend.vm_dir("web01").exists()
    assert not (tracking / new.id).exists()
    rec = backend.inventory().vms[0]
    assert (rec.id, [d.id for d in rec.disks]) == (old.id, [OS, DATA])

    hv.calls.clear()
    backend.unregister_vm(registered)  # harmless: nothing removed, nothing made twice
    assert "remove_vm" not in hv.calls and "new_vm" not in hv.calls
    assert list(hv.vms) == [back.id]

    # Its RCT state could not be trusted across the replace: the next cut says so, and reads
    # the old primary's disks as they were.
    backend.set_vm_state(old.id, "running")
    cut = backend.take_cut(old.id)
    assert not cut.trusted and all(d.changed is None for d in cut.disks)
    assert "no RCT reference point of this disk from sitepair yet" in cut.untrusted_reason
    content = read_cut(cut)
    assert content[OS][BLOCK : BLOCK + 11] == b"old primary"
    assert content[DATA][:20] == b"after the last cycle"


def test_unregister_brings_back_a_vm_sitepair_had_registered_in_the_same_folder(
    backend: HyperVBackend, hv: FakeHyperVApi, tmp_path: Path
) -> None:
    """A failback onto a VM sitepair itself made (an earlier failover): both registrations use
    ``<vm root>/web01/disks``; undoing the second deletes only its own children."""
    layers = replica_layers(tmp_path)
    first = backend.register_vm(
        "web01", vm_id="vm-1", disks=[("os", layers["os"])], cpu=1, memory_mb=512
    )
    (a,) = hv.vms.values()
    hv.set_power(a.id, "start")
    hv.guest_write(a.id, OS, 0, b"first")
    hv.set_power(a.id, "stop")
    kept = files_under(backend.vm_dir("web01"))
    second = backend.register_vm(
        "web01",
        vm_id="vm-1",
        disks=[("os", layers["os"]), (DATA, layers[DATA])],
        cpu=2,
        memory_mb=1024,
        replace=True,
    )
    assert second.location == first.location and not set(second.created) & set(kept)
    backend.unregister_vm(second)
    (back,) = hv.vms.values()
    assert [d.chain for d in back.drives.values()] == [a.drives[OS].chain]
    assert back.notes == a.notes  # sitepair's own Notes, unchanged
    assert files_under(backend.vm_dir("web01")) == kept
    assert hv.guest_read(back.id, OS, 0, 5) == b"first"
    assert backend.find_vm("vm-1")[1].cpu == 1


def test_a_replace_that_fails_half_way_brings_the_old_vm_back(
    backend: HyperVBackend, hv: FakeHyperVApi, old_primary: HvVm, tmp_path: Path, monkeypatch: Any
) -> None:
    old = old_primary
    old_files = files_under(tmp_path / "host")
    layers = replica_layers(tmp_path)
    # Hyper-V makes the VM, attaches its disks, then refuses a NIC: the half-made VM is
    # removed, the new children deleted, the old VM made again.
    with pytest.raises(NotFound, match="no virtual switch 'lab'"):
        backend.register_vm(
            "web01",
            vm_id=old.id,
            disks=[(OS, layers["os"])],
            cpu=1,
            memory_mb=1024,
            nics=[("eth0", "lab")],
            replace=True,
        )
    (back,) = hv.vms.values()
    assert back.drives.keys() == {OS, DATA} and hv.get_vm(back.id).drives == old.drives
    assert backend.vm_id_of("web01") == old.id
    assert files_under(tmp_path / "host") == old_files
    assert not backend.vm_dir("web01").exists()

    # Starting the new VM fails: the same.
    def no_start(vm_id: str, action: str) -> None:
        raise FailedPrecondition(f"{action} of VM {vm_id} failed: not enough memory")

    monkeypatch.setattr(hv, "set_power", no_start)
    with pytest.raises(FailedPrecondition, match="not enough memory"):
        backend.register_vm(
            "web01",
            vm_id=old.id,
            disks=[(OS, layers["os"])],
            cpu=1,
            memory_mb=1024,
            state="running",
            replace=True,
        )
    monkeypatch.undo()
    (again,) = hv.vms.values()
    assert hv.get_vm(again.id).drives == old.drives and backend.vm_id_of("web01") == old.id
    assert not backend.vm_dir("web01").exists()


def test_replace_refuses_a_vm_that_is_not_off(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm, tmp_path: Path
) -> None:
    layers = replica_layers(tmp_path)
    with pytest.raises(FailedPrecondition, match="is running; it must be off") as err:
        backend.register_vm(
            "web01",
            vm_id=vm.id,
            disks=[(OS, layers["os"])],
            cpu=1,
            memory_mb=1024,
            replace=True,
        )
    assert "fence the old primary" in (err.value.hint or "")
    assert list(hv.vms) == [vm.id] and hv.vms[vm.id].state == "Running"
    assert not backend.vm_dir("web01").exists()


def test_a_damaged_previous_definition_is_named(backend: HyperVBackend, tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="cannot be read") as err:
        backend.unregister_vm(
            RegisteredVm(vm_id="x", name="web01", location=str(tmp_path / "x"), previous="{}")
        )
    assert "New-VM" in (err.value.hint or "")


def test_remove_vm_touches_only_vms_sitepair_registered(
    backend: HyperVBackend, hv: FakeHyperVApi, vm: HvVm
) -> None:
    disks = [d.chain[-1] for d in hv.vms[vm.id].drives.values()]
    backend.vm_dir("web01").mkdir(parents=True)  # a folder that happens to have its name
    with pytest.raises(FailedPrecondition, match="was not registered by sitepair") as err:
        backend.remove_vm(vm.id)
    assert "Hyper-V Manager" in str(err.value)
    assert vm.id in hv.vms and all(p.exists() for p in disks)
    assert backend.vm_dir("web01").is_dir()


def test_make_backend(tmp_path: Path, monkeypatch: Any) -> None:
    config = AgentConfig(
        home=tmp_path, backend=BackendConfig(kind="hyperv", vm_root=tmp_path / "hv")
    )
    if sys.platform != "win32":
        with pytest.raises(ConfigError, match="runs only on Windows hosts with Hyper-V"):
            make_backend(config)
    # On Windows it is the real PowerShell implementation (constructed only: nothing runs).
    monkeypatch.setattr(sys, "platform", "win32")
    made = make_backend(config)
    assert isinstance(made, HyperVBackend) and made.kind == "hyperv"
    assert isinstance(made.api, PowerShellHyperVApi) and made.vm_root == tmp_path / "hv"


# -- end to end: the real replication engine over a Hyper-V source ------------------------------
# The replication tests' fixture: a broker, two registered hosts and a running receiver.
pair = replication_conftest.pair


def test_engine_replicates_a_hyperv_vm_byte_for_byte(
    pair: replication_conftest.Pair, tmp_path: Path
) -> None:
    """SourceRelationship.run_cycle over a HyperVBackend on the fake: the initial cycle copies
    the guest's disks exactly; delta cycles carry exactly the blocks the guest wrote; a VM move
    (RCT history lost) becomes a checksum resync, and deltas follow again."""
    hv = FakeHyperVApi(tmp_path / "host", process_limit=3 * MiB)
    made = hv.add_vm("web01", [(OS, "vhdx", SIZES[OS]), (DATA, "vhd", SIZES[DATA])])
    hv.set_power(made.id, "start")
    backend = HyperVBackend(pair.primary_home / "hyperv", hv)
    pair.grant("rel-1", made.id)
    config = SourceConfig(
        relationship="rel-1",
        vm_id=made.id,
        replica_host=pair.replica.host_id,
        address=pair.cert_address,
        epoch=1,
        auth="certificate",
    )
    pair.state.put_source(config, SenderState(tracker="changelog"))
    rel = SourceRelationship(
        config,
        backend=backend,
        state=pair.state,
        identity=lambda: pair.primary,
        clock=SYSTEM_CLOCK,
        work_dir=tmp_path / "work",
        tracker="changelog",
    )

    def replica(slot: str) -> bytes:
        store = pair.registry.store(pair.state.grant("rel-1"))  # type: ignore[arg-type]
        with vdisk.open_disk(store.latest_chain(slot), read_only=True) as d:
            return d.read(0, d.virtual_size)

    guest = Guest(hv, made, 11)
    guest.random_writes(30)
    guest.take_blocks()
    first = rel.run_cycle()
    assert first is not None and first.kind == replication_pb2.INITIAL
    assert {s: replica(s) for s in SIZES} == guest.snapshot()
    for round_ in range(2):
        guest.random_writes(10)
        written = guest.take_blocks()
        result = rel.run_cycle()
        assert result is not None and result.kind == replication_pb2.DELTA, round_
        # Exactly the blocks the guest wrote travelled (random bytes: no zero blocks).
        assert result.raw_bytes == sum(len(b) for b in written.values()) * BLOCK
        assert {s: replica(s) for s in SIZES} == guest.snapshot()
    # Nothing is left behind in Hyper-V but sitepair's one reference point.
    assert not hv.checkpoints and len(hv.reference_points) == 1

    hv.move_vm(made.id, tmp_path / "host" / "moved")
    guest.random_writes(5)
    written = guest.take_blocks()
    resync = rel.run_cycle()
    assert resync is not None and resync.kind == replication_pb2.RESYNC
    # A checksum resync: only the blocks that differ travel, not the disks.
    assert 0 < resync.raw_bytes <= sum(len(b) for b in written.values()) * BLOCK
    assert {s: replica(s) for s in SIZES} == guest.snapshot()
    guest.random_writes(5)
    written = guest.take_blocks()
    after = rel.run_cycle()
    assert after is not None and after.kind == replication_pb2.DELTA
    assert after.raw_bytes == sum(len(b) for b in written.values()) * BLOCK
    assert {s: replica(s) for s in SIZES} == guest.snapshot()
    assert rel.stats.cycles_succeeded == 5 and rel.stats.state == control_pb2.STATE_PROTECTED
