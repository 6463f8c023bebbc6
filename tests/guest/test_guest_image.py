"""The test guest, end to end: built from Debian packages, booted by SeaBIOS from a VHDX on
virtio-blk, writing records it acknowledges only once durable, shutting down cleanly on the
ACPI power button, and verifying every acknowledged record on the next boot, after a clean
shutdown, after a SIGKILL of QEMU mid-write, and (negative) after one record was corrupted.
With a guest agent channel it runs the real qemu-guest-agent, whose fsfreeze stops the writer.

Timeouts here only stop hangs; nothing asserts how fast anything is."""

from __future__ import annotations

import gzip
import subprocess
import time
from pathlib import Path

import pytest

from sitepair.vdisk.ops import convert
from tests.support.guest import (
    ConsoleLog,
    GuestImage,
    GuestTimeout,
    GuestVM,
    check_data_disk,
    corrupt_record,
    launch_guest,
    record_bytes,
    record_digest,
)

pytestmark = pytest.mark.timeout(600)

BOOT = 180  # seconds; a TCG boot takes a few, a loaded shared machine more
SEED = 7


def assert_acks_match_records(acks: list[tuple[int, str]], seed: int) -> None:
    """Every ACK names the digest of the bytes the generator defines for its seq."""
    for seq, digest in acks:
        assert digest == record_digest(seed, seq), f"ACK {seq} digest differs from the record's"


def assert_consecutive(acks: list[tuple[int, str]], first: int) -> None:
    assert [s for s, _ in acks] == list(range(first, first + len(acks)))


def boot(disks: tuple[Path, Path], workdir: Path, name: str, **kwargs: object) -> GuestVM:
    boot_disk, data_disk = disks
    return launch_guest(boot_disk, data_disk, workdir, name=name, seed=SEED, **kwargs)  # type: ignore[arg-type]


def test_image_disks_match_their_raw_images(guest_image: GuestImage) -> None:
    """The VHDX templates written by sitepair.vdisk hold exactly the raw images, for qemu-img."""
    for raw, vhdx in (
        (guest_image.boot_raw, guest_image.boot_template),
        (guest_image.data_raw, guest_image.data_template),
    ):
        r = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(vhdx)], capture_output=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "vhdx", str(raw), str(vhdx)],
            capture_output=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    order = guest_image.manifest["load_order"]
    for dep, user in (("jbd2.ko", "ext4.ko"), ("crc32c_generic.ko", "ext4.ko"),
                      ("virtio.ko", "virtio_blk.ko"), ("virtio_ring.ko", "virtio_pci.ko"),
                      ("virtio.ko", "virtio_console.ko")):  # fmt: skip
        assert order.index(dep) < order.index(user)
    # The cache gives the same image back without rebuilding.
    assert GuestImage.build(guest_image.directory.parent.parent).key == guest_image.key
    initrd = gzip.decompress((guest_image.directory / "initrd.gz").read_bytes())
    assert b"usr/sbin/qemu-ga\0" in initrd  # the real guest agent, from qemu-guest-agent


def test_records_are_deterministic() -> None:
    a = record_bytes(SEED, 1)
    assert a == record_bytes(SEED, 1)
    assert a != record_bytes(SEED, 2) and a != record_bytes(SEED + 1, 1)
    sizes = [len(record_bytes(SEED, s)) for s in range(1, 50)]
    assert min(sizes) >= 16 * 1024 and max(sizes) <= 66 * 1024 + 1024


def test_console_log_parser(tmp_path: Path) -> None:
    """Only complete lines that start with SITEPAIR count; kernel noise and CRs are ignored."""
    d1, d2 = record_digest(1, 1), record_digest(1, 2)
    log = tmp_path / "c.log"
    log.write_bytes(
        b"[    1.0] virtio_blk virtio1: [vdb] SITEPAIR ACK 9 " + d1.encode() + b"\r\n"
        b"SITEPAIR FSCK preen=1 check=0 journal=1 verdict=replayed\r\n"
        b"SITEPAIR VERIFY count=4 last=4 ok=0 torn=1 bad=3 reason=digest\r\n"
        b"SITEPAIR QGA started port=/dev/vport2p1\r\n"
        b"SITEPAIR ACK 1 " + d1.encode() + b"\r\n"
        b"SITEPAIR ACK 2 " + d2.encode()
    )
    c = ConsoleLog(log)
    assert c.acks() == [(1, d1)]
    assert c.fsck() is not None and c.fsck().verdict == "replayed" and c.fsck().consistent  # type: ignore[union-attr]
    v = c.verify()
    assert v is not None and (v.count, v.ok, v.torn, v.bad, v.reason) == (
        4,
        False,
        True,
        3,
        "digest",
    )
    assert not c.shutdown_clean()
    assert c.qga() == "started"
    with pytest.raises(GuestTimeout, match="SITEPAIR ACK 2"):
        c.wait_for(lambda c: len(c.acks()) >= 2, timeout=0.3, what="2 ACKs")


# Covered in every run by tests/qemu (a planned failover shuts the guest down through ACPI and
# the copy verifies every acknowledged record); here in make test-slow, to keep the default run
# under 15 minutes.
@pytest.mark.slow
def test_powerdown_then_every_acked_record_verifies(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    with boot(disks, tmp_path, "first") as vm:
        vm.wait_ready(BOOT)
        vm.wait_acks(5, BOOT)
        assert vm.powerdown() == 0
        first = vm.console
        assert first.shutdown_clean(), first.tail()
    # Without a virtio-serial channel the guest agent is not started, and nothing else changes.
    assert "SITEPAIR QGA failed reason=nochannel" in first.lines()
    acks = first.acks()
    assert_consecutive(acks, 1)
    assert_acks_match_records(acks, SEED)
    fsck = first.fsck()
    assert fsck is not None and fsck.verdict == "clean"

    with boot(disks, tmp_path, "second") as vm:
        vm.wait_ready(BOOT)
        second = vm.console
        report = second.verify()
        assert report is not None and report.ok and not report.torn, second.tail()
        # A clean shutdown lets the record in flight finish: the log holds exactly the ACKs.
        assert report.count == report.last == acks[-1][0]
        fsck = second.fsck()
        assert fsck is not None and fsck.verdict == "clean", second.tail()
        more = vm.wait_acks(2, BOOT)
        assert_consecutive(more, acks[-1][0] + 1)
        assert_acks_match_records(more, SEED)
        assert vm.powerdown() == 0
        assert second.shutdown_clean()


# Covered in every run by tests/qemu's unplanned failover (SIGKILL mid-write, then the copy boots
# and verifies); both rounds here run in make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("round_", [0, 1])
def test_sigkill_mid_write_keeps_every_acked_record(
    disks: tuple[Path, Path], tmp_path: Path, round_: int
) -> None:
    """QEMU is SIGKILLed while the writer runs flat out (no pause between records), so a
    record is almost always in flight; the next boot must find every acknowledged record."""
    with boot(disks, tmp_path, "killed", interval=0) as vm:
        vm.wait_ready(BOOT)
        vm.wait_acks(8 + 3 * round_, BOOT)
        vm.kill()
        killed = vm.console
    acks = killed.acks()
    assert_consecutive(acks, 1)
    assert_acks_match_records(acks, SEED)
    # The VHDX QEMU left behind reads the same through sitepair.vdisk as through qemu-img.
    ours = tmp_path / "after-kill.raw"
    convert(disks[1], ours, format="raw", subformat="fixed")
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vhdx", str(ours), str(disks[1])],
        capture_output=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    with boot(disks, tmp_path, "after", interval=0) as vm:
        vm.wait_ready(BOOT)
        after = vm.console
        fsck = after.fsck()
        assert fsck is not None and fsck.consistent, after.tail()
        report = after.verify()
        assert report is not None and report.ok, after.tail()
        # Records written but not acknowledged may be there too.
        assert report.count >= acks[-1][0]
        more = vm.wait_acks(1, BOOT)
        assert more[0][0] == report.last + 1
        assert_acks_match_records(more, SEED)
        assert vm.powerdown() == 0
        assert after.shutdown_clean()


def test_a_corrupted_record_fails_verification(disks: tuple[Path, Path], tmp_path: Path) -> None:
    """Flip one byte of record 3's file inside the data VHDX (found with debugfs, written
    through sitepair.vdisk): the next boot reports ok=0 for record 3 and writes nothing."""
    with boot(disks, tmp_path, "writer", max_records=5) as vm:
        vm.wait_for(lambda c: any(x.startswith("SITEPAIR WRITER done") for x in c.lines()),
                    BOOT, "the writer to finish 5 records")  # fmt: skip
        assert vm.powerdown() == 0
        assert vm.console.shutdown_clean()
    assert [s for s, _ in vm.console.acks()] == [1, 2, 3, 4, 5]

    corrupt_record(disks[1], 3)
    with boot(disks, tmp_path, "corrupt") as vm:
        vm.wait_ready(BOOT)
        c = vm.console
        report = c.verify()
        assert report is not None, c.tail()
        assert (report.ok, report.bad, report.reason, report.count) == (False, 3, "digest", 5)
        fsck = c.fsck()
        assert fsck is not None and fsck.verdict == "clean"  # the filesystem itself is fine
        assert "SITEPAIR READY writer=0" in c.lines()
        assert vm.powerdown() == 0
        assert c.acks() == []


@pytest.mark.slow  # the qemu backend's VMs (tests/qemu) boot on the pc machine in every run
def test_boots_on_the_pc_machine_too(disks: tuple[Path, Path], tmp_path: Path) -> None:
    """SeaBIOS on i440fx boots the same virtio-blk disk; the power button works there too."""
    with boot(disks, tmp_path, "pc", machine="pc") as vm:
        vm.wait_acks(1, BOOT)
        assert vm.powerdown() == 0
        assert vm.console.shutdown_clean()


@pytest.mark.slow  # tests/qemu/test_app_consistent.py freezes through the backend every run
def test_guest_agent_freeze_stops_the_writer_until_thawed(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    """The guest runs the real qemu-guest-agent on its virtio-serial port: guest-fsfreeze-freeze
    freezes the data filesystem (FIFREEZE), so the writer's ACKs stop (at most the record
    already past its last sync is acknowledged) until guest-fsfreeze-thaw; every record is
    intact afterwards. One boot: the disk is checked offline after the clean shutdown."""
    with boot(disks, tmp_path, "qga", qga=True) as vm:
        vm.wait_ready(BOOT)
        c = vm.console
        assert c.qga() == "started", c.tail()
        # The writer's pace, to know how long "no ACK" means anything.
        n = len(vm.wait_acks(3, BOOT))
        t = time.monotonic()
        vm.wait_acks(n + 3, BOOT)
        period = (time.monotonic() - t) / 3
        with vm.agent() as qga:
            assert qga.execute("guest-fsfreeze-status") == "thawed"
            assert qga.execute("guest-fsfreeze-freeze", timeout=120) == 1  # /data only
            at_freeze = c.last_ack()
            assert qga.execute("guest-fsfreeze-status") == "frozen"
            # Frozen for many record periods: no ACK but the one that may have been in flight.
            time.sleep(min(30.0, max(3.0, 8 * period)))
            while_frozen = c.last_ack()
            assert while_frozen <= at_freeze + 1, c.tail()
            assert qga.execute("guest-fsfreeze-thaw", timeout=120) == 1
            assert qga.execute("guest-fsfreeze-status") == "thawed"
        vm.wait_for(lambda c: c.last_ack() > while_frozen, BOOT, "an ACK after the thaw")
        assert vm.powerdown() == 0
        assert c.shutdown_clean(), c.tail()
    acks = c.acks()
    assert_consecutive(acks, 1)
    assert_acks_match_records(acks, SEED)
    # Every acknowledged record, and nothing else, is on the disk, byte for byte.
    assert check_data_disk(disks[1], SEED) == acks
