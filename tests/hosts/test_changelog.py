"""The change log format on its own: header, bitmap, flags, and layer identities."""

from __future__ import annotations

import itertools
import random
import uuid
from pathlib import Path

import pytest

from agent.hosts import changelog as cl
from sitepair import vdisk

BOOT = uuid.UUID("11111111-2222-4333-8444-555555555555")


def new_log(tmp_path: Path, size: int = 10 * cl.BLOCK_SIZE + 100) -> Path:
    path = tmp_path / "changes" / "d" / "d.vhdx.cbt"
    cl.create_log(path, disk_id="d", layer="disks/d.vhdx", virtual_size=size, identity="vhdx:x")
    return path


def test_header_round_trip_and_damage(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    h = cl.read_header(path)
    assert (h.disk_id, h.layer, h.state_name, h.identity, h.block_size) == (
        "d",
        "disks/d.vhdx",
        "clean",
        "vhdx:x",
        65536,
    )
    assert h.bitmap_bytes == 2 and path.stat().st_size == cl.HEADER_SIZE + 2
    assert cl.LogHeader.unpack(h.pack(), path) == h
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(cl.ChangeLogError, match="checksum mismatch"):
        cl.read_header(path)
    path.write_bytes(b"x" * 10)
    with pytest.raises(cl.ChangeLogError, match="cut short"):
        cl.read_header(path)
    with pytest.raises(cl.ChangeLogMissing):
        cl.read_header(tmp_path / "none.cbt")


def test_writer_marks_bits_before_data_and_closes_clean(tmp_path: Path) -> None:
    path = new_log(tmp_path)
    w = cl.LogWriter.open(
        path, disk_id="d", layer="disks/d.vhdx", virtual_size=10 * 65536 + 100, boot=BOOT
    )
    assert cl.read_header(path).state_name == "open"  # durable before any write
    w.mark(65536 * 2 + 5, 10)
    w.mark(65536 * 9, 65536 + 100)  # the last, short block too
    # On disk at once (a SIGKILL now keeps them): no close needed to see the bits.
    h = cl.read_header(path)
    assert cl.bitmap_ranges(cl.read_bitmap(path, h), h.virtual_size) == (
        (2 * 65536, 65536),
        (9 * 65536, 65536 + 100),
    )
    w.close_clean("vhdx:y")
    h = cl.read_header(path)
    assert (h.state_name, h.identity, h.flags) == ("clean", "vhdx:y", 0)


def test_flags_for_missing_damaged_and_rebooted_logs(tmp_path: Path) -> None:
    path = tmp_path / "d.cbt"
    kw = {"disk_id": "d", "layer": "disks/d.vhdx", "virtual_size": 65536}
    cl.LogWriter.open(path, boot=BOOT, **kw).abandon()  # missing: started, flagged
    assert cl.read_header(path).flags == cl.FLAG_UNTRACKED
    cl.create_log(path, identity="", **kw)
    cl.LogWriter.open(path, boot=BOOT, **kw).abandon()  # left open (a crash) ...
    cl.LogWriter.open(path, boot=BOOT, **kw).abandon()  # ... same boot: fine
    assert cl.read_header(path).flags == 0
    cl.LogWriter.open(path, boot=uuid.uuid4(), **kw).abandon()  # another boot
    assert cl.read_header(path).flags == cl.FLAG_REBOOT
    cl.create_log(path, identity="", disk_id="other", layer="disks/d.vhdx", virtual_size=65536)
    cl.LogWriter.open(path, boot=BOOT, **kw).abandon()  # another disk's log: replaced
    h = cl.read_header(path)
    assert (h.disk_id, h.flags) == ("d", cl.FLAG_REPLACED)


def test_bitmap_ranges_and_union() -> None:
    rng = random.Random(5)
    size = 1000 * 65536 - 7
    for _ in range(20):
        blocks = {rng.randrange(1000) for _ in range(rng.randrange(200))}
        bits = bytearray(cl.bitmap_bytes(size))
        for b in blocks:
            bits[b // 8] |= 1 << (b % 8)
        got = cl.bitmap_ranges(bytes(bits), size)
        covered = set()
        for off, n in got:
            covered.update(range(off // 65536, (off + n - 1) // 65536 + 1))
        assert covered == blocks
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(got))  # coalesced
        if 999 in blocks:
            assert got[-1][0] + got[-1][1] == size
    assert cl.union([b"\x01\x00", b"\x00\x80", b"\x02"], 2) == b"\x03\x80"


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
def test_layer_identity_follows_data_writes_only(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    with vdisk.create_disk(path, format=fmt, subformat="dynamic", size=4 << 20, block_size=1 << 20):
        pass
    first = cl.layer_identity(path)
    assert first.startswith(f"{fmt}:")
    with vdisk.open_disk(path, read_only=True) as d:
        d.read(0, 4096)
    assert cl.layer_identity(path) == first
    with vdisk.open_disk(path) as d:
        d.write(0, b"x" * 512)
    assert cl.layer_identity(path) != first
    assert cl.layer_identity(tmp_path / "missing.vhdx").startswith("unreadable:")
