"""VM power state and NIC connections as vm.json changes; vm.json validation; inventory and
writer errors that name the VM, the disk and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import NetworkConfig
from agent.hosts.directory import DirectoryBackend, VmSpec
from sitepair.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from tests.hosts.helpers import SIZES


def test_power_state_changes(backend: DirectoryBackend, vm: str) -> None:
    assert backend.set_vm_state(vm, "running").state == "running"
    assert backend.set_vm_state(vm, "paused").state == "paused"
    assert backend.set_vm_state(vm, "paused").state == "paused"  # no change, no error
    assert backend.set_vm_state(vm, "running").state == "running"
    record = backend.set_vm_state(vm, "off")
    assert record.state == "off" and record.name == "web01"
    assert [d.virtual_size for d in record.disks] == [SIZES["os"], SIZES["data"]]
    assert backend.read_vm(backend.vm_root / vm).state == "off"
    with pytest.raises(
        FailedPrecondition, match=r"VM web01 is off; it cannot become paused .*vm\.json"
    ):
        backend.set_vm_state(vm, "paused")
    with pytest.raises(InvalidArgument, match="unknown VM state 'suspended'"):
        backend.set_vm_state(vm, "suspended")
    with pytest.raises(NotFound, match="no VM 'nope'"):
        backend.set_vm_state("nope", "running")


def test_connect_nic(backend: DirectoryBackend, vm: str, vm_root: Path) -> None:
    record = backend.connect_nic(vm, "eth0", "dmz")
    assert [(n.name, n.network) for n in record.nics] == [("eth0", "dmz")]
    mac = record.nics[0].mac
    record = backend.connect_nic(vm, "eth0", "")
    assert [(n.name, n.network, n.mac) for n in record.nics] == [("eth0", "", mac)]
    with pytest.raises(NotFound, match=r"VM web01 has no NIC 'eth9' \(NICs: eth0"):
        backend.connect_nic(vm, "eth9", "dmz")
    strict = DirectoryBackend(vm_root, networks=(NetworkConfig("prod"), NetworkConfig("test")))
    assert strict.connect_nic(vm, "eth0", "test").nics[0].network == "test"
    with pytest.raises(InvalidArgument, match=r"no VM network 'dmz' .*offers: prod, test"):
        strict.connect_nic(vm, "eth0", "dmz")


def test_vm_json_paths(tmp_path: Path) -> None:
    where = tmp_path / "vm.json"

    def spec(chain: list[str]) -> VmSpec:
        doc = json.dumps({"id": "a", "name": "a", "disks": [{"id": "d", "chain": chain}]})
        return VmSpec.from_json(doc.encode(), where)

    assert (
        spec(["/srv/gold/a.vhdx", "disks/a_000001.avhdx"]).disks[0].active == "disks/a_000001.avhdx"
    )
    with pytest.raises(ConfigError, match="must stay inside the VM folder"):
        spec(["../other/a.vhdx"])
    with pytest.raises(ConfigError, match="names a layer twice"):
        spec(["disks/a.vhdx", "disks/a.vhdx"])


def test_inventory_while_a_writer_holds_the_disks(backend: DirectoryBackend, vm: str) -> None:
    with backend.open_writer(vm) as w:
        w.write("os", 0, b"x")
        w.write("data", 0, b"x")
        vms = backend.inventory().vms
    assert [(d.id, d.format, d.virtual_size) for d in vms[0].disks] == [
        ("os", "vhdx", SIZES["os"]),
        ("data", "vhd", SIZES["data"]),
    ]


def test_writer_errors_name_vm_disk_and_file(backend: DirectoryBackend, vm: str) -> None:
    folder = backend.vm_root / vm
    with backend.open_writer(vm) as w:
        with pytest.raises(NotFound, match=r"VM web01 has no disk 'swap' \(disks: os, data\)"):
            w.write("swap", 0, b"x")
        with pytest.raises(InvalidArgument) as err:
            w.write("data", SIZES["data"] - 1, b"xy")
        assert f"VM web01 disk data: range [{SIZES['data'] - 1}, {SIZES['data'] + 1})" in str(
            err.value
        )
        assert str(folder / "disks" / "data.vhd") in str(err.value)
    with pytest.raises(FailedPrecondition, match="the writer is closed"):
        w.write("os", 0, b"x")
    w.close()  # idempotent
    # A second process (here: a second writer) cannot write a disk that is being written.
    with backend.open_writer(vm) as a, backend.open_writer(vm) as b:
        a.write("os", 0, b"a")
        b.write("data", 0, b"b")  # another disk is fine
        with pytest.raises(Exception, match=r"VM web01 disk os: .*os\.vhdx.*another process"):
            b.write("os", 0, b"b")
