"""What scripts read from the three programs: ``--json`` output with numbers as numbers, zero
values present and no JSON inside strings; errors as one JSON line on standard error under
``--json``; and the encoder itself on the cases real output may not reach (64-bit values past
2**53, maps, a ``*_json`` field that is not JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agent.cli import main as agent_main
from broker.cli import main as broker_main
from broker.client import AdminClient
from broker.home import BrokerHome
from sitepair.cliutil import proto_to_dict
from sitepair.v1 import admin_pb2, control_pb2
from sitepair.vdisk.cli import main as vdisk_main
from tests.operator.conftest import Run
from tests.support.brokers import python_env


def json_error(err: str) -> dict[str, object]:
    """The one JSON line an error under ``--json`` is, checked for its shape."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    doc = json.loads(lines[0])
    assert set(doc) == {"error"}
    error: dict[str, object] = doc["error"]
    assert set(error) == {"message", "hint", "code"}
    return error


# -- sitepair-broker ----------------------------------------------------------------------------


def test_broker_json_has_numbers_zero_values_and_documents_as_objects(
    broker_cli: Run, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "hv-x"
    agent_args = ["register", "--credentials", str(credentials), "--name", "hv-x"]
    assert agent_main([*agent_args, "--home", str(home), "--certificate-port", "0"]) == 0
    broker_cli("servers", "list")  # what the agent printed is not this test's

    servers = json.loads(broker_cli("servers", "list", "--json"))
    assert servers[0]["vm_count"] == 0  # a zero, present
    assert servers[0]["withheld"] == []  # an empty list, present

    ping = json.loads(broker_cli("servers", "ping", "hv-x", "--json"))
    steps = ping["steps"]
    assert steps, ping
    # uint64 progress as JSON numbers (protobuf's JSON makes them strings), zeros present.
    assert steps[0]["progress_done"] == 0 and steps[0]["progress_total"] == 0
    assert ping["result_json"] is None  # no result yet: null, not ""

    removed = json.loads(broker_cli("servers", "remove", "hv-x", "--yes", "--json"))
    done = json.loads(broker_cli("jobs", "watch", removed["id"], "--json"))
    assert done["state"] == "succeeded", done
    # The job's result is an object in the output, not a string holding JSON.
    assert isinstance(done["result_json"], dict), done["result_json"]
    assert done["result_json"], done


def test_broker_errors_under_json_are_one_json_line(broker_cli: Run) -> None:
    error = json_error(broker_cli("vms", "show", "nosuch", "--json", status=1))
    assert error["code"] == "NOT_FOUND"
    assert "nosuch" in str(error["message"])
    # --json before the command counts as well, and argparse's own refusals are JSON too.
    error = json_error(broker_cli("--json", "jobs", "list", "--state", "bogus", status=2))
    assert error["code"] == "INVALID_ARGUMENT"
    assert "bogus" in str(error["message"])
    assert "--help" in str(error["hint"])
    # Without --json: the lines an operator reads, as before.
    err = broker_cli("vms", "show", "nosuch", status=1)
    assert err.startswith("sitepair-broker: error: ") and "{" not in err


def test_broker_error_without_a_broker_under_json(tmp_path: Path) -> None:
    """An error before any call (no broker given), from the program as a shell runs it."""
    env = python_env()
    env.pop("SITEPAIR_HOME", None)
    env.pop("SITEPAIR_PROFILE", None)
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "servers", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1 and r.stdout == ""
    error = json_error(r.stderr)
    assert error == {
        "message": "no broker given",
        "hint": "pass --home DIR (a broker home) or --profile DIR",
        "code": "INVALID_ARGUMENT",
    }


# -- sitepair-agent -----------------------------------------------------------------------------


def test_agent_json_has_numbers_and_zero_values(
    admin: AdminClient, credentials: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "agent"
    argv = ["register", "--credentials", str(credentials), "--name", "hv-j", "--home", str(home)]
    assert agent_main([*argv, "--certificate-port", "0", "--json"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["site"] == "site-a" and registered["host_id"]

    assert agent_main(["status", "--home", str(home), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["certificate_port"] == 0  # what was asked: any free port; a number
    assert status["ticket_port"] == 8083
    assert status["advertise_certificate_port"] == 0  # zero, present
    assert status["advertise"] == ""  # empty, present


def test_agent_errors_under_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["status", "--home", str(tmp_path / "none"), "--json"]) == 1
    error = json_error(capsys.readouterr().err)
    assert "not registered" in str(error["message"])
    assert "sitepair-agent register" in str(error["hint"])
    with pytest.raises(SystemExit) as caught:
        agent_main(["register", "--json", "--certificate-port", "x"])
    assert caught.value.code == 2
    error = json_error(capsys.readouterr().err)
    assert error["code"] == "INVALID_ARGUMENT" and "not a port" in str(error["message"])


# -- sitepair-vdisk -----------------------------------------------------------------------------


def test_vdisk_json_has_numbers_and_zero_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "d.vhdx"
    assert vdisk_main(["create", str(image), "--size", "8M"]) == 0
    capsys.readouterr()
    assert vdisk_main(["info", str(image), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["virtual_size"] == 8 << 20
    assert info["allocated_bytes"] == 0  # nothing written yet: a zero, present
    assert info["format"] == "vhdx" and info["parent"] is None


def test_vdisk_errors_under_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vdisk_main(["info", str(tmp_path / "missing.vhd"), "--json"]) == 2
    error = json_error(capsys.readouterr().err)
    assert "missing.vhd" in str(error["message"])
    assert vdisk_main(["info", "--json"]) == 2  # argparse's refusal: the path is missing
    error = json_error(capsys.readouterr().err)
    assert error["code"] == "INVALID_ARGUMENT" and "required" in str(error["message"])
    assert vdisk_main(["info", str(tmp_path / "missing.vhd")]) == 2
    assert capsys.readouterr().err.startswith("sitepair-vdisk: error: ")


# -- the encoder --------------------------------------------------------------------------------


def test_encoder_keeps_64_bit_values_exact_and_decodes_documents() -> None:
    job = admin_pb2.Job(
        id="j1",
        created_at=Timestamp(seconds=86400),
        result_json='{"servers": {"hv-1": {"vms": 2}}}',
        steps=[admin_pb2.JobStep(name="copy", progress_done=(1 << 63) + 1)],
    )
    doc = proto_to_dict(job)
    assert doc["steps"][0]["progress_done"] == (1 << 63) + 1  # past 2**53: still exact
    assert json.loads(json.dumps(doc))["steps"][0]["progress_done"] == (1 << 63) + 1
    assert doc["result_json"] == {"servers": {"hv-1": {"vms": 2}}}
    assert doc["error"] == "" and doc["withheld"] == []
    assert "finished_at" not in doc  # an unset message field stays absent
    assert doc["created_at"] == "1970-01-02T00:00:00Z"  # a Timestamp stays a time string

    odd = proto_to_dict(admin_pb2.ProtectedVm(failover_json="not json", epoch=7))
    assert odd["failover_json"] == "not json"  # shown as sent, never an error
    assert odd["epoch"] == 7
    assert "rpo_seconds" not in odd  # a field with presence stays absent while unset

    mapped = proto_to_dict(control_pb2.RunScript(env={"A": "1"}))
    assert mapped["env"] == {"A": "1"}


def test_broker_service_commands_answer_json(
    broker_home: BrokerHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--home", str(broker_home.root), "service"]
    units = ["--unit-dir", str(tmp_path / "u"), "--json"]
    assert broker_main([*base, "install", *units, "--no-enable"]) == 0
    unit = tmp_path / "u" / "sitepair-broker.service"
    assert json.loads(capsys.readouterr().out) == {"unit": str(unit), "enabled": False}
    assert broker_main([*base, "status", *units]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["unit"] == str(unit) and status["installed"] is True
    assert broker_main([*base, "remove", *units, "--no-enable"]) == 0
    assert json.loads(capsys.readouterr().out) == {"unit": str(unit), "removed": True}
