"""The VHDX log: replay after a crash (writable), replay in memory (read-only), the active
sequence search of [MS-VHDX] 2.3.3, and crash safety under SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import SubFormat
from sitepair.vdisk.vhdx import VhdxDisk, open_vhdx
from sitepair.vdisk.vhdx_create import create_vhdx
from sitepair.vdisk.vhdx_log import (
    SECTOR,
    build_entry,
    find_active_sequence,
    overlay_from_sequence,
)
from tests.vdisk.vhdx_helpers import (
    MiB,
    pyvhdi_sha256,
    qemu_check,
    qemu_raw,
    require_qemu,
    sha256,
)


class SimulatedCrash(Exception):
    pass


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crash_after_log_entry(disk: VhdxDisk, entries_before_crash: int = 1) -> None:
    """Make the next flush stop dead after its n-th log entry is durable, before the in-place
    metadata write, then drop the file without any cleanup (what a power cut leaves)."""
    count = 0

    def hook() -> None:
        nonlocal count
        count += 1
        if count >= entries_before_crash:
            raise SimulatedCrash

    disk._after_log_entry_hook = hook
    with pytest.raises(SimulatedCrash):
        disk.flush()
    disk._abandon()


def make_crashed_image(path: Path, *, subformat: SubFormat = SubFormat.DYNAMIC) -> bytes:
    """An image whose last flush crashed between log and in-place write; returns the guest
    bytes it must read as."""
    size = 16 * MiB
    model = bytearray(size)
    with create_vhdx(path, size=size, subformat=subformat, block_size=MiB) as d:
        d.write(0, b"old" * 1000)
        model[0:3000] = b"old" * 1000
    disk = open_vhdx(path)
    assert isinstance(disk, VhdxDisk)
    rng = random.Random(3)
    for i in range(12):
        off = rng.randrange(size - 70000)
        data = bytes([i + 1]) * 65536
        disk.write(off, data)
        model[off : off + len(data)] = data
    crash_after_log_entry(disk)
    return bytes(model)


def bat_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(3 * MiB)  # our layout: the BAT region starts at 3 MiB
        return f.read(SECTOR)


def test_writable_open_replays_the_log(tmp_path: Path) -> None:
    img = tmp_path / "crashed.vhdx"
    model = make_crashed_image(img)
    before = bat_bytes(img)
    with open_vhdx(img) as disk:
        assert isinstance(disk, VhdxDisk)
        assert disk.read(0, len(model)) == model
    assert bat_bytes(img) != before  # the replay wrote the BAT sectors in place
    with open_vhdx(img, read_only=True) as disk:
        assert disk.info().details["log_empty"] is True
        assert disk.read(0, len(model)) == model
    require_qemu()
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == model
    assert pyvhdi_sha256(img) == sha256(model)


def test_read_only_open_reads_as_if_replayed_and_changes_nothing(tmp_path: Path) -> None:
    img = tmp_path / "crashed.vhdx"
    model = make_crashed_image(img)
    digest = file_hash(img)
    mtime = img.stat().st_mtime_ns
    with open_vhdx(img, read_only=True) as disk:
        details = disk.info().details
        assert details["log_empty"] is False
        assert details["log_entries_replayed_in_memory"] == 1
        assert disk.read(0, len(model)) == model
        covered = bytearray(len(model))
        for off, n in disk.allocated_ranges():
            covered[off : off + n] = model[off : off + n]
        assert bytes(covered) == model
    assert file_hash(img) == digest
    assert img.stat().st_mtime_ns == mtime


def test_crash_in_a_differencing_child_replays_bitmaps(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, size=8 * MiB, subformat=SubFormat.DYNAMIC, block_size=MiB) as d:
        d.write(0, os.urandom(8 * MiB))
        model = bytearray(d.read(0, 8 * MiB))
    child = tmp_path / "child.avhdx"
    disk = create_vhdx(child, size=0, subformat=SubFormat.DIFFERENCING, parent=base)
    assert isinstance(disk, VhdxDisk)
    for off in (700, 3 * MiB + 4096, 5 * MiB - 100):
        disk.write(off, b"\xee" * 3000)
        model[off : off + 3000] = b"\xee" * 3000
    crash_after_log_entry(disk)
    digest = file_hash(child)
    with open_vhdx(child, read_only=True) as d:
        assert d.read(0, 8 * MiB) == model
    assert file_hash(child) == digest
    with open_vhdx(child) as d:
        assert d.read(0, 8 * MiB) == model
    assert pyvhdi_sha256(child, [base]) == sha256(bytes(model))


def test_log_wraps_around_the_ring(tmp_path: Path) -> None:
    """Dozens of flushes of ~44 KiB log entries wrap the 1 MiB ring twice; the newest wins."""
    img = tmp_path / "wrap.vhdx"
    size = 64 << 30  # sparse: 1 MiB blocks, so ten blocks 512 apart are in ten BAT sectors
    written: dict[int, bytes] = {}
    disk = create_vhdx(img, size=size, subformat=SubFormat.DYNAMIC, block_size=MiB)
    assert isinstance(disk, VhdxDisk)
    for i in range(60):
        for k in range(10):
            off = (k * 600 + i) * MiB + 512 * k
            data = (i * 10 + k + 1).to_bytes(2, "little") * 1024
            disk.write(off, data)
            written[off] = data
        if i < 59:
            disk.flush()
    crash_after_log_entry(disk)
    blocks = sorted({off // MiB for off in written})
    for read_only in (True, False):
        with open_vhdx(img, read_only=read_only) as d:
            for off, data in written.items():
                assert d.read(off, len(data)) == data
            covered = [b for o, n in d.allocated_ranges() for b in range(o // MiB, (o + n) // MiB)]
            assert covered == blocks


def test_truncated_below_flushed_file_offset_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "crashed.vhdx"
    make_crashed_image(img)
    os.truncate(img, 5 * MiB)
    with pytest.raises(VirtualDiskError, match=r"FlushedFileOffset.*truncated"):
        open_vhdx(img, read_only=True)


def test_log_guid_without_entries_is_refused(tmp_path: Path) -> None:
    from tests.vdisk.vhdx_helpers import edit_both_headers

    img = tmp_path / "x.vhdx"
    create_vhdx(img, size=4 * MiB, subformat=SubFormat.DYNAMIC).close()
    edit_both_headers(img, 48, uuid.uuid4().bytes_le)  # LogGuid
    for ro in (True, False):
        with pytest.raises(VirtualDiskError, match="no valid, complete log sequence"):
            open_vhdx(img, read_only=ro)


# -- the active sequence search on synthetic rings ---------------------------------------------
LOG_LEN = 256 * 1024
GUID = uuid.uuid4()


class Ring:
    def __init__(self) -> None:
        self.buf = bytearray(LOG_LEN)

    def put(self, offset: int, entry: bytes) -> int:
        for i, b in enumerate(entry):
            self.buf[(offset + i) % LOG_LEN] = b
        return (offset + len(entry)) % LOG_LEN

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.buf[off : off + n])

    def search(self) -> list[int]:
        seq = find_active_sequence(self.read, LOG_LEN, GUID, (10 * MiB, 10 * MiB + LOG_LEN))
        return [e.sequence_number for e in seq]


def entry(seq: int, tail: int, value: int, target: int = MiB, guid: uuid.UUID = GUID) -> bytes:
    return build_entry(
        sequence_number=seq,
        tail=tail,
        log_guid=guid,
        flushed_file_offset=2 * MiB,
        last_file_offset=4 * MiB,
        writes=[(target, bytes([value]) * SECTOR)],
    )


def test_search_follows_tails_back_through_a_sequence() -> None:
    ring = Ring()
    pos = ring.put(0, entry(5, 0, 1))
    second = pos
    pos = ring.put(pos, entry(6, 0, 2))
    ring.put(pos, entry(7, second, 3))  # the tail moved past entry 5
    assert ring.search() == [6, 7]


def test_search_ignores_a_torn_head_and_foreign_guids() -> None:
    ring = Ring()
    pos = ring.put(0, entry(1, 0, 1))
    torn_at = pos
    ring.put(pos, entry(2, torn_at, 2))
    ring.buf[torn_at + SECTOR + 100] ^= 0xFF  # the newest entry was torn: CRC fails
    ring.put(100 * 1024, entry(9, 100 * 1024, 9, guid=uuid.uuid4()))  # another session's
    assert ring.search() == [1]


def test_search_finds_an_entry_that_wraps_the_ring_end() -> None:
    ring = Ring()
    ring.put(0, entry(3, 0, 3))
    start = LOG_LEN - SECTOR  # descriptor sector at the end, data sector wrapped to 0
    ring.put(start, entry(4, start, 4))
    seq = find_active_sequence(ring.read, LOG_LEN, GUID, (10 * MiB, 10 * MiB + LOG_LEN))
    assert [e.sequence_number for e in seq] == [4]
    overlay = overlay_from_sequence(seq)
    buf = bytearray(SECTOR)
    overlay.apply(MiB, buf)
    assert buf == bytes([4]) * SECTOR


def test_search_rejects_entries_that_write_the_headers_or_the_log() -> None:
    ring = Ring()
    ring.put(0, entry(1, 0, 1, target=64 * 1024))  # header 1
    ring.put(8 * 1024, entry(2, 8 * 1024, 1, target=10 * MiB))  # the log itself
    assert ring.search() == []


# -- SIGKILL during heavy writes -----------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from sitepair.vdisk.vhdx import open_vhdx
    path, seed, first_group = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    disk = open_vhdx(path)
    group = first_group
    while True:
        for op in ops(seed, group):
            kind, off, n, value = op
            if kind == "z":
                disk.write_zeroes(off, n)
            else:
                disk.write(off, bytes([value]) * n)
        disk.flush()
        print("F", group, flush=True)
        group += 1
    """
)
OPS = textwrap.dedent(
    """
    import random
    SIZE, SECTOR_SIZE, PER_GROUP = 16 << 20, 512, 8
    def ops(seed, group):
        rng = random.Random(seed * 1_000_003 + group)
        out = []
        for j in range(PER_GROUP):
            off = rng.randrange(SIZE // SECTOR_SIZE) * SECTOR_SIZE
            n = min(rng.choice((1, 8, 128, 512, 2048)) * SECTOR_SIZE, SIZE - off)
            if rng.random() < 0.15:
                out.append(("z", off, n, 0))
            else:
                out.append(("w", off, n, (group * 8 + j) % 255 + 1))
        return out
    """
)


def test_sigkill_during_writes_never_loses_flushed_data(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec(OPS, namespace)  # the same deterministic operations the writer runs
    ops = namespace["ops"]
    size = 16 * MiB
    img = tmp_path / "crash.vhdx"
    create_vhdx(img, size=size, subformat=SubFormat.DYNAMIC, block_size=MiB).close()
    script = tmp_path / "writer.py"
    script.write_text(OPS + WRITER)
    model = bytearray(size)
    rng = random.Random(11)
    group = 0
    deadline = time.monotonic() + 40
    rounds = 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    while time.monotonic() < deadline and rounds < 30:
        rounds += 1
        seed = rng.randrange(1 << 30)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(img), str(seed), str(group)],
            stdout=subprocess.PIPE,
            env=env,
        )
        time.sleep(rng.uniform(0.35, 0.9))
        proc.kill()
        out, _ = proc.communicate()
        # Only whole lines: the kill can cut the last one short.
        flushed = [int(line.split()[1]) for line in out.decode().split("\n")[:-1] if line]
        last = flushed[-1] if flushed else group - 1
        # Every group up to `last` was flushed; the next two may be partly on disk.
        for g in range(group, last + 1):
            for kind, off, n, value in ops(seed, g):  # type: ignore[operator]
                model[off : off + n] = bytes([value]) * n if kind == "w" else bytes(n)
        candidates: dict[int, set[int]] = {}
        for g in (last + 1, last + 2):
            for _kind, off, n, value in ops(seed, g):  # type: ignore[operator]
                for sector in range(off // 512, (off + n) // 512):
                    candidates.setdefault(sector, set()).add(value)
        with open_vhdx(img) as disk:  # replays whatever the kill left in the log
            actual = disk.read(0, size)
        for sector in range(size // 512):
            got = actual[sector * 512 : (sector + 1) * 512]
            want = model[sector * 512 : (sector + 1) * 512]
            if got == want:
                continue
            value = got[0]
            assert got == bytes([value]) * 512, f"round {rounds}: sector {sector} is torn"
            assert value in candidates.get(sector, set()), (
                f"round {rounds}: sector {sector} holds {value}, neither the flushed content "
                "nor an unflushed write"
            )
        model[:] = actual  # unflushed writes that made it become the baseline
        group = last + 3
        require_qemu()
        qemu_check(img)
    assert rounds >= 5
