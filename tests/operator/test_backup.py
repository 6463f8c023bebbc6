"""``sitepair-broker backup`` and ``restore`` as an operator runs them: a backup of a serving
broker with agents connected and a VM protected, restored into a new home that a new broker
serves with the same servers, relationship and jobs; damaged, newer and misplaced backups are
refused with the file or the reason named; the PostgreSQL store through pg_dump/pg_restore."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import main as cli_main
from broker.client import AdminClient
from broker.config import StoreConfig
from broker.home import BrokerHome
from broker.store.base import migrations
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Host, Sites, eventually, inventory_has
from tests.protection.test_failover import host_of
from tests.protection.test_walkthrough import MiB, make_vm
from tests.store_pg.conftest import PostgresCluster, pg_cluster, pg_dsn  # noqa: F401 - fixtures
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerProcess, BrokerThread, create_key, make_home


def run(capsys: pytest.CaptureFixture[str], *args: str, status: int = 0) -> str:
    """One ``sitepair-broker`` command; its output (its standard error when it fails)."""
    try:
        got = cli_main(list(args))
    except SystemExit as exc:
        got = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert got == status, (args, out, err)
    return out if status == 0 else err


def servers(admin: AdminClient) -> dict[str, str]:
    resp = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest())
    return {s.name: s.state for s in resp.servers}


def start_agents(hosts: dict[str, Host]) -> list[AgentThread]:
    agents = []
    for h in hosts.values():
        agents.append(AgentThread(h.home))
        agents[-1].wait_connected()
    return agents


@pytest.fixture
def protected_site(tmp_path: Path) -> Iterator[tuple[BrokerProcess, Sites, list[AgentThread]]]:
    """A ``serve`` process with two agents connected and web01 protected from hv-a1 to hv-b1."""
    broker = BrokerProcess(make_home(tmp_path / "broker"))
    broker.start()
    broker.pin_ports()  # a broker on the restored home listens where the agents look
    agents: list[AgentThread] = []
    admin = broker.admin()
    try:
        hosts = {}
        for name, site in (("hv-a1", "site-a"), ("hv-b1", "site-b")):
            creds = tmp_path / f"{name}.json"
            create_key(admin, creds, site=site)
            h = tmp_path / name
            (h / "gold").mkdir(parents=True)
            ident = register_agent(
                creds,
                h,
                name=name,
                storage={"gold": str(h / "gold")},
                networks=[("corp-a" if site == "site-a" else "corp-b", [])],
                vm_root="gold/vms",
            )
            hosts[name] = Host(name, site, h, ident.host_id, None)
        agents = start_agents(hosts)
        s = Sites(broker=None, admin=admin, hosts=hosts)  # type: ignore[arg-type]
        a = admin
        a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
        a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server="hv-a1"))
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server="hv-b1"))
        s.job(
            a.call(
                a.stub.PairClouds,
                admin_pb2.PairCloudsRequest(
                    primary="cloud-a",
                    recovery="cloud-b",
                    policy=admin_pb2.Policy(copy_frequency_seconds=300, compression=True),
                ),
            )
        )
        a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
        make_vm(s, "hv-a1", "web01", size=4 * MiB)
        host_of(s, "hv-a1").set_vm_state("web01", "running")
        eventually(lambda: inventory_has(a, "web01"), what="web01 in the inventory")
        s.job(a.call(a.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
        yield broker, s, agents
    finally:
        admin.close()
        for agent in agents:
            agent.stop()
        broker.stop()


def test_backup_of_a_serving_broker_restores_into_a_broker_that_carries_on(
    protected_site: tuple[BrokerProcess, Sites, list[AgentThread]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, s, _ = protected_site
    before = s.protected("web01")
    assert before.state == "protected"
    jobs_before = {
        j.id: j.state for j in s.admin.call(s.admin.stub.ListJobs, admin_pb2.ListJobsRequest()).jobs
    }
    assert len(jobs_before) >= 2  # the pairing and the protection

    dest = tmp_path / "backups" / "monday"
    out = run(capsys, "backup", str(dest), "--home", str(broker.home.root))
    assert f"written to {dest}" in out and "schema version" in out, out
    assert broker.proc is not None and broker.proc.poll() is None  # it kept serving
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["store"] == {"backend": "sqlite", "schema_version": len(migrations())}
    assert {"broker.toml", "ca/ca.key", "ca/ca.crt", "tickets/signing.key"} <= set(
        manifest["files"]
    )
    assert "store/broker.db" in manifest["files"] and "tls/server.key" not in manifest["files"]
    for path in dest.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert not list(dest.parent.glob(".*partial"))  # nothing half-written left beside it

    # The machine is lost: the old broker stops for good and a new home is made from the backup.
    broker.stop()
    new_home = tmp_path / "restored"
    out = run(capsys, "restore", str(dest), "--home", str(new_home))
    assert "vault test restored" in out, out
    home = BrokerHome(new_home)
    assert stat.S_IMODE(home.ca_key.stat().st_mode) == 0o600
    assert not home.server_cert.exists()  # issued at the first start
    restored = BrokerProcess(home)
    restored.start()
    try:
        with restored.admin() as admin:
            # The agents reconnect to it (same addresses, same CA): servers, relationship, jobs.
            eventually(
                lambda: servers(admin) == {"hv-a1": "connected", "hv-b1": "connected"},
                what="both agents connected to the restored broker",
            )
            after = admin.call(admin.stub.GetProtected, admin_pb2.ProtectedRef(vm="web01"))
            assert (after.relationship_id, after.state, after.epoch) == (
                before.relationship_id,
                "protected",
                before.epoch,
            )
            assert (after.primary_server, after.replica_server) == ("hv-a1", "hv-b1")
            jobs = admin.call(admin.stub.ListJobs, admin_pb2.ListJobsRequest()).jobs
            assert {j.id: j.state for j in jobs if j.id in jobs_before} == jobs_before
        # And it still runs replication: a cycle on demand completes.
        run(capsys, "vms", "cycle", "web01", "--wait", "--home", str(new_home))
    finally:
        restored.stop()


def idle_home(tmp_path: Path) -> BrokerHome:
    return make_home(tmp_path / "broker")


def test_a_damaged_backup_is_refused_naming_the_file_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = idle_home(tmp_path)
    dest = tmp_path / "bk"
    run(capsys, "backup", str(dest), "--home", str(home.root))
    db = dest / "store" / "broker.db"
    data = bytearray(db.read_bytes())
    data[5000] ^= 0xFF
    db.write_bytes(bytes(data))
    target = tmp_path / "new"
    err = run(capsys, "restore", str(dest), "--home", str(target), status=1)
    assert "backup file store/broker.db" in err and "does not match its checksum" in err, err
    assert not target.exists()

    db.unlink()
    err = run(capsys, "restore", str(dest), "--home", str(target), status=1)
    assert "backup file store/broker.db is missing" in err, err

    err = run(capsys, "restore", str(tmp_path), "--home", str(target), status=1)
    assert "has no manifest.json" in err, err


def test_a_backup_of_a_newer_schema_or_into_a_used_home_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = idle_home(tmp_path)
    dest = tmp_path / "bk"
    run(capsys, "backup", str(dest), "--home", str(home.root))
    err = run(capsys, "backup", str(dest), "--home", str(home.root), status=1)
    assert f"{dest} already exists" in err, err

    err = run(capsys, "restore", str(dest), "--home", str(home.root), status=1)
    assert "is not empty" in err, err

    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["store"]["schema_version"] = len(migrations()) + 1
    (dest / "manifest.json").write_text(json.dumps(manifest))
    err = run(capsys, "restore", str(dest), "--home", str(tmp_path / "new"), status=1)
    assert f"newer than this broker knows ({len(migrations())})" in err, err
    assert "sitepair 0.1.0" in err and not (tmp_path / "new").exists()

    manifest["store"]["schema_version"] = len(migrations())
    manifest["files"]["../outside"] = manifest["files"]["broker.toml"]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    err = run(capsys, "restore", str(dest), "--home", str(tmp_path / "new"), status=1)
    assert "outside a broker home: '../outside'" in err, err


def test_postgresql_store_is_dumped_and_restored_into_an_empty_database(
    tmp_path: Path,
    pg_cluster: PostgresCluster,  # noqa: F811 - the fixture
    pg_dsn: str,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump/pg_restore not on PATH: install Debian's postgresql-client")
    home = make_home(tmp_path / "broker", store=StoreConfig(backend="postgresql", dsn=pg_dsn))
    broker = BrokerThread(home)
    try:
        admin = broker.admin()
        creds = tmp_path / "hv-a1.json"
        create_key(admin, creds)
        register_agent(creds, tmp_path / "hv-a1", name="hv-a1")
        assert servers(admin) == {"hv-a1": "disconnected"}
        admin.close()
        dest = tmp_path / "bk"
        out = run(capsys, "backup", str(dest), "--home", str(home.root))  # while it serves
        assert "store          postgresql" in out, out
    finally:
        broker.stop()
    assert (dest / "store" / "broker.pgdump").read_bytes()[:5] == b"PGDMP"

    # Into the database it came from, which still holds the vault: refused, nothing written.
    err = run(capsys, "restore", str(dest), "--home", str(tmp_path / "same"), status=1)
    assert "already holds a sitepair store (vault 'test')" in err, err
    assert not (tmp_path / "same").exists()

    target = pg_cluster.create_database()
    new_home = tmp_path / "restored"
    run(capsys, "restore", str(dest), "--home", str(new_home), "--dsn", target)
    assert f'dsn = "{target}"' in (new_home / "broker.toml").read_text()
    restored = BrokerThread(BrokerHome(new_home))
    try:
        with restored.admin() as admin:
            assert servers(admin) == {"hv-a1": "disconnected"}
    finally:
        restored.stop()


def test_postgresql_backup_without_pg_dump_names_the_package(
    tmp_path: Path,
    pg_dsn: str,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = make_home(tmp_path / "broker", store=StoreConfig(backend="postgresql", dsn=pg_dsn))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    err = run(capsys, "backup", str(tmp_path / "bk"), "--home", str(home.root), status=1)
    assert "pg_dump is not installed" in err and "postgresql-client" in err, err
    assert not (tmp_path / "bk").exists() and not list(tmp_path.glob(".bk.*"))
    assert os.environ["PATH"] == str(tmp_path / "nothing-here")
