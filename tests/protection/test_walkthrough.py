"""The Azure Site Recovery VMM-to-VMM walkthrough, from registration to Protected."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from sitepair import vdisk
from sitepair.errors import AlreadyExists, FailedPrecondition
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has

MiB = 1 << 20


def setup_pair(s: Sites, *, points: int = 0, app_hours: int = 0) -> None:
    a = s.admin
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
    for host, cloud in (
        ("hv-a1", "cloud-a"),
        ("hv-a2", "cloud-a"),
        ("hv-b1", "cloud-b"),
        ("hv-b2", "cloud-b"),
    ):
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud=cloud, server=host))
    policy = admin_pb2.Policy(
        copy_frequency_seconds=300,
        recovery_points=points,
        app_consistent_hours=app_hours,
        compression=True,
        authentication="certificate",
    )
    s.job(
        a.call(
            a.stub.PairClouds,
            admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
        )
    )
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))


def make_vm(
    s: Sites, host: str, name: str, *, size: int = 24 * MiB, seed: int = 1
) -> dict[str, bytearray]:
    h = s.hosts[host]
    backend = h.backend
    (h.home / "gold" / "vms").mkdir(exist_ok=True)
    backend.create_vm(
        name,
        disks=[("os", "vhdx", size), ("data", "vhd", size // 2)],
        cpu=2,
        memory_mb=1024,
        nics=[("nic0", "corp-a")],
    )
    models = {"os": bytearray(size), "data": bytearray(size // 2)}
    rng = random.Random(seed)
    with backend.open_writer(name) as w:
        for _ in range(30):
            disk = rng.choice(["os", "data"])
            n = rng.choice([4096, 65536, 300_000])
            off = rng.randrange(0, len(models[disk]) - n)
            data = rng.randbytes(n)
            w.write(disk, off, data)
            models[disk][off : off + n] = data
        w.flush()
    return models


def replica_content(s: Sites, vm: str, disk: str) -> bytes:
    v = s.protected(vm)
    host = next(h for h in s.hosts.values() if h.name == v.replica_server)
    import json

    state = json.loads(
        (
            Path(v.replica_folder or host.home / "replicas" / v.relationship_id) / "state.json"
        ).read_text()
    )
    chain = state["disks"][disk]["chain"][-1]
    root = (
        Path(v.replica_folder) if v.replica_folder else host.home / "replicas" / v.relationship_id
    )
    with vdisk.open_disk(root / chain, read_only=True) as d:
        return d.read(0, d.virtual_size)


def test_walkthrough_to_protected_with_byte_exact_replica(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    clouds = {
        c.name: c
        for c in s.admin.call(s.admin.stub.ListClouds, admin_pb2.ListCloudsRequest()).clouds
    }
    assert clouds["cloud-a"].role == "primary" and clouds["cloud-b"].paired_with == "cloud-a"
    maps = {
        m.source: m
        for m in s.admin.call(
            s.admin.stub.ListMappings, admin_pb2.ListMappingsRequest(kind="network")
        ).mappings
    }
    assert list(maps["corp-a"].source_clouds) == ["cloud-a"] and list(
        maps["corp-a"].target_clouds
    ) == ["cloud-b"]

    models = make_vm(s, "hv-a1", "web01")
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM in inventory")
    job = s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01"))
    done = s.job(job)
    assert [st.name for st in done.steps] == [
        "Prerequisites check for enabling protection",
        "Choose the replica host",
        "Create the replica VM",
        "Enable replication on the primary host",
        "Initial replication",
        "Finalize protection",
    ]
    v = s.protected("web01")
    assert v.state == "protected"
    assert v.replica_server in ("hv-b1", "hv-b2")
    # Storage mapping gold -> gold: the replica lives in the replica host's gold folder.
    replica_host = s.hosts[v.replica_server]
    assert v.replica_folder.startswith(str(replica_host.home / "gold"))
    for disk, model in models.items():
        assert replica_content(s, "web01", disk) == bytes(model)
    # Also through qemu-img, against the primary's cut content written as raw.
    if shutil.which("qemu-img"):
        raw = replica_host.home / "expected.raw"
        raw.write_bytes(bytes(models["os"]))
        import json

        state = json.loads((Path(v.replica_folder) / "state.json").read_text())
        top = Path(v.replica_folder) / state["disks"]["os"]["chain"][-1]
        subprocess.run(
            ["qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(top), str(raw)],
            check=True,
            capture_output=True,
        )

    # Status reports reach the broker: cycles, sequence, health.
    v = eventually(
        lambda: (p := s.protected("web01")).primary_status.cycles_succeeded >= 1 and p,
        what="status",
    )
    assert v.replica_status.committed_sequence >= 1  # type: ignore[union-attr]
    eventually(lambda: s.protected("web01").health == "normal", what="normal health")

    # A new cycle on demand carries only the new writes, and the replica follows.
    backend = s.hosts["hv-a1"].backend
    with backend.open_writer("web01") as w:
        w.write("os", 5 * MiB, b"\x42" * 100_000)
        w.flush()
    models["os"][5 * MiB : 5 * MiB + 100_000] = b"\x42" * 100_000
    s.job(
        s.admin.call(
            s.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="web01", action="cycle"),
        )
    )
    assert replica_content(s, "web01", "os") == bytes(models["os"])

    # Verify: digests agree.
    verify = s.job(
        s.admin.call(
            s.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="web01", action="verify"),
        )
    )
    assert '"mismatched_bytes": 0' in verify.result_json

    # Protecting again is refused clearly.
    with pytest.raises(AlreadyExists, match="already protected"):
        s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01"))


def test_second_pairing_refused_and_policy_rules(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    s.admin.call(
        s.admin.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-c", site="site-b")
    )
    with pytest.raises(AlreadyExists, match="one pair at most"):
        s.admin.call(
            s.admin.stub.PairClouds,
            admin_pb2.PairCloudsRequest(
                primary="cloud-a", recovery="cloud-c", policy=admin_pb2.Policy()
            ),
        )
    with pytest.raises(AlreadyExists, match="remove the pairing first"):
        s.admin.call(
            s.admin.stub.PairClouds,
            admin_pb2.PairCloudsRequest(
                primary="cloud-c", recovery="cloud-b", policy=admin_pb2.Policy()
            ),
        )
    from sitepair.errors import InvalidArgument

    bad = admin_pb2.Policy(copy_frequency_seconds=60)
    with pytest.raises(InvalidArgument, match="30 s, 5 min or 15 min"):
        s.admin.call(
            s.admin.stub.SetPairPolicy, admin_pb2.PairCloudsRequest(primary="cloud-a", policy=bad)
        )
    bad = admin_pb2.Policy(recovery_points=2, app_consistent_hours=4)
    with pytest.raises(InvalidArgument, match="needs more than 4 recovery points"):
        s.admin.call(
            s.admin.stub.SetPairPolicy, admin_pb2.PairCloudsRequest(primary="cloud-a", policy=bad)
        )
    bad = admin_pb2.Policy(initial_method="offline")
    with pytest.raises(InvalidArgument, match="export path"):
        s.admin.call(
            s.admin.stub.SetPairPolicy, admin_pb2.PairCloudsRequest(primary="cloud-a", policy=bad)
        )
    with pytest.raises(FailedPrecondition, match="is paired"):
        s.admin.call(s.admin.stub.DeleteCloud, admin_pb2.CloudRef(name="cloud-b"))


def test_unmapped_network_refused_unless_accepted(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    s.admin.call(s.admin.stub.Unmap, admin_pb2.MapRequest(kind="network", source="corp-a"))
    make_vm(s, "hv-a2", "db01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "db01"), what="VM in inventory")
    with pytest.raises(FailedPrecondition, match="no mapping"):
        s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="db01"))
    s.job(
        s.admin.call(
            s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="db01", accept_no_network=True)
        )
    )


def test_placement_honours_storage_mapping_and_capacity(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    # Only hv-b2 offers the mapped target class "silver".
    s.admin.call(
        s.admin.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="silver")
    )
    silver = s.hosts["hv-b2"].home / "silver"
    silver.mkdir()
    text = (
        (s.hosts["hv-b2"].home / "agent.toml")
        .read_text()
        .replace("[storage]", f'[storage]\nsilver = "{silver}"', 1)
    )
    (s.hosts["hv-b2"].home / "agent.toml").write_text(text)
    s.hosts["hv-b2"].stop()
    s.hosts["hv-b2"].start()

    def b2_has_silver() -> bool:
        srv = s.admin.call(s.admin.stub.GetServer, admin_pb2.GetServerRequest(server="hv-b2"))
        return any(st.name == "silver" for st in srv.inventory.storage)

    eventually(b2_has_silver, what="silver storage reported")
    make_vm(s, "hv-a1", "app01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "app01"), what="VM in inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="app01")))
    v = s.protected("app01")
    assert v.replica_server == "hv-b2"
    assert v.replica_folder.startswith(str(silver))


def test_disable_with_and_without_delete_replica(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "vm1", size=8 * MiB)
    make_vm(s, "hv-a2", "vm2", size=8 * MiB, seed=2)
    eventually(lambda: inventory_has(s.admin, "vm1") and inventory_has(s.admin, "vm2"), what="VMs")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="vm1")))
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="vm2")))
    kept = s.protected("vm1").replica_folder
    deleted = s.protected("vm2").replica_folder
    s.job(
        s.admin.call(
            s.admin.stub.DisableProtection,
            admin_pb2.DisableProtectionRequest(
                vm="vm1", replica=admin_pb2.DisableProtectionRequest.KEEP
            ),
        )
    )
    s.job(
        s.admin.call(
            s.admin.stub.DisableProtection,
            admin_pb2.DisableProtectionRequest(
                vm="vm2", replica=admin_pb2.DisableProtectionRequest.DELETE
            ),
        )
    )
    assert (Path(kept) / "state.json").exists()
    assert not Path(deleted).exists()
    listed = s.admin.call(s.admin.stub.ListProtected, admin_pb2.ListProtectedRequest()).vms
    assert list(listed) == []
    # The primary no longer replicates either VM.
    for host in ("hv-a1", "hv-a2"):
        agent = s.hosts[host].agent
        assert agent is not None and agent.daemon.replication.sources == {}


def test_ticket_authentication_through_the_broker(sites: Sites) -> None:
    """Policy with ticket authentication: the primary asks the broker for a ticket per call
    (over one kept broker channel) and replicates over the replica's 8083-mode port."""
    s = sites
    a = s.admin
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
    policy = admin_pb2.Policy(copy_frequency_seconds=300, compression=True, authentication="ticket")
    s.job(
        a.call(
            a.stub.PairClouds,
            admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
        )
    )
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
    models = make_vm(s, "hv-a1", "web01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM in inventory")
    s.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    v = s.protected("web01")
    assert v.policy.authentication == "ticket" and v.policy.port == 8083
    for disk, model in models.items():
        assert replica_content(s, "web01", disk) == bytes(model)
    replica_agent = s.hosts["hv-b1"].agent
    assert replica_agent is not None
    ticket_servicer = replica_agent.daemon.replication.receiver.servicers["ticket"]
    assert ticket_servicer.cycles_committed >= 1
    assert replica_agent.daemon.replication.receiver.servicers["certificate"].cycles_committed == 0


def test_offline_initial_replication_export_and_import(sites: Sites, tmp_path: Path) -> None:
    """Offline initial replication: the primary exports its first cut to a folder, the folder
    travels, the replica imports it, and delta cycles continue over the network."""
    s = sites
    a = s.admin
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
    a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
    carried = tmp_path / "usb-drive"
    policy = admin_pb2.Policy(
        copy_frequency_seconds=300,
        compression=True,
        initial_method="offline",
        export_path=str(carried),
        import_path=str(carried),  # the same folder stands for the carried drive
    )
    s.job(
        a.call(
            a.stub.PairClouds,
            admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
        )
    )
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
    models = make_vm(s, "hv-a1", "big01", size=16 * MiB)
    eventually(lambda: inventory_has(s.admin, "big01"), what="VM in inventory")
    done = s.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="big01")))
    assert (carried / "sitepair-export.json").exists()
    assert sorted(p.name for p in carried.iterdir()) == [
        "data.vhd",
        "os.vhdx",
        "sitepair-export.json",
    ]
    assert "replica at sequence" in done.steps[4].message
    agent = s.hosts["hv-a1"].agent
    assert agent is not None
    rel_id = s.protected("big01").relationship_id
    # Nothing of the initial copy crossed the network: only the delta after the import.
    with s.hosts["hv-a1"].backend.open_writer("big01") as w:
        w.write("os", 0, b"\x11" * 65536)
        w.flush()
    models["os"][0:65536] = b"\x11" * 65536
    s.job(
        a.call(
            a.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="big01", action="cycle")
        )
    )
    stats = agent.daemon.replication.sources[rel_id].stats
    assert stats.total_cycle_bytes <= 2 * 65536, stats
    for disk, model in models.items():
        assert replica_content(s, "big01", disk) == bytes(model)


def test_a_guest_that_cannot_quiesce_is_still_replicated(sites: Sites) -> None:
    """Application-consistent points every hour, and the VM's pre-checkpoint hook fails: the
    initial copy and the cycles after it go on crash-consistent instead of retrying the failing
    application-consistent cut for ever."""
    s = sites
    setup_pair(s, points=2, app_hours=1)
    models = make_vm(s, "hv-a1", "db01")
    hooks = s.hosts["hv-a1"].backend.vm_root / "db01" / "hooks"
    hooks.mkdir()
    (hooks / "pre-checkpoint.py").write_text(
        "import sys\nprint('database refused to freeze')\nsys.exit(4)\n"
    )
    eventually(lambda: inventory_has(s.admin, "db01"), what="VM in inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="db01")))
    v = s.protected("db01")
    assert v.state == "protected"
    for disk, model in models.items():
        assert replica_content(s, "db01", disk) == bytes(model)
    points = eventually(lambda: list(s.protected("db01").replica_status.points), what="points")
    assert not any(p.app_consistent for p in points)  # type: ignore[union-attr]
    # Health says so, with the hook's own words.
    v = eventually(
        lambda: (p := s.protected("db01")).health == "warning" and p, what="warning health"
    )
    reasons = [r for r in v.reasons if r.code == "app-consistent-failing"]  # type: ignore[union-attr]
    assert reasons and "database refused to freeze" in reasons[0].message
