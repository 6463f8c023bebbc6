"""``sitepair-agent register`` as an operator runs it: a mistake or a refusal leaves no half-made
home, a retry applies its new options, and the VM folder exists so the host reports storage.
Against a real broker's enrollment port."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from broker.client import AdminClient
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has
from tests.protection.test_walkthrough import make_vm, setup_pair
from tests.support.brokers import create_key


def register(
    creds: Path, home: Path, *options: str, capsys: pytest.CaptureFixture[str], status: int = 0
) -> str:
    argv = ["register", "--credentials", str(creds), "--name", "hv-x", "--home", str(home)]
    try:
        got = agent_main([*argv, "--certificate-port", "0", "--ticket-port", "0", *options])
    except SystemExit as exc:  # argparse refuses its own way
        got = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert got == status, (out, err)
    return out if status == 0 else err


def test_a_failed_register_leaves_nothing_and_a_retry_applies_new_options(
    admin: AdminClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "agent"
    creds = tmp_path / "key.json"
    key = create_key(admin, creds, site="site-a", uses=1).key

    # A port out of range is refused before the home is touched.
    err = register(creds, home, "--certificate-port", "70000", capsys=capsys, status=2)
    assert "70000 is not a port" in err
    err = register(creds, home, "--storage", "gold", capsys=capsys, status=1)
    assert "--storage must be NAME=FOLDER" in err
    assert not home.exists()

    # The broker refuses (the key was revoked): nothing of the attempt stays in the home.
    admin.call(admin.stub.RevokeRegistrationKey, admin_pb2.RevokeRegistrationKeyRequest(id=key.id))
    err = register(creds, home, "--storage", f"gold={tmp_path / 'a'}", capsys=capsys, status=1)
    assert "revoked" in err, err
    assert not (home / "agent.toml").exists()

    # The retry with a new key and another storage folder applies it.
    create_key(admin, creds, site="site-a", uses=1)
    out = register(creds, home, "--storage", f"gold={tmp_path / 'b'}", capsys=capsys)
    assert out.startswith("registered hv-x as host-"), out
    cfg = tomllib.loads((home / "agent.toml").read_text())
    assert cfg["storage"] == {"gold": str(tmp_path / "b")}
    # The VM folder exists, private like the home's other folders.
    vms = home / "vms"
    assert vms.is_dir() and stat.S_IMODE(vms.stat().st_mode) == 0o700


def test_a_configuration_left_by_an_older_attempt_is_named_with_its_cleanup(
    admin: AdminClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "agent"
    home.mkdir()
    creds = tmp_path / "key.json"
    create_key(admin, creds, site="site-a", uses=1)
    left = home / "agent.toml"
    left.write_text(f'[storage]\ngold = "{tmp_path / "old"}"\n')

    err = register(creds, home, "--storage", f"gold={tmp_path / 'new'}", capsys=capsys, status=1)
    assert f"rm {left}" in err, err
    left.unlink()  # what the hint says
    register(creds, home, "--storage", f"gold={tmp_path / 'new'}", capsys=capsys)
    assert tomllib.loads(left.read_text())["storage"] == {"gold": str(tmp_path / "new")}


def test_a_host_without_its_storage_folder_is_named_and_protect_goes_on_once_it_exists(
    sites: Sites,
) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01")
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM in inventory")
    for name in ("hv-b1", "hv-b2"):  # the recovery hosts' storage folder is not there
        s.hosts[name].stop()
        (s.hosts[name].home / "gold").rename(s.hosts[name].home / "gold-away")
        s.hosts[name].start()
    job = s.job(
        s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")),
        expect="failed",
    )
    gold = s.hosts["hv-b1"].home / "gold"
    assert f"host hv-b1 reports no storage at {gold}" in job.error, job.error
    assert "MiB free" not in job.error, job.error

    for name in ("hv-b1", "hv-b2"):
        (s.hosts[name].home / "gold-away").rename(s.hosts[name].home / "gold")
        s.job(s.admin.call(s.admin.stub.RefreshServer, admin_pb2.RefreshServerRequest(server=name)))
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01")))
    assert s.protected("web01").state == "protected"
