"""When the change log can be trusted and when it cannot: a killed writer (trusted, same boot),
a reboot, disks changed behind the backend's back, missing or damaged logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from agent.hosts import changelog
from agent.hosts.directory import DirectoryBackend
from sitepair import vdisk
from sitepair.errors import Unavailable
from tests.hosts.helpers import (
    BLOCK,
    SIZES,
    Model,
    WriterLog,
    blocks_of_ranges,
    blocks_of_writes,
    differing_blocks,
    read_cut,
    start_writer,
    wait_for,
)

OTHER_BOOT = "0b0b0b0b-0000-4000-8000-000000000001"


def kill_writer_midstream(
    vm_root: Path, vm: str, tmp_path: Path, seed: int, *extra: str, writes: int = 40
) -> tuple[int, int]:
    """Start a writer process, SIGKILL it after ``writes`` writes; returns (started, done)."""
    log = tmp_path / "writer.log"
    proc = start_writer(vm_root, vm, seed, log, tmp_path / "stop", *extra)
    wl = WriterLog(log)
    wait_for(lambda: wl.marks()[1] >= writes, "writes")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    started, done, _ready, ended = wl.marks()
    assert not ended
    return started, done


def test_killed_writer_leaves_trusted_tracking(
    backend: DirectoryBackend, vm: str, vm_root: Path, tmp_path: Path
) -> None:
    seed = 21
    started, done = kill_writer_midstream(vm_root, vm, tmp_path, seed, "--flush-every", "1")
    header = changelog.read_header(
        changelog.log_path(vm_root / vm, "os", backend.read_vm(vm_root / vm).disk("os").active)
    )
    assert header.state_name == "open"  # left open by the dead writer

    cut = backend.take_cut(vm)
    assert cut.trusted, cut.untrusted_reason
    model = Model(seed, aligned=False)
    model.advance(done)
    content = read_cut(cut)
    # Every write that returned was flushed before the kill; the one in flight may be partial.
    in_flight = blocks_of_writes(seed, done + 1, started, aligned=False)
    written = blocks_of_writes(seed, 1, started, aligned=False)
    for fd in cut.disks:
        assert fd.changed is not None
        got = blocks_of_ranges(fd.changed)
        assert blocks_of_writes(seed, 1, done, aligned=False)[fd.disk_id] <= got
        assert got <= written[fd.disk_id]
        assert (
            differing_blocks(bytes(model.disks[fd.disk_id]), content[fd.disk_id])
            <= in_flight[fd.disk_id]
        )

    # A new writer carries on where the dead one stopped.
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"n" * 512)
    cut2 = backend.take_cut(vm)
    assert cut2.trusted
    assert cut2.disks[0].changed is not None and (0, BLOCK) in cut2.disks[0].changed


@pytest.mark.parametrize("noticed_by", ["cut", "writer"])
def test_reboot_makes_tracking_untrusted(
    vm: str, vm_root: Path, tmp_path: Path, noticed_by: str
) -> None:
    kill_writer_midstream(vm_root, vm, tmp_path, 22, writes=20)
    rebooted = DirectoryBackend(vm_root, boot_id=lambda: OTHER_BOOT)
    folder = vm_root / vm
    active = {d.id: folder / d.active for d in rebooted.read_vm(folder).disks}
    if noticed_by == "writer":
        # A writer after the reboot reopens the log left open in the old boot: it keeps the
        # fact (a flag) even though it now holds the log open in the new boot.
        with rebooted.open_writer(vm) as w:
            w.write("os", 0, b"w" * 4096)
            w.write("data", 0, b"w" * 4096)
    cut = rebooted.take_cut(vm)
    assert not cut.trusted
    assert all(d.changed is None for d in cut.disks)
    reason = cut.untrusted_reason
    assert "restarted or lost power" in reason
    assert str(active["os"]) in reason and str(active["data"]) in reason
    assert (
        str(changelog.log_path(folder, "os", rebooted.read_vm(folder).disk("os").chain[-2]))
        in reason
    )

    # Still untrusted until a resync: a further cut keeps the reason.
    again = rebooted.take_cut(vm)
    assert again.untrusted_reason == reason
    # After a resync of that cut, tracking is trusted from it on.
    rebooted.reset_tracking(vm, again.cut_id)
    rebooted.release_cut(vm, again.cut_id)
    with rebooted.open_writer(vm) as w:
        w.write("data", 2 * BLOCK, b"r" * 10)
    after = rebooted.take_cut(vm)
    assert after.trusted, after.untrusted_reason
    assert [d.changed for d in after.disks] == [(), ((2 * BLOCK, BLOCK),)]


def qemu_io_write(path: Path, offset: int, length: int) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed (apt-get install qemu-utils)")
    fmt = "vhdx" if vdisk.detect_format(path) is vdisk.DiskFormat.VHDX else "vpc"
    r = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P 0x5a {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "failed" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_disks_written_behind_the_backends_back(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    backend.set_vm_state(vm, "running")
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"a" * 4096)
    c1 = backend.take_cut(vm)
    backend.release_cut(vm, c1.cut_id)
    backend.set_vm_state(vm, "off")
    spec = backend.read_vm(folder)
    os_active = folder / spec.disk("os").active
    data_base = folder / spec.disk("data").chain[0]
    # While the VM is off: another program writes the VHDX active layer (sitepair.vdisk used
    # directly, not through the backend), and qemu-io writes the VHD base under the chain.
    with vdisk.open_disk(os_active) as d:
        d.write(3 * BLOCK, b"x" * 512)
    qemu_io_write(data_base, 5 * BLOCK, 4096)

    c2 = backend.take_cut(vm)
    assert not c2.trusted and all(d.changed is None for d in c2.disks)
    reason = c2.untrusted_reason
    assert f"{os_active} was modified outside sitepair" in reason
    assert "DataWriteGuid" in reason
    assert f"{data_base} was modified outside sitepair" in reason
    assert read_cut(c2)["data"][5 * BLOCK : 5 * BLOCK + 1] == b"\x5a"

    # A resync of c2 makes the tracking trusted again, and the same change is not reported twice.
    backend.reset_tracking(vm, c2.cut_id)
    backend.release_cut(vm, c2.cut_id)
    with backend.open_writer(vm) as w:
        w.write("os", 7 * BLOCK, b"y" * 4096)
    c3 = backend.take_cut(vm)
    assert c3.trusted, c3.untrusted_reason
    assert [d.changed for d in c3.disks] == [((7 * BLOCK, BLOCK),), ()]


def test_base_written_by_qemu_before_any_cut(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    qemu_io_write(folder / "disks" / "os.vhdx", 0, 65536)
    cut = backend.take_cut(vm)
    assert f"{folder / 'disks' / 'os.vhdx'} was modified outside sitepair" in cut.untrusted_reason
    assert "data.vhd" not in cut.untrusted_reason


def test_missing_and_damaged_logs(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    os_log = changelog.log_path(folder, "os", "disks/os.vhdx")
    data_log = changelog.log_path(folder, "data", "disks/data.vhd")
    os_log.unlink()
    with data_log.open("r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    c1 = backend.take_cut(vm)
    assert (
        f"no change log for the active layer {folder / 'disks' / 'os.vhdx'}" in c1.untrusted_reason
    )
    assert f"the change log of {folder / 'disks' / 'data.vhd'} is damaged" in c1.untrusted_reason
    assert "checksum mismatch" in c1.untrusted_reason
    backend.reset_tracking(vm, c1.cut_id)
    backend.release_cut(vm, c1.cut_id)

    # A writer that finds no log starts one, flagged: the writes before it are unknown.
    spec = backend.read_vm(folder)
    changelog.log_path(folder, "os", spec.disk("os").active).unlink()
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"q" * 100)
    c2 = backend.take_cut(vm)
    assert c2.untrusted_reason.startswith("VM web01 disk os: ")
    assert "was opened for writing without a change log" in c2.untrusted_reason
    assert "disk data" not in c2.untrusted_reason


def test_vm_made_outside_the_backend_needs_a_resync(
    backend: DirectoryBackend, tmp_path: Path
) -> None:
    """A VM folder written by hand (as a replica or an import would be) has no tracking
    history: its first cut is untrusted, and after a resync of that cut tracking starts."""
    folder = backend.vm_root / "imported"
    (folder / "disks").mkdir(parents=True)
    elsewhere = tmp_path / "storage-gold"
    elsewhere.mkdir()
    with vdisk.create_disk(
        elsewhere / "sys.vhdx", format="vhdx", subformat="dynamic", size=4 << 20, block_size=1 << 20
    ) as d:
        d.write(0, b"imported")
    (folder / "vm.json").write_text(
        '{"id": "vm-imported", "name": "imported", "disks": '
        f'[{{"id": "sys", "chain": ["{elsewhere / "sys.vhdx"}"]}}]}}'
    )
    c1 = backend.take_cut("vm-imported")
    assert "no change log for the active layer" in c1.untrusted_reason
    # The checkpoint child of an absolute-path disk lives next to it.
    assert backend.read_vm(folder).disk("sys").chain == (
        str(elsewhere / "sys.vhdx"),
        str(elsewhere / "sys_000001.avhdx"),
    )
    backend.reset_tracking("vm-imported", c1.cut_id)
    backend.release_cut("vm-imported", c1.cut_id)
    with backend.open_writer("imported") as w:
        w.write("sys", BLOCK, b"t")
    c2 = backend.take_cut("imported")
    assert c2.trusted and c2.disks[0].changed == ((BLOCK, BLOCK),)
    assert read_cut(c2)["sys"][:8] == b"imported"


def test_a_hung_writer_makes_the_cut_fail_clearly(vm_root: Path, vm: str) -> None:
    backend = DirectoryBackend(vm_root, lock_timeout=0.3)
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"h")
        stuck = w._mutex  # type: ignore[attr-defined]  # the writer is stuck mid-write
        with stuck, pytest.raises(Unavailable) as err:
            backend.take_cut(vm)
        assert "VM web01: a writer did not release the VM's disks within 0.3 s" in str(err.value)
        assert str(vm_root / vm / "vm.lock") in str(err.value)
        assert backend.outstanding_cut(vm) is None
        w.write("os", 1, b"i")  # the writer goes on
        cut = backend.take_cut(vm)
    assert read_cut(cut)["os"][:2] == b"hi"


def test_a_frozen_layer_is_never_opened_for_writing(backend: DirectoryBackend, vm: str) -> None:
    cut = backend.take_cut(vm)
    folder = backend.vm_root / vm
    frozen_log = changelog.log_path(folder, "os", "disks/os.vhdx")
    assert changelog.read_header(frozen_log).state_name == "frozen"
    with pytest.raises(changelog.ChangeLogError, match="frozen"):
        changelog.LogWriter.open(
            frozen_log,
            disk_id="os",
            layer="disks/os.vhdx",
            virtual_size=SIZES["os"],
            boot=changelog.boot_uuid(changelog.boot_id()),
        )
    assert cut.disks[0].chain == ((folder / "disks" / "os.vhdx").absolute(),)
    assert os.path.exists(folder / "disks" / "os_000001.avhdx")
