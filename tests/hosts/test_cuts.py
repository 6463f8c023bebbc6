"""Cuts taken while another process writes: each cut holds exactly a prefix of the writes,
``changed`` covers exactly what changed since the last released cut, release folds the chain
back without changing a byte."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.hosts.base import Cut
from agent.hosts.directory import DirectoryBackend
from tests.hosts.helpers import (
    BLOCK,
    DISKS,
    SIZES,
    Model,
    WriterLog,
    blocks_of_ranges,
    blocks_of_writes,
    differing_blocks,
    libvhdi_sha256,
    qemu_compare,
    read_cut,
    read_image,
    start_writer,
    wait_for,
)


def prefix_of(
    cut: Cut, seed: int, lo: int, hi: int, *, aligned: bool
) -> tuple[list[int], dict[str, bytes]]:
    """Every k in [lo, hi] such that the cut equals the first k writes of the plan."""
    content = read_cut(cut)
    model = Model(seed, aligned=aligned)
    model.advance(lo)
    matches = []
    for k in range(lo, hi + 1):
        model.advance(k)
        if all(model.disks[d] == content[d] for d in SIZES):
            matches.append(k)
    return matches, content


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_cuts_while_another_process_writes(
    backend: DirectoryBackend, vm: str, vm_root: Path, tmp_path: Path, aligned: bool
) -> None:
    seed = 11 if aligned else 12
    log, stop = tmp_path / "writer.log", tmp_path / "stop"
    writer = start_writer(vm_root, vm, seed, log, stop, *(["--aligned"] if aligned else []))
    wl = WriterLog(log)
    base_k = (0, 0)  # the prefix window of the last released cut (0 = the empty disks)
    base_content = {d: bytes(s) for d, s in SIZES.items()}
    try:
        cuts: list[tuple[Cut, int, int]] = []
        # c1 stays outstanding; c2 covers c1 too and is released; c3 and c4 are released.
        for i in range(4):
            start = wl.marks()[1]
            wait_for(lambda s=start: wl.marks()[1] >= s + 150, "the writer to make progress")
            done_before = wl.marks()[1]
            cut = backend.take_cut(vm)
            started_after = wl.marks()[0]
            assert cut.trusted, cut.untrusted_reason
            assert [len(d.chain) for d in cut.disks] == [i + 1 if i < 2 else 2] * 2
            matches, content = prefix_of(cut, seed, done_before, started_after, aligned=aligned)
            assert matches, f"cut {i + 1} is no prefix of writes {done_before}..{started_after}"
            assert backend.outstanding_cut(vm) == cut
            for fd in cut.disks:
                changed = fd.changed
                assert changed is not None
                assert all(off % BLOCK == 0 for off, _n in changed)
                got = blocks_of_ranges(changed)
                # Whatever differs from the last released cut is inside `changed` ...
                assert differing_blocks(base_content[fd.disk_id], content[fd.disk_id]) <= got
                # ... and `changed` is no more than the blocks the writes in between touched
                # (exactly those, for 64 KiB-aligned writes).
                must = blocks_of_writes(seed, base_k[1] + 1, matches[0], aligned=aligned)
                may = blocks_of_writes(seed, base_k[0] + 1, matches[-1], aligned=aligned)
                assert must[fd.disk_id] <= got
                if aligned:
                    assert got <= may[fd.disk_id]
            cuts.append((cut, matches[0], matches[-1]))
            if i == 1:
                # libvhdi reads the three-layer chains of the cut like we do.
                for fd in cut.disks:
                    import hashlib

                    assert (
                        libvhdi_sha256(fd.chain) == hashlib.sha256(content[fd.disk_id]).hexdigest()
                    )
            if i >= 1:
                backend.release_cut(vm, cut.cut_id)
                assert backend.outstanding_cut(vm) is None
                spec = backend.read_vm(vm_root / vm)
                assert [len(d.chain) for d in spec.disks] == [2, 2]
                # The base alone now holds the cut, byte for byte (our reader and qemu-img).
                for d in spec.disks:
                    base = vm_root / vm / d.chain[0]
                    assert read_image(base) == content[d.id]
                    qemu_compare(base, content[d.id], tmp_path)
                base_k = (matches[0], matches[-1])
                base_content = content
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert writer.returncode == 0, writer.stderr.read().decode() if writer.stderr else ""
    # The writer closed cleanly: the active layers hold every write it made.
    final = Model(seed, aligned=aligned)
    final.advance(wl.marks()[1])
    for d in backend.read_vm(vm_root / vm).disks:
        assert read_image(vm_root / vm / d.active) == final.disks[d.id]


def test_changed_is_exact_and_unions_until_released(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"a" * BLOCK)
        w.write("os", 5 * BLOCK + 100, b"b" * 200)  # inside one block
        w.write("os", 9 * BLOCK - 10, b"c" * 20)  # straddles two blocks
        w.write_zeroes("data", 3 * BLOCK, 2 * BLOCK)
        w.write("data", SIZES["data"] - 10, b"z" * 10)  # the last block
        c1 = backend.take_cut(vm)
        assert c1.trusted and not c1.app_consistent
        by_disk = {d.disk_id: d for d in c1.disks}
        assert by_disk["os"].changed == ((0, BLOCK), (5 * BLOCK, BLOCK), (8 * BLOCK, 2 * BLOCK))
        last = SIZES["data"] // BLOCK - 1
        assert by_disk["data"].changed == ((3 * BLOCK, 2 * BLOCK), (last * BLOCK, BLOCK))
        assert [d.format for d in c1.disks] == ["vhdx", "vhd"]
        assert [d.virtual_size for d in c1.disks] == [s for _i, _f, s in DISKS]

        w.write("os", 20 * BLOCK, b"d" * BLOCK)
        c2 = backend.take_cut(vm)  # c1 not released: c2 covers both
        by_disk = {d.disk_id: d for d in c2.disks}
        assert by_disk["os"].changed == (
            (0, BLOCK),
            (5 * BLOCK, BLOCK),
            (8 * BLOCK, 2 * BLOCK),
            (20 * BLOCK, BLOCK),
        )
        assert by_disk["data"].changed == ((3 * BLOCK, 2 * BLOCK), (last * BLOCK, BLOCK))
        assert [len(d.chain) for d in c2.disks] == [2, 2]

        # Releasing the older cut first folds only its layers; c2 stays outstanding, same view.
        backend.release_cut(vm, c1.cut_id)
        again = backend.outstanding_cut(vm)
        assert again is not None and again.cut_id == c2.cut_id
        assert [d.changed for d in again.disks] == [d.changed for d in c2.disks]
        assert [len(d.chain) for d in again.disks] == [2, 2]
        content = read_cut(again)
        assert content["os"][20 * BLOCK : 21 * BLOCK] == b"d" * BLOCK

        backend.release_cut(vm, c2.cut_id)
        backend.release_cut(vm, c2.cut_id)  # idempotent
        backend.release_cut(vm, c1.cut_id)  # an older, released cut: nothing to do
        assert [len(d.chain) for d in backend.read_vm(folder).disks] == [2, 2]

        w.write("data", 7 * BLOCK, b"e" * 10)
        c3 = backend.take_cut(vm)
        assert [d.changed for d in c3.disks] == [(), ((7 * BLOCK, BLOCK),)]
        assert read_cut(c3)["os"] == content["os"]
        backend.release_cut(vm, c3.cut_id)
        # Nothing written: the next cut is a new, empty layer with nothing changed.
        c4 = backend.take_cut(vm)
        assert c4.cut_id != c3.cut_id and [d.changed for d in c4.disks] == [(), ()]
    # Only the files still needed remain.
    changes = sorted(p.relative_to(folder).as_posix() for p in (folder / "changes").rglob("*"))
    spec = backend.read_vm(folder)
    assert {Path(d.active).name for d in spec.disks} == {"os_000004.avhdx", "data_000004.avhd"}
    assert "changes/cuts/000004-os.bits" in changes
    assert not any("000002" in c for c in changes)


def test_outstanding_cut_survives_a_restart(
    backend: DirectoryBackend, vm: str, vm_root: Path
) -> None:
    with backend.open_writer(vm) as w:
        w.write("os", BLOCK, b"x" * 4096)
    cut = backend.take_cut(vm)
    fresh = DirectoryBackend(vm_root)
    assert fresh.outstanding_cut(vm) == cut
    fresh.release_cut(vm, cut.cut_id)
    assert backend.outstanding_cut(vm) is None


def test_writer_keeps_writing_through_cuts_in_the_same_process(
    backend: DirectoryBackend, vm: str
) -> None:
    """An idle writer is asked for its disks too (its watcher closes them); a write that comes
    while a cut holds the VM waits and then lands in the new layer."""
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"1" * 4096)
        time.sleep(0.05)  # idle
        c1 = backend.take_cut(vm)
        w.write("os", 0, b"2" * 4096)
        assert w.read("os", 0, 1) == b"2"
        assert read_cut(c1)["os"][:1] == b"1"
        assert w.virtual_size("data") == SIZES["data"]


def test_a_cut_never_reuses_the_name_of_a_layer_in_the_chain(tmp_path: Path) -> None:
    """A failed-over VM re-registered over chains that still hold ``os_000001.avhdx`` (the
    adopted old VM's own cut layer): its cut numbers start over, and cut 1 must not take (and,
    failing, delete) that file."""
    from sitepair import vdisk

    backend = DirectoryBackend(tmp_path / "vms")
    backend.create_vm("web01", disks=[("os", "vhdx", 8 << 20)])
    folder, spec = backend.find_vm("web01")
    disks = folder / "disks"
    base = disks / "os.vhdx"
    middle = disks / "os_000001.avhdx"  # the name cut 1 of a fresh tracking state would take
    vdisk.create_disk(middle, format="vhdx", subformat="differencing", parent=base).close()
    with vdisk.open_disk(middle) as d:
        d.write(0, b"\x77" * 4096)
    backend.register_vm(
        "web01",
        vm_id=spec.id,
        disks=[("os", [base, middle])],
        cpu=1,
        memory_mb=512,
        replace=True,
    )
    cut = backend.take_cut("web01")
    assert middle.exists()
    [frozen] = cut.disks
    assert [Path(p).resolve() for p in frozen.chain][:2] == [base.resolve(), middle.resolve()]
    _, spec = backend.find_vm("web01")
    assert spec.disks[0].active.endswith("os_000001-2.avhdx")
    with vdisk.open_disk(folder / spec.disks[0].active) as d:
        assert d.read(0, 4096) == b"\x77" * 4096
    backend.release_cut("web01", cut.cut_id)
    _, spec = backend.find_vm("web01")
    with vdisk.open_disk(folder / spec.disks[0].active) as d:
        assert d.read(0, 4096) == b"\x77" * 4096
