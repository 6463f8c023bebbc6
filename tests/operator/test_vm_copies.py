"""A VM on two hosts after a failover: listed once, where it runs, and named by its name or id.

After a planned failover with reverse replication and the failback the same way, both hosts
report the VM (the old primary's VM is kept as the replica). An operator who then lists VMs,
protects the VM again or disables and re-protects it must never be stuck on "ambiguous".
"""

from __future__ import annotations

import json

from sitepair.v1 import admin_pb2
from tests.operator.conftest import Run
from tests.protection.conftest import Sites, eventually
from tests.protection.test_failover import protect_running


def vm_rows(cli: Run, *args: str) -> list[list[str]]:
    return [line.split() for line in cli("vms", "list", *args).splitlines()[2:]]


def test_after_failback_the_vm_is_listed_once_and_protect_finds_it(sites: Sites, cli: Run) -> None:
    s = sites
    protect_running(s)
    vm_id = s.protected("web01").vm_id
    for _ in range(2):  # there (site a -> site b) and back, replicating the other way each time
        cli("vms", "failover", "web01", "--type", "planned", "--reverse", "--wait")
    v = s.protected("web01")
    assert (v.primary_server, v.state) == ("hv-a1", "protected")
    replica = v.replica_server
    eventually(
        lambda: _all_vms(s, replica),
        what="the replica host reporting its copy",
    )

    # Listed once, where it runs; the replica host's copy shows when asked for that host.
    rows = vm_rows(cli)
    assert [(r[0], r[1]) for r in rows] == [("web01", "hv-a1")], rows
    assert [(r[0], r[1], r[7]) for r in vm_rows(cli, "--server", replica)] == [
        ("web01", replica, "replica")
    ]
    listed = json.loads(cli("vms", "list", "--json"))
    assert len(listed) == 1 and listed[0]["server_name"] == "hv-a1"

    # By name and by id the VM is found: it is protected already, and the error says so.
    for ref in ("web01", vm_id):
        err = cli("protect", ref, status=1)
        assert "already protected" in err and "several hosts" not in err, err

    # Disabled, keeping the replica: both copies are plain VMs; protect still picks the one
    # that ran, and --server picks explicitly.
    cli("vms", "disable", "web01", "--keep-replica", "--wait")
    err = cli("protect", "web01", "--server", replica, status=1)
    assert "cloud cloud-b is not the primary cloud" in err, err  # the replica host's copy
    out = cli("protect", "web01", "--wait")
    assert "succeeded" in out, out
    v = s.protected("web01")
    assert (v.primary_server, v.state) == ("hv-a1", "protected")
    assert [(r[0], r[1]) for r in vm_rows(cli)] == [("web01", "hv-a1")]


def _all_vms(s: Sites, server: str) -> list[admin_pb2.VmInfo]:
    resp = s.admin.call(s.admin.stub.ListVms, admin_pb2.ListVmsRequest(server=server))
    return list(resp.vms)
