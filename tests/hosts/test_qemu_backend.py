"""The qemu backend against a real QEMU (TCG): power, cuts, change tracking, trust.

These VMs have no operating system (the firmware finds nothing to boot and waits), so they run
in a fraction of a second and cost no CPU; writes go in through QEMU's own block layer, from
its monitor (HMP ``qemu-io`` on the guest's virtio-blk device), exactly where a guest's writes
would go. Real guests that boot and write are in tests/guest/ and tests/hosts/test_qemu_guest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from agent.hosts import qemu_vm
from agent.hosts.qemu import QemuBackend
from agent.hosts.qemu_vm import Runtime
from sitepair import vdisk
from sitepair.errors import FailedPrecondition

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)

MiB = 1 << 20
K64 = 64 * 1024


def hmp(backend: QemuBackend, vm: str, command: str) -> str:
    folder, _ = backend.find_vm(vm)

    async def run() -> str:
        client = QMPClient("test")
        await client.connect(str(Runtime(folder).qmp))
        try:
            out = await client.execute("human-monitor-command", {"command-line": command})
        finally:
            await client.disconnect()
        return str(out)

    return asyncio.run(run())


class Guest:
    """Writes into a running VM's disk through QEMU, and keeps a model of what it holds."""

    def __init__(self, backend: QemuBackend, vm: str, sizes: dict[str, int]) -> None:
        self.backend = backend
        self.vm = vm
        self.model = {d: bytearray(n) for d, n in sizes.items()}
        self.index = {d: i for i, d in enumerate(sizes)}

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        out = hmp(
            self.backend,
            self.vm,
            f'qemu-io -d disk{self.index[disk]}/virtio-backend "write -P {pattern} {offset} {length}"',
        )
        assert "error" not in out.lower(), out
        self.model[disk][offset : offset + length] = bytes([pattern]) * length


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[QemuBackend]:
    b = QemuBackend(tmp_path / "vms", accel="tcg", stop_timeout=1)
    try:
        yield b
    finally:
        for folder in b.list_vm_dirs():
            inst = qemu_vm.running_instance(Runtime(folder))
            if inst is not None:
                qemu_vm.kill(inst)


def chain_bytes(chain: tuple[Path, ...]) -> bytes:
    with vdisk.open_disk(chain[-1], read_only=True) as d:
        return d.read(0, d.virtual_size)


def aligned(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for off, n in ranges:
        out.update(range(off // K64, (off + n - 1) // K64 + 1))
    return out


def test_a_running_vm_is_cut_consistently_and_tracked_exactly(backend: QemuBackend) -> None:
    backend.create_vm("web01", disks=[("os", "vhdx", 16 * MiB), ("data", "vhd", 8 * MiB)])
    rec = backend.set_vm_state("web01", "running")
    assert rec.state == "running"
    g = Guest(backend, "web01", {"os": 16 * MiB, "data": 8 * MiB})
    g.write("os", 0, 128 * 1024, 0x11)

    # The first cut: tracking has no released baseline yet, so the cut says so.
    first = backend.take_cut("web01")
    assert not first.trusted and "not started" in first.untrusted_reason
    for fd in first.disks:
        assert chain_bytes(fd.chain) == bytes(g.model[fd.disk_id])
    backend.release_cut("web01", first.cut_id)
    backend.reset_tracking("web01", first.cut_id)  # what an initial cycle's commit does

    # Writes after the cut; a cut taken now covers exactly them, at 64 KiB granularity.
    g.write("os", 1 * MiB, 64 * 1024, 0x22)
    g.write("os", 5 * MiB + 4096, 8192, 0x23)
    g.write("data", 3 * MiB, 200 * 1024, 0x24)
    cut = backend.take_cut("web01")
    assert cut.trusted
    frozen = {fd.disk_id: bytes(g.model[fd.disk_id]) for fd in cut.disks}
    changed = {fd.disk_id: fd.changed for fd in cut.disks}
    assert aligned(list(changed["os"] or [])) == aligned(
        [(1 * MiB, 64 * 1024), (5 * MiB + 4096, 8192)]
    )
    assert aligned(list(changed["data"] or [])) == aligned([(3 * MiB, 200 * 1024)])

    # The guest goes on writing; the cut still reads exactly the instant it was taken.
    g.write("os", 1 * MiB, 64 * 1024, 0x33)
    g.write("data", 0, 64 * 1024, 0x34)
    for fd in cut.disks:
        assert chain_bytes(fd.chain) == frozen[fd.disk_id]
    assert backend.outstanding_cut("web01") is not None

    # Release folds the cut into the VHDX/VHD, which is then exactly the cut.
    backend.release_cut("web01", cut.cut_id)
    assert backend.outstanding_cut("web01") is None
    for fd in cut.disks:
        assert chain_bytes((fd.chain[0],)) == frozen[fd.disk_id]
    # ... and QEMU's own tools read the same bytes (VHDX also passes qemu-img check).
    for fd in cut.disks:
        raw = fd.chain[0].with_suffix(".raw")
        out = subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(fd.chain[0]), str(raw)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert raw.read_bytes() == frozen[fd.disk_id]
        raw.unlink()
        if fd.format == "vhdx":
            out = subprocess.run(
                ["qemu-img", "check", "-U", str(fd.chain[0])], capture_output=True, text=True
            )
            assert out.returncode == 0, out.stdout + out.stderr

    # The next cut covers only what came after.
    nxt = backend.take_cut("web01")
    assert aligned(list(next(d for d in nxt.disks if d.disk_id == "os").changed or [])) == {16}
    assert aligned(list(next(d for d in nxt.disks if d.disk_id == "data").changed or [])) == {0}
    for fd in nxt.disks:
        assert chain_bytes(fd.chain) == bytes(g.model[fd.disk_id])


def test_a_cut_taken_while_one_is_outstanding_covers_both(backend: QemuBackend) -> None:
    backend.create_vm("db01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("db01", "running")
    g = Guest(backend, "db01", {"os": 8 * MiB})
    first = backend.take_cut("db01")
    backend.release_cut("db01", first.cut_id)
    backend.reset_tracking("db01", first.cut_id)
    g.write("os", 0, K64, 0x41)
    lost = backend.take_cut("db01")  # its cycle fails: never released
    g.write("os", 2 * MiB, K64, 0x42)
    again = backend.take_cut("db01")
    assert again.cut_id != lost.cut_id
    (fd,) = again.disks
    assert aligned(list(fd.changed or [])) == {0, 32}
    assert chain_bytes(fd.chain) == bytes(g.model["os"])
    backend.release_cut("db01", lost.cut_id)  # a stale release changes nothing
    assert backend.outstanding_cut("db01") is not None


def test_tracking_survives_an_agent_restart_and_a_clean_stop(
    backend: QemuBackend, tmp_path: Path
) -> None:
    backend.create_vm("app01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("app01", "running")
    g = Guest(backend, "app01", {"os": 8 * MiB})
    first = backend.take_cut("app01")
    backend.release_cut("app01", first.cut_id)
    backend.reset_tracking("app01", first.cut_id)
    g.write("os", 1 * MiB, K64, 0x51)

    # A new agent (a new backend object) finds the running VM and its tracking.
    restarted = QemuBackend(tmp_path / "vms", accel="tcg", stop_timeout=1)
    (rec,) = restarted.inventory().vms
    assert rec.state == "running"
    cut = restarted.take_cut("app01")
    assert cut.trusted
    assert aligned(list(cut.disks[0].changed or [])) == {16}
    restarted.release_cut("app01", cut.cut_id)

    # Powered off (the firmware ignores the power button: QEMU is told to quit, cleanly)
    # and on again: the writes in between are still tracked.
    g.write("os", 3 * MiB, K64, 0x52)
    assert restarted.set_vm_state("app01", "off").state == "off"
    assert restarted.set_vm_state("app01", "running").state == "running"
    g.write("os", 5 * MiB, K64, 0x53)
    cut = restarted.take_cut("app01")
    assert cut.trusted
    assert aligned(list(cut.disks[0].changed or [])) == {48, 80}
    assert chain_bytes(cut.disks[0].chain) == bytes(g.model["os"])


def test_a_killed_qemu_makes_tracking_untrusted(backend: QemuBackend) -> None:
    backend.create_vm("k01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("k01", "running")
    g = Guest(backend, "k01", {"os": 8 * MiB})
    first = backend.take_cut("k01")
    backend.release_cut("k01", first.cut_id)
    backend.reset_tracking("k01", first.cut_id)
    g.write("os", 0, K64, 0x61)
    folder, _ = backend.find_vm("k01")
    inst = qemu_vm.running_instance(Runtime(folder))
    assert inst is not None
    os.kill(inst.pid, signal.SIGKILL)
    assert qemu_vm.wait_gone(inst, 10)
    assert backend.set_vm_state("k01", "running").state == "running"
    cut = backend.take_cut("k01")
    assert not cut.trusted
    assert "without closing its disks" in cut.untrusted_reason
    assert all(fd.changed is None for fd in cut.disks)
    # A resync of this cut makes tracking trusted again.
    backend.release_cut("k01", cut.cut_id)
    backend.reset_tracking("k01", cut.cut_id)
    g.write("os", 2 * MiB, K64, 0x62)
    assert backend.take_cut("k01").trusted


def test_a_base_changed_while_off_is_not_trusted(backend: QemuBackend) -> None:
    backend.create_vm("b01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("b01", "running")
    first = backend.take_cut("b01")
    backend.release_cut("b01", first.cut_id)
    backend.reset_tracking("b01", first.cut_id)
    backend.set_vm_state("b01", "off")
    cut = backend.take_cut("b01")
    backend.release_cut("b01", cut.cut_id)  # off: folded by sitepair itself
    base = backend.disk_chains("b01")["os"][0]
    with vdisk.open_disk(base) as d:  # somebody writes the VHDX behind sitepair's back
        d.write(0, b"x" * 4096)
    cut = backend.take_cut("b01")
    assert not cut.trusted and "changed outside sitepair" in cut.untrusted_reason


def test_a_disk_graph_changed_behind_sitepairs_back_is_refused(backend: QemuBackend) -> None:
    backend.create_vm("g01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("g01", "running")
    folder, _ = backend.find_vm("g01")
    layers = json.loads((folder / "layers.json").read_text())
    layers["overlays"]["os"] = [99]  # not what QEMU runs on
    (folder / "layers.json").write_text(json.dumps(layers))
    with pytest.raises(FailedPrecondition, match="not where sitepair left them"):
        backend.take_cut("g01")
    assert (
        "not on the layer" in json.loads((folder / "layers.json").read_text())["untrusted_reason"]
    )


def test_kvm_is_chosen_only_when_a_guest_really_runs() -> None:
    ok, why = qemu_vm.probe_accel("qemu-system-x86_64", "tcg")
    assert ok, why
    ok, why = qemu_vm.probe_accel("/nonexistent/qemu", "kvm")
    assert not ok and "not found" in why
    assert qemu_vm.choose_accel("qemu-system-x86_64", "tcg") == "tcg"


def test_an_application_consistent_cut_without_a_guest_agent_is_refused_plainly(
    backend: QemuBackend,
) -> None:
    """No qemu-guest-agent answers in this guest (there is no guest): the backend says so (the
    loop then takes a crash-consistent cut and health reports app-consistent-failing), and
    nothing is left half-done. tests/qemu has a guest that runs the agent."""
    from agent.hosts.base import QuiesceFailed

    backend.create_vm("q01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("q01", "running")
    with pytest.raises(QuiesceFailed, match="qemu-guest-agent"):
        backend.take_cut("q01", app_consistent=True)
    assert backend.outstanding_cut("q01") is None
    assert not backend.take_cut("q01").app_consistent


def test_the_inventory_does_not_mistake_an_operation_in_progress_for_an_interrupted_one(
    backend: QemuBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The inventory reads layers.json without the VM's lock; an intent there belongs to a cut
    in progress and must not make tracking untrusted."""
    backend.create_vm("i01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("i01", "running")
    first = backend.take_cut("i01")
    backend.release_cut("i01", first.cut_id)
    backend.reset_tracking("i01", first.cut_id)
    folder, _ = backend.find_vm("i01")
    doc = json.loads((folder / "layers.json").read_text())
    doc["intent"] = "adding overlay 9"  # as a concurrent cut leaves it mid-way
    (folder / "layers.json").write_text(json.dumps(doc))
    caplog.clear()
    backend.inventory()
    backend.disk_chains("i01")
    assert "untrusted" not in caplog.text  # it used to warn of an interrupted operation
    assert json.loads((folder / "layers.json").read_text())["trusted"]
    # Found under the lock (nobody is mid-way any more), it is an interrupted operation.
    assert not backend.take_cut("i01").trusted


def test_a_cut_released_after_the_vm_stopped_keeps_the_later_writes_tracked(
    backend: QemuBackend,
) -> None:
    """A cycle's cut taken while the VM ran, released after it was powered off: the layer the
    guest wrote after the cut must not be left pointing at a deleted one, and its writes must be
    in the next cut."""
    backend.create_vm("s01", disks=[("os", "vhdx", 8 * MiB)])
    backend.set_vm_state("s01", "running")
    g = Guest(backend, "s01", {"os": 8 * MiB})
    first = backend.take_cut("s01")
    backend.release_cut("s01", first.cut_id)
    backend.reset_tracking("s01", first.cut_id)
    g.write("os", 0, K64, 0x71)
    cut = backend.take_cut("s01")
    g.write("os", 4 * MiB, K64, 0x72)  # after the cut
    backend.set_vm_state("s01", "off")
    backend.release_cut("s01", cut.cut_id)
    (chain,) = backend.disk_chains("s01").values()
    assert chain_bytes(tuple(chain)) == bytes(g.model["os"])  # every layer still readable
    nxt = backend.take_cut("s01")
    assert nxt.trusted
    assert aligned(list(nxt.disks[0].changed or [])) == {64}
    assert chain_bytes(nxt.disks[0].chain) == bytes(g.model["os"])
    assert backend.set_vm_state("s01", "running").state == "running"
