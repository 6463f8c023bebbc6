"""Health as hosts come and go; onboarding a replica that already exists."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sitepair import vdisk
from sitepair.errors import FailedPrecondition, NotFound
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has
from tests.protection.test_walkthrough import MiB, make_vm, replica_content, setup_pair


def reasons(s: Sites, vm: str) -> dict[str, str]:
    return {r.code: r.level for r in s.protected(vm).reasons}


def test_replica_host_offline_turns_warning_then_critical(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    eventually(lambda: s.protected("web01").health == "normal", what="normal")
    replica = s.protected("web01").replica_server
    s.hosts[replica].stop()
    eventually(lambda: reasons(s, "web01").get("replica-host-offline") == "warning", what="warning")
    assert s.protected("web01").health == "warning"
    eventually(
        lambda: reasons(s, "web01").get("replica-host-offline") == "critical",
        timeout=20,
        what="critical",
    )
    v = s.protected("web01")
    assert v.health == "critical"
    assert any(replica in r.message and "offline" in r.message for r in v.reasons)
    s.hosts[replica].start()
    eventually(lambda: s.protected("web01").health == "normal", what="normal again")


def test_paused_replication_is_a_warning_and_resumes(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    s.job(
        s.admin.call(
            s.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="web01", action="pause"),
        )
    )
    assert s.protected("web01").paused
    eventually(lambda: reasons(s, "web01").get("paused") == "warning", what="paused warning")
    s.job(
        s.admin.call(
            s.admin.stub.ReplicationAction,
            admin_pb2.ReplicationActionRequest(vm="web01", action="resume"),
        )
    )
    eventually(lambda: "paused" not in reasons(s, "web01"), what="resumed")


def test_onboarding_an_existing_replica_moves_far_fewer_bytes(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    models = make_vm(s, "hv-a1", "big01", size=32 * MiB)
    host = s.hosts["hv-a1"]
    with host.backend.open_writer("big01") as w:  # fill most of the disk
        import os

        data = os.urandom(24 * MiB)
        w.write("os", 0, data)
        w.flush()
    models["os"][0 : 24 * MiB] = data
    eventually(lambda: inventory_has(s.admin, "big01"), what="VM")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="big01")))
    first = s.protected("big01")
    agent = host.agent
    assert agent is not None
    full_bytes = agent.daemon.replication.sources[first.relationship_id].stats.wire_bytes
    assert full_bytes > 20 * MiB
    s.job(
        s.admin.call(
            s.admin.stub.DisableProtection,
            admin_pb2.DisableProtectionRequest(
                vm="big01", replica=admin_pb2.DisableProtectionRequest.KEEP
            ),
        )
    )
    # The VM keeps changing a little while unprotected.
    with host.backend.open_writer("big01") as w:
        w.write("os", 3 * MiB, b"\x77" * 70_000)
        w.flush()
    models["os"][3 * MiB : 3 * MiB + 70_000] = b"\x77" * 70_000
    done = s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="big01")))
    assert "adopted" in done.steps[2].message
    second = s.protected("big01")
    assert second.relationship_id != first.relationship_id
    assert (
        second.replica_server == first.replica_server
        and second.replica_folder == first.replica_folder
    )
    resync_bytes = agent.daemon.replication.sources[second.relationship_id].stats.wire_bytes
    assert resync_bytes < full_bytes / 20, (resync_bytes, full_bytes)
    for disk, model in models.items():
        assert replica_content(s, "big01", disk) == bytes(model)


def test_cloud_refresh_asks_every_host_and_waits_for_offline_ones(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=4 * MiB)
    make_vm(s, "hv-a2", "db01", size=4 * MiB)
    done = s.job(s.admin.call(s.admin.stub.RefreshCloud, admin_pb2.CloudRef(name="cloud-a")))
    assert [st.name for st in done.steps] == [
        "refresh inventory on hv-a1",
        "refresh inventory on hv-a2",
    ]
    assert json.loads(done.result_json) == {"servers": {"hv-a1": {"vms": 1}, "hv-a2": {"vms": 1}}}
    assert inventory_has(s.admin, "web01") and inventory_has(s.admin, "db01")

    # A host that is down gets the command when it comes back; the job waits for it.
    s.hosts["hv-a2"].stop()
    eventually(lambda: not server_connected(s, "hv-a2"), what="hv-a2 seen offline")
    job = s.admin.call(s.admin.stub.RefreshCloud, admin_pb2.CloudRef(name="cloud-a"))
    eventually(lambda: job_state(s, job.id) == "waiting", what="job waiting for hv-a2")
    s.hosts["hv-a2"].start()
    s.job(job)

    with pytest.raises(NotFound, match="no cloud named"):
        s.admin.call(s.admin.stub.RefreshCloud, admin_pb2.CloudRef(name="nope"))
    s.admin.call(
        s.admin.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="empty", site="site-a")
    )
    with pytest.raises(FailedPrecondition, match="no hosts"):
        s.admin.call(s.admin.stub.RefreshCloud, admin_pb2.CloudRef(name="empty"))


def server_connected(s: Sites, name: str) -> bool:
    servers = s.admin.call(s.admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
    return any(v.name == name and v.state == "connected" for v in servers)


def job_state(s: Sites, job_id: str) -> str:
    job: admin_pb2.Job = s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job_id))
    return job.state


def test_a_refresh_completes_only_once_the_broker_holds_what_it_reports(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's result and the broker's inventory agree when the job ends, even when listing
    the host's VMs is slow (a Hyper-V host with many VMs): the agent sends the inventory ahead
    of the command's acknowledgement, on the same stream the broker reads in order."""
    s = sites
    setup_pair(s)
    agent = s.hosts["hv-a1"].agent
    assert agent is not None
    backend = agent.daemon.backend
    listing = backend.inventory

    def slow_listing() -> object:
        time.sleep(0.5)
        return listing()

    monkeypatch.setattr(backend, "inventory", slow_listing)
    for name in ("late01", "late02", "late03"):
        make_vm(s, "hv-a1", name, size=4 * MiB)
        done = s.job(s.admin.call(s.admin.stub.RefreshCloud, admin_pb2.CloudRef(name="cloud-a")))
        assert json.loads(done.result_json)["servers"]["hv-a1"]["vms"] >= 1
        assert inventory_has(s.admin, name), f"the job ended before the broker listed {name}"


def test_lost_change_tracking_shows_resync_required_until_a_resync_lands(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary's change tracking is lost and its resync fails (the replica's disk is full):
    the primary reports it, and the broker shows "resync-required" until a resync commits."""
    from agent.replication import replica as replica_mod

    s = sites
    setup_pair(s)
    models = make_vm(s, "hv-a1", "web01", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    eventually(lambda: s.protected("web01").health == "normal", what="normal")
    assert "resync-required" not in reasons(s, "web01")
    # Written behind the backend's back (the VM's disk edited offline): tracking is lost.
    backend = s.hosts["hv-a1"].backend
    folder, spec = backend.find_vm("web01")
    disk = next(d for d in spec.disks if d.id == "os")
    top = Path(disk.chain[-1])
    with vdisk.open_disk(top if top.is_absolute() else folder / top) as d:
        d.write(MiB, b"\x5a" * 4096)
    models["os"][MiB : MiB + 4096] = b"\x5a" * 4096
    monkeypatch.setattr(replica_mod.ReplicaStore, "free_space", lambda self: 0)
    cycle = admin_pb2.ReplicationActionRequest(vm="web01", action="cycle")
    s.job(s.admin.call(s.admin.stub.ReplicationAction, cycle), expect="failed")
    eventually(
        lambda: reasons(s, "web01").get("resync-required") == "critical", what="resync-required"
    )
    assert s.protected("web01").health == "critical"
    monkeypatch.undo()
    s.job(s.admin.call(s.admin.stub.ReplicationAction, cycle))
    eventually(lambda: "resync-required" not in reasons(s, "web01"), what="resynchronized")
    eventually(lambda: s.protected("web01").health == "normal", what="normal again")
    for name, model in models.items():
        assert replica_content(s, "web01", name) == bytes(model)
