"""Every ``sitepair-broker`` admin command, run as an operator would against a real broker with
four agents: what each prints and the exit status it returns."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main as cli_main
from broker.client import AdminClient
from sitepair.errors import SitepairError
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has
from tests.protection.test_walkthrough import make_vm

Run = Callable[..., str]


@pytest.fixture
def cli(sites: Sites, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run one command with ``--home``; check its exit status; return what it printed (its
    standard error when it fails)."""
    home = str(sites.broker.home.root)

    def run(*args: str, status: int = 0) -> str:
        got = cli_main(["--home", home, *args])
        out, err = capsys.readouterr()
        assert got == status, (args, out, err)
        return out if status == 0 else err

    return run


def test_servers_keys_operators_and_jobs(cli: Run, tmp_path: Path) -> None:
    assert "vault               test" in cli("info")
    assert json.loads(cli("info", "--json"))["vault"] == "test"

    out = cli("keys", "create", "--site", "site-a", "--out", str(tmp_path / "k.json"))
    assert out.startswith("registration key key-") and "for site site-a" in out
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
    err = cli("keys", "create", "--site", "site-a", "--out", str(tmp_path / "k.json"), status=1)
    assert "exists" in err and "hint: choose another --out, or pass --force" in err
    keys = json.loads(cli("keys", "list", "--json"))
    active = [k["id"] for k in keys]
    assert cli("keys", "revoke", active[0]) == f"registration key {active[0]} revoked\n"
    assert active[0] not in cli("keys", "list")
    assert active[0] in cli("keys", "list", "--all")

    table = cli("servers", "list").splitlines()
    assert table[0].split() == [
        "NAME",
        "SITE",
        "STATE",
        "VMS",
        "LAST",
        "HEARTBEAT",
        "CERT",
        "UNTIL",
        "ID",
    ]
    assert sorted(line.split()[0] for line in table[2:]) == ["hv-a1", "hv-a2", "hv-b1", "hv-b2"]
    assert [s["name"] for s in json.loads(cli("servers", "list", "--site", "site-b", "--json"))]
    shown = cli("servers", "show", "hv-a1")
    assert "name             hv-a1" in shown and "site             site-a" in shown
    err = cli("servers", "show", "nope", status=1)
    assert err == "sitepair-broker: error: no server with id or name 'nope' (see `servers list`)\n"

    # A command that starts a job shows it, or follows it to the end with --wait.
    started = json.loads(cli("servers", "ping", "hv-a1", "--note", "hi", "--json"))
    assert started["kind"] == "ping-server"
    waited = cli("servers", "ping", "hv-a1", "--wait")
    assert "  state    succeeded" in waited and "   1. succeeded" in waited
    assert "  state    succeeded" in cli("servers", "refresh", "hv-a2", "--wait")
    shown_job = cli("jobs", "show", started["id"])
    assert shown_job.startswith(f"job {started['id']}  ping-server  ")
    assert "  state    succeeded" in cli("jobs", "watch", started["id"])
    assert "sitepair-broker jobs list" in cli("jobs", "cancel", "nope", status=1)
    jobs = json.loads(cli("jobs", "list", "--kind", "ping-server", "--limit", "1", "--json"))
    assert len(jobs) == 1 and jobs[0]["kind"] == "ping-server"

    out = cli("operators", "add", "bob", "--out", str(tmp_path / "bob"))
    assert f"use it with: sitepair-broker --profile {tmp_path / 'bob'} servers list" in out
    assert "already holds an operator profile" in cli(
        "operators", "add", "bob", "--out", str(tmp_path / "bob"), status=1
    )
    assert "bob" in cli("operators", "list")

    assert "  state    succeeded" in cli("servers", "remove", "hv-b2", "--yes")
    assert "hv-b2" not in cli("servers", "list")
    assert "hv-b2" in cli("servers", "list", "--all")


def test_clouds_mappings_vms_and_plans(sites: Sites, cli: Run) -> None:
    cli("clouds", "create", "cloud-a", "--site", "site-a")
    out = cli("clouds", "create", "cloud-b", "--site", "site-b", "--json")
    assert json.loads(out)["name"] == "cloud-b"
    assert "already exists" in cli("clouds", "create", "cloud-a", "--site", "site-a", status=1)
    for host, cloud in (("hv-a1", "cloud-a"), ("hv-a2", "cloud-a"), ("hv-b1", "cloud-b")):
        cli("clouds", "add-host", cloud, host)
    out = cli("clouds", "add-host", "cloud-b", "hv-b2")
    assert out == "cloud cloud-b (site site-b), not paired\n  hosts: hv-b1, hv-b2\n"
    assert "is not a date and time" in cli(
        "clouds", "pair", "cloud-a", "cloud-b", "--initial-at", "soon", status=1
    )
    assert "  state    succeeded" in cli("clouds", "pair", "cloud-a", "cloud-b", "--wait")
    assert cli("clouds", "show", "cloud-a").startswith(
        "cloud cloud-a (site site-a), primary of a pair with cloud-b"
    )
    pairs = cli("clouds", "pairs").splitlines()
    assert pairs[2].split()[:3] == ["cloud-a", "cloud-b", "300s"]
    assert "  state    succeeded" in cli(
        "clouds", "policy", "cloud-a", "--recovery-points", "2", "--wait"
    )
    assert cli("clouds", "pairs").splitlines()[2].split()[3] == "2"
    assert "remove the pairing first" in cli("clouds", "delete", "cloud-a", status=1)

    assert cli("networks", "map", "corp-a", "corp-b") == "network corp-a -> corp-b\n"
    assert cli("storage", "map", "gold", "gold") == "storage gold -> gold\n"
    cli("networks", "map", "corp-x", "corp-b")
    assert cli("networks", "unmap", "corp-x") == "network mapping corp-x -> corp-b removed\n"
    assert cli("networks", "list").splitlines()[2].split() == [
        "corp-a",
        "corp-b",
        "cloud-a",
        "cloud-b",
    ]
    assert [m["kind"] for m in json.loads(cli("storage", "list", "--json"))] == ["storage"]

    make_vm(sites, "hv-a1", "web01")
    eventually(lambda: inventory_has(sites.admin, "web01"), what="VM in inventory")
    assert "web01" in cli("vms", "list", "--server", "hv-a1")
    assert "  state    succeeded" in cli("protect", "web01", "--wait")
    protected = cli("vms", "protected").splitlines()
    assert protected[2].split()[:3] == ["web01", "protected", "normal"]
    shown = cli("vms", "show", "web01")
    assert "  state          protected, epoch" in shown and "  primary        hv-a1" in shown
    assert "  state    succeeded" in cli("vms", "cycle", "web01", "--wait")
    assert "  state    succeeded" in cli("vms", "verify", "web01", "--no-repair", "--wait")
    cli("vms", "pause", "web01", "--wait")
    assert "protected (paused)" in cli("vms", "protected")
    cli("vms", "resume", "web01", "--wait")
    assert "only a failed-over VM can be committed" in cli("vms", "commit", "web01", status=1)

    assert cli("plans", "create", "p1", "--description", "the plan") == (
        "recovery plan p1: the plan\n  group 1 VMs     -\n"
    )
    cli("plans", "add-group", "p1")
    cli("plans", "add-vm", "p1", "web01", "--group", "2")
    cli("plans", "add-action", "p1", "--manual", "check it", "--action-name", "look")
    out = cli("plans", "add-action", "p1", "--script", "s.sh", "--arg", "a", "--group", "2")
    assert out.splitlines() == [
        "recovery plan p1: the plan",
        "  group 1 VMs     -",
        "  group 1 after   manual: look: check it",
        "  group 2 VMs     web01",
        "  group 2 after   script: s.sh: s.sh a (timeout 300s)",
    ]
    assert cli("plans", "list").splitlines()[2].split() == ["p1", "2", "1", "the", "plan"]
    assert "is not waiting for an operator" in cli("plans", "resume", "p1", status=1)

    assert "  state    succeeded" in cli("vms", "failover", "web01", "--type", "test", "--wait")
    assert "  state    succeeded" in cli("vms", "cleanup-test", "web01", "--wait")
    assert cli("plans", "delete", "p1", "--json").startswith("{")
    assert "  state    succeeded" in cli("vms", "disable", "web01", "--keep-replica", "--wait")
    assert cli("clouds", "unpair", "cloud-a") == "pairing cloud-a -> cloud-b removed\n"


class _RepeatingBroker:
    """A ListServers method whose every page hands back the same next_page_token."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, request: admin_pb2.ListServersRequest, **_: Any) -> Any:
        self.asked.append(request.page_token)
        return admin_pb2.ListServersResponse(
            servers=[admin_pb2.Server(name=f"s{len(self.asked)}")], next_page_token="again"
        )


def test_list_all_stops_when_the_broker_repeats_a_page(admin: AdminClient) -> None:
    method = _RepeatingBroker()
    request = admin_pb2.ListServersRequest(site="x")
    with pytest.raises(SitepairError, match="repeated a page of ListServers"):
        admin.list_all(method, request, lambda page: page.servers)  # type: ignore[arg-type]
    assert method.asked == ["", "again"]
    assert request.page_token == ""  # the caller's request is not changed


def test_list_all_follows_pages_and_stops_at_the_limit(admin: AdminClient) -> None:
    for _ in range(5):
        admin.call(
            admin.stub.CreateRegistrationKey, admin_pb2.CreateRegistrationKeyRequest(site="s")
        )
    request = admin_pb2.ListRegistrationKeysRequest(page_size=2)
    keys = admin.list_all(admin.stub.ListRegistrationKeys, request, lambda page: page.keys)
    assert len(keys) == 5 and len({k.id for k in keys}) == 5
    first = admin.list_all(
        admin.stub.ListRegistrationKeys, request, lambda page: page.keys, limit=3
    )
    assert [k.id for k in first] == [k.id for k in keys[:3]]
