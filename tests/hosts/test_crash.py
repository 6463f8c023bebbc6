"""A process killed (SIGKILL) in the middle of release_cut or take_cut: the next operation
finishes or undoes the job, the guest bytes never change, and the tracking stays trusted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent.hosts.directory import DirectoryBackend
from tests.hosts.helpers import BLOCK, SIZES, qemu_compare, read_cut, read_image, spawn


def guest(backend: DirectoryBackend, vm: str) -> dict[str, bytes]:
    folder = backend.vm_root / vm
    return {d.id: read_image(folder / d.active) for d in backend.read_vm(folder).disks}


def write_round(backend: DirectoryBackend, vm: str, tag: int) -> None:
    with backend.open_writer(vm) as w:
        for i in range(4):
            w.write("os", (tag * 7 + i * 5) % 120 * BLOCK, bytes([tag]) * (BLOCK + 512 * i))
            w.write("data", (tag * 3 + i * 11) % 60 * BLOCK + 100, bytes([tag + 100]) * 3000)


def run(*args: str | Path) -> int:
    proc = spawn(*args)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return proc.returncode


RELEASE_CRASHES = [
    "release:journal",
    "release:merge-started",
    "merge-write:vhdx",
    "relink-before",
    "relink-after",
    "release:merged@2",
    "release:chain-updated@2",
    "merge-write:vhd@2",
    "relink-after@4",
    "release:recorded",
]


@pytest.mark.parametrize("crash", RELEASE_CRASHES)
def test_release_survives_a_kill_anywhere(
    backend: DirectoryBackend, vm: str, tmp_path: Path, crash: str
) -> None:
    folder = backend.vm_root / vm
    # Three cuts froze the base, L1 and L2; L3 is active. Releasing the third cut merges L1,
    # then L2, into the base of each disk, relinking L2 and then the active L3.
    write_round(backend, vm, 1)
    backend.take_cut(vm)
    write_round(backend, vm, 2)
    backend.take_cut(vm)
    write_round(backend, vm, 3)
    c3 = backend.take_cut(vm)
    expected_cut = read_cut(c3)
    write_round(backend, vm, 4)
    expected_now = guest(backend, vm)
    assert [len(d.chain) for d in backend.read_vm(folder).disks] == [4, 4]

    assert run("release", backend.vm_root, vm, c3.cut_id, "--crash", crash) == -signal.SIGKILL

    again = DirectoryBackend(backend.vm_root)
    again.release_cut(vm, c3.cut_id)  # finishes the job
    spec = again.read_vm(folder)
    assert [len(d.chain) for d in spec.disks] == [2, 2]
    assert again.outstanding_cut(vm) is None
    assert guest(again, vm) == expected_now
    for d in spec.disks:
        base = folder / d.chain[0]
        assert read_image(base) == expected_cut[d.id]
        qemu_compare(base, expected_cut[d.id], tmp_path)
    leftovers = sorted(p.name for p in (folder / "disks").iterdir())
    assert leftovers == sorted(Path(e).name for d in spec.disks for e in d.chain)

    # The crash left nothing that looks like an outside change: tracking stays trusted.
    with again.open_writer(vm) as w:
        w.write("os", 3 * BLOCK, b"after" * 10)
    c4 = again.take_cut(vm)
    assert c4.trusted, c4.untrusted_reason
    assert c4.disks[0].changed is not None
    assert (3 * BLOCK, BLOCK) in c4.disks[0].changed


CUT_CRASHES = [
    ("take_cut:intent", False),
    ("take_cut:child", False),
    ("take_cut:child@2", False),
    ("take_cut:commit", True),
    ("take_cut:frozen", True),
]


@pytest.mark.parametrize(("crash", "committed"), CUT_CRASHES)
def test_take_cut_survives_a_kill_anywhere(
    backend: DirectoryBackend, vm: str, crash: str, committed: bool
) -> None:
    folder = backend.vm_root / vm
    with backend.open_writer(vm) as w:
        w.write("os", 2 * BLOCK, b"a" * BLOCK)
        w.write("data", 0, b"b" * 100)
    before = guest(backend, vm)
    chains = [d.chain for d in backend.read_vm(folder).disks]

    assert run("cut", backend.vm_root, vm, "--crash", crash) == -signal.SIGKILL

    again = DirectoryBackend(backend.vm_root)
    cut = again.outstanding_cut(vm)  # recovers
    spec = again.read_vm(folder)
    if committed:
        assert cut is not None and cut.trusted, cut
        assert [d.changed for d in cut.disks] == [((2 * BLOCK, BLOCK),), ((0, BLOCK),)]
        assert read_cut(cut) == before
        assert [len(d.chain) for d in spec.disks] == [2, 2]
    else:
        assert cut is None
        assert [d.chain for d in spec.disks] == chains
        assert sorted(p.name for p in (folder / "disks").iterdir()) == ["data.vhd", "os.vhdx"]
        assert sorted(p.name for p in (folder / "changes").rglob("*.cbt")) == [
            "data.vhd.cbt",
            "os.vhdx.cbt",
        ]
    assert guest(again, vm) == before
    # Either way the next cut covers the writes, trusted, and releases cleanly.
    nxt = again.take_cut(vm)
    assert nxt.trusted, nxt.untrusted_reason
    assert [d.changed for d in nxt.disks] == [((2 * BLOCK, BLOCK),), ((0, BLOCK),)]
    again.release_cut(vm, nxt.cut_id)
    assert read_image(folder / again.read_vm(folder).disk("os").chain[0]) == before["os"]
    assert len(before["data"]) == SIZES["data"]


@pytest.mark.parametrize("crash", ["merge-write:vhdx", "relink-after@2"])
def test_a_writer_finishes_what_a_dead_backend_left(
    backend: DirectoryBackend, vm: str, crash: str
) -> None:
    """After a kill in the middle of a merge the chain does not open (the base's VHDX
    DataWriteGuid moved); the next writer finishes the release before it opens a disk."""
    folder = backend.vm_root / vm
    write_round(backend, vm, 1)
    backend.take_cut(vm)
    write_round(backend, vm, 2)
    c2 = backend.take_cut(vm)
    expected = guest(backend, vm)
    assert run("release", backend.vm_root, vm, c2.cut_id, "--crash", crash) == -signal.SIGKILL
    with backend.open_writer(vm) as w:
        assert w.read("os", 0, SIZES["os"]) == expected["os"]
        w.write("data", 0, b"later")
    assert [len(d.chain) for d in backend.read_vm(folder).disks] == [2, 2]
    assert backend.outstanding_cut(vm) is None
    c3 = backend.take_cut(vm)
    assert c3.trusted and [d.changed for d in c3.disks] == [(), ((0, BLOCK),)]
