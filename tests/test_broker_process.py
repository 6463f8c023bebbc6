"""The broker as operators run it: a process with a home, restarted, killed, and its CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.identity import AgentIdentity
from broker.client import wait_job
from sitepair import credentials as creds_mod
from sitepair.v1 import admin_pb2
from tests.support.agents import AgentProcess, AgentThread, register_agent
from tests.support.brokers import BrokerProcess, create_key, make_home, python_env


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_restart_keeps_keys_servers_jobs_and_undelivered_commands(tmp_path: Path) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    broker.pin_ports()
    try:
        with broker.admin() as admin:
            creds = tmp_path / "c.json"
            create_key(admin, creds, uses=3)
            ident = register_agent(creds, tmp_path / "a", name="hv-1")
            # The agent is offline: the ping waits for it.
            job = admin.call(
                admin.stub.PingServer,
                admin_pb2.PingServerRequest(server="hv-1", note="across restart"),
            )
        broker.stop()
        assert broker.proc is not None and broker.proc.returncode == 0

        broker.start()
        with broker.admin() as admin:
            keys = admin.call(
                admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()
            ).keys
            assert [(k.uses_remaining, k.uses_total) for k in keys] == [(2, 3)]
            servers = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
            assert [(s.name, s.id, s.state) for s in servers] == [
                ("hv-1", ident.host_id, "disconnected")
            ]
            assert admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state in (
                "running",
                "waiting",
            )
            agent = AgentThread(tmp_path / "a")
            try:
                agent.wait_connected()
                done = wait_job(admin, job.id)
                assert done.state == "succeeded"
                assert json.loads(done.result_json)["note"] == "across restart"
            finally:
                agent.stop()
    finally:
        broker.stop()


def test_sigkill_and_restart_loses_nothing_committed(tmp_path: Path) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    broker.pin_ports()
    try:
        with broker.admin() as admin:
            for i in range(5):
                create_key(admin, tmp_path / f"c{i}.json", site=f"s{i}")
        broker.kill()
        broker.start()
        with broker.admin() as admin:
            keys = admin.call(
                admin.stub.ListRegistrationKeys, admin_pb2.ListRegistrationKeysRequest()
            ).keys
            assert sorted(k.site for k in keys) == [f"s{i}" for i in range(5)]
            # Keys made before the kill still enroll.
            register_agent(tmp_path / "c3.json", tmp_path / "a", name="hv-3")
    finally:
        broker.stop()


def test_private_key_and_secret_never_reach_store_or_logs(tmp_path: Path) -> None:
    log_file = tmp_path / "broker.log"
    home = make_home(tmp_path / "broker", log_file=log_file)
    broker = BrokerProcess(home)
    broker.start()
    try:
        with broker.admin() as admin:
            creds = tmp_path / "c.json"
            create_key(admin, creds)
            secret = creds_mod.load(creds).secret
            register_agent(creds, tmp_path / "a", name="hv-1")
            agent = AgentProcess(tmp_path / "a")
            agent.start()
            try:
                deadline = time.monotonic() + 20
                while (
                    admin.call(
                        admin.stub.GetServer, admin_pb2.GetServerRequest(server="hv-1")
                    ).state
                    != "connected"
                ):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                job = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1"))
                assert wait_job(admin, job.id).state == "succeeded"
            finally:
                assert agent.stop() == 0
    finally:
        broker.stop()
    ident = AgentIdentity.load(tmp_path / "a")
    from cryptography.hazmat.primitives import serialization

    from sitepair import pki

    key = pki.load_private_key(tmp_path / "a" / "identity" / "agent.key")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_body = ident.key_pem.decode().splitlines()[1]
    import base64

    secret_b64 = base64.urlsafe_b64encode(secret).decode().rstrip("=")
    haystacks = {p.name: p.read_bytes() for p in home.root.rglob("*") if p.is_file()}
    haystacks["broker.log"] = log_file.read_bytes()
    assert b"server registered" in haystacks["broker.log"]
    for name, data in haystacks.items():
        assert scalar not in data, name
        assert der not in data, name
        assert pem_body.encode() not in data, name
        assert secret not in data, name
        assert secret_b64.encode() not in data, name


def test_sigterm_is_a_graceful_shutdown(tmp_path: Path) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    assert broker.stop(signal.SIGINT) == 0
    assert not home.run_file.exists()


def test_cli_end_to_end_and_errors_without_tracebacks(tmp_path: Path) -> None:
    root = tmp_path / "broker"
    out = cli(
        "init",
        "--home",
        str(root),
        "--vault",
        "cli",
        "--enrollment",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    )
    assert "broker home created" in out.stdout
    again = cli("init", "--home", str(root), "--vault", "cli", check=False)
    assert again.returncode == 1
    assert "already holds a broker" in again.stderr and "Traceback" not in again.stderr

    # No broker running: a clear error, no traceback.
    down = cli("--home", str(root), "servers", "list", check=False)
    assert down.returncode == 1
    assert "cannot reach broker" in down.stderr and "Traceback" not in down.stderr

    from broker.home import BrokerHome

    broker = BrokerProcess(BrokerHome(root))
    broker.start()
    try:
        creds = tmp_path / "creds.json"
        made = json.loads(
            cli(
                "--home",
                str(root),
                "--json",
                "keys",
                "create",
                "--site",
                "east",
                "--valid",
                "2d",
                "--uses",
                "2",
                "--out",
                str(creds),
            ).stdout
        )
        assert made["site"] == "east" and made["uses_total"] == 2
        assert os.stat(creds).st_mode & 0o777 == 0o600
        listed = json.loads(cli("keys", "list", "--json", "--home", str(root)).stdout)
        assert [k["id"] for k in listed] == [made["id"]]
        text = cli("--home", str(root), "keys", "list").stdout
        assert "east" in text and "2/2" in text

        register = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "register",
                "--credentials",
                str(creds),
                "--name",
                "hv-1",
                "--home",
                str(tmp_path / "a"),
            ],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=60,
        )
        assert register.returncode == 0, register.stderr
        servers = json.loads(cli("--home", str(root), "servers", "list", "--json").stdout)
        assert [s["name"] for s in servers] == ["hv-1"]

        # Operators: a second profile made through the admin API works on its own.
        cli("--home", str(root), "operators", "add", "alice", "--out", str(tmp_path / "alice"))
        assert os.stat(tmp_path / "alice" / "admin.key").st_mode & 0o777 == 0o600
        ops = json.loads(
            cli("--profile", str(tmp_path / "alice"), "--json", "operators", "list").stdout
        )
        assert [o["name"] for o in ops] == ["local-admin", "alice"]  # the home's own one too

        bad = cli("--home", str(root), "servers", "show", "nope", check=False)
        assert bad.returncode == 1 and "no server with id or name 'nope'" in bad.stderr
        revoke = cli("--home", str(root), "keys", "revoke", made["id"])
        assert "revoked" in revoke.stdout
        removed = json.loads(
            cli("--home", str(root), "--json", "servers", "remove", "hv-1", "--yes").stdout
        )
        assert removed["state"] == "succeeded"
        jobs = json.loads(cli("--home", str(root), "--json", "jobs", "list").stdout)
        assert [j["kind"] for j in jobs] == ["remove-server"]
        shown = cli("--home", str(root), "jobs", "show", jobs[0]["id"]).stdout
        assert "deny-list" in shown
    finally:
        broker.stop()


def test_agent_cli_errors_are_clear(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--home", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    assert run.returncode == 1
    assert "no agent configuration" in run.stderr and "register" in run.stderr
    assert "Traceback" not in run.stderr
    bad = tmp_path / "creds.json"
    bad.write_text('{"format": "sitepair-credentials/1", "vault": "x"')
    reg = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "register",
            "--credentials",
            str(bad),
            "--name",
            "h",
            "--home",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    assert (
        reg.returncode == 1
        and "truncated or not JSON" in reg.stderr
        and "Traceback" not in reg.stderr
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_process_stops_gracefully(tmp_path: Path, sig: int) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerProcess(home)
    broker.start()
    try:
        with broker.admin() as admin:
            create_key(admin, tmp_path / "c.json")
        register_agent(tmp_path / "c.json", tmp_path / "a", name="hv-1")
        agent = AgentProcess(tmp_path / "a")
        agent.start()
        time.sleep(1.5)
        assert agent.stop(sig) == 0
        assert "agent stopped" in agent.log_path.read_text()
    finally:
        broker.stop()
