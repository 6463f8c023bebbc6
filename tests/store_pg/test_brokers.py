"""Real brokers on PostgreSQL: a broker process serving an agent, and two brokers sharing a vault."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from broker.client import wait_job
from broker.home import BrokerHome
from broker.store.postgres import PostgresStore
from sitepair.v1 import admin_pb2
from tests.store_pg.conftest import PASSWORD, wait_for
from tests.support.agents import AgentProcess, AgentThread, register_agent
from tests.support.brokers import BrokerProcess, BrokerThread, create_key, python_env


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )


def _init(root: Path, dsn: str, *, lease: str = "3s") -> BrokerHome:
    """``sitepair-broker init --store postgresql`` on free ports, with test-friendly timings."""
    made = _cli(
        "init",
        "--home",
        str(root),
        "--vault",
        "pgvault",
        "--enrollment",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
        "--store",
        "postgresql",
        "--dsn",
        dsn,
    )
    assert made.returncode == 0, made.stderr
    home = BrokerHome(root)
    text = home.config.read_text()
    text = text.replace('interval = "10s"', 'interval = "1s"')
    text = re.sub(r'leader_lease = "[^"]*"', f'leader_lease = "{lease}"', text)
    home.config.write_text(text)
    return home


def _copy(home: BrokerHome, root: Path) -> BrokerHome:
    """Another broker of the same vault: a copy of the home (same CA, ticket key, store)."""
    shutil.copytree(home.root, root, ignore=shutil.ignore_patterns("run", "*.out", "*.log"))
    return BrokerHome(root)


def _server_state(broker: BrokerThread | BrokerProcess, name: str) -> str:
    with broker.admin() as admin:
        server = admin.call(admin.stub.GetServer, admin_pb2.GetServerRequest(server=name))
    return str(server.state)


def test_broker_process_on_postgresql_enrolls_an_agent_and_runs_a_command(
    pg_dsn: str, tmp_path: Path
) -> None:
    home = _init(tmp_path / "broker", pg_dsn)
    config = home.config.read_text()
    assert 'backend = "postgresql"' in config and PASSWORD not in config
    assert not home.database.exists()  # the state is in PostgreSQL, not in the home
    again = _cli("init", "--home", str(tmp_path / "other"), "--vault", "x", "--store")
    assert again.returncode != 0
    second = _cli(
        "init", "--home", str(tmp_path / "other"), "--vault", "x", "--store", "postgresql",
        "--dsn", pg_dsn,
    )  # fmt: skip
    assert second.returncode == 1 and "already holds vault 'pgvault'" in second.stderr

    broker = BrokerProcess(home)
    broker.start()
    agent: AgentThread | None = None
    try:
        with broker.admin() as admin:
            info = admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest())
            assert info.vault == "pgvault"
            assert info.store.startswith("postgresql:") and PASSWORD not in info.store
            creds = tmp_path / "creds.json"
            create_key(admin, creds, uses=1)
            ident = register_agent(creds, tmp_path / "a", name="hv-1")
            agent = AgentThread(tmp_path / "a")
            agent.wait_connected()
            job = admin.call(
                admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1", note="pg")
            )
            done = wait_job(admin, job.id)
            assert done.state == "succeeded" and json.loads(done.result_json)["note"] == "pg"
            keys = admin.call(
                admin.stub.ListRegistrationKeys,
                admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
            )
            assert [k.uses_remaining for k in keys.keys] == [0]
    finally:
        if agent is not None:
            agent.stop()
        assert broker.stop() == 0
    store = PostgresStore.open(pg_dsn)
    try:
        with store.read() as tx:
            server = tx.get_server(ident.host_id)
            assert server is not None and server.name == "hv-1" and not server.connected
            assert tx.live_brokers() == []  # the broker gave its lease up when it stopped
    finally:
        store.close()


def test_two_brokers_share_a_vault_and_only_the_leader_runs_the_liveness_monitor(
    pg_dsn: str, tmp_path: Path
) -> None:
    home1 = _init(tmp_path / "b1", pg_dsn)
    home2 = _copy(home1, tmp_path / "b2")
    first: BrokerThread | None = BrokerThread(home1)
    assert first is not None
    second: BrokerThread | None = None
    agent: AgentProcess | None = None
    try:
        second = BrokerThread(home2)
        assert first.broker.leadership.is_leader
        assert not second.broker.leadership.is_leader
        # The non-leader serves RPCs: an agent enrolls and connects through the second broker.
        with second.admin() as admin:
            create_key(admin, tmp_path / "c1.json")
            create_key(admin, tmp_path / "c2.json")
        register_agent(tmp_path / "c1.json", tmp_path / "a1", name="hv-1")
        register_agent(tmp_path / "c2.json", tmp_path / "a2", name="hv-2")  # stays offline
        agent = AgentProcess(tmp_path / "a1")
        agent.start()
        wait_for(lambda: _server_state(first, "hv-1") == "connected")

        # The agent freezes: its stream stays open but its heartbeats stop. The leader's
        # monitor notices, though the agent is connected to the other broker.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _server_state(second, "hv-1") == "disconnected", timeout=15)
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        assert first.broker._liveness is not None and first.broker._liveness.sweeps > 0
        assert second.broker._liveness is not None and second.broker._liveness.sweeps == 0

        # A job the leader runs, waiting for an offline agent, outlives the leader: when it
        # stops, the other broker leads, runs the monitor and takes the job over.
        with first.admin() as admin:
            job = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-2"))
        first.stop()
        first = None
        wait_for(lambda: second.broker.leadership.is_leader, timeout=10)
        wait_for(lambda: second.broker._liveness.sweeps > 0, timeout=10)  # type: ignore[union-attr]
        store = PostgresStore.open(pg_dsn)
        try:

            def adopted() -> bool:
                with store.read() as tx:
                    j = tx.get_job(job.id)
                assert j is not None
                return j.owner == second.broker.broker_id

            wait_for(adopted, timeout=10)
        finally:
            store.close()
        with second.admin() as admin:
            assert admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state in (
                "running",
                "waiting",
            )
    finally:
        if agent is not None:
            agent.stop()
        if second is not None:
            second.stop()
        if first is not None:
            first.stop()
