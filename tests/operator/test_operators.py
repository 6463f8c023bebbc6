"""Operators as an operator manages them: the home's own operator is listed, and a revoked
operator's certificate is refused from then on (PERMISSION_DENIED, in words), by this broker and
by one started later on the same store."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from broker.client import AdminClient, Profile
from sitepair.errors import PermissionDenied
from sitepair.v1 import admin_pb2
from tests.operator.conftest import Run, runner
from tests.support.brokers import BrokerThread, make_home


def raw_status(client: AdminClient) -> grpc.StatusCode:
    """The status code a revoked operator's call gets on the wire."""
    try:
        client.stub.GetBrokerInfo(admin_pb2.GetBrokerInfoRequest(), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_list_shows_the_local_operator_and_revoke_refuses_the_certificate(
    broker: BrokerThread, broker_cli: Run, tmp_path: Path
) -> None:
    rows = broker_cli("operators", "list").splitlines()[2:]
    assert [r.split()[:4] for r in rows] == [["local-admin", "(this", "home)", "local-admin"]]
    listed = json.loads(broker_cli("operators", "list", "--json"))
    assert listed[0]["local"] is True and listed[0]["certificate_not_after"]

    broker_cli("operators", "add", "bob", "--out", str(tmp_path / "bob"))
    bob = AdminClient(Profile.load(tmp_path / "bob"))
    assert bob.call(bob.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()).vault

    # Revoking asks first; an operator cannot revoke itself.
    err = broker_cli("operators", "revoke", "local-admin", status=1)
    assert "Refusing without --yes" in err
    err = broker_cli("operators", "revoke", "local-admin", "--yes", status=1)
    assert "cannot revoke itself" in err and "another operator's profile" in err

    out = broker_cli("operators", "revoke", "bob", "--yes")
    assert out.startswith("operator bob (op-") and "refused from now on" in out
    assert raw_status(bob) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDenied, match=r"operator op-[0-9a-f]+ was revoked") as refused:
        bob.call(bob.stub.ListServers, admin_pb2.ListServersRequest())
    assert "ask another operator for a new profile: sitepair-broker operators add NAME" in str(
        refused.value
    )
    err = broker_cli("operators", "revoke", "bob", "--yes", status=1)
    assert "already revoked" in err
    assert "bob" not in broker_cli("operators", "list")
    table = broker_cli("operators", "list", "--all")
    assert "REVOKED" in table.splitlines()[0] and "bob" in table

    # The operator can go on: a new profile works.
    broker_cli("operators", "add", "bob", "--out", str(tmp_path / "bob2"))
    bob2 = AdminClient(Profile.load(tmp_path / "bob2"))
    assert bob2.call(bob2.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()).vault
    bob.close()

    bob2.close()


def test_the_home_operator_revoked_by_another_stays_revoked_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = make_home(tmp_path / "broker")
    first = BrokerThread(home)
    try:
        cli = runner(home.root, capsys)
        cli("operators", "add", "bob", "--out", str(tmp_path / "bob"))
        out = cli("--profile", str(tmp_path / "bob"), "operators", "revoke", "local-admin", "--yes")
        assert out.startswith("operator local-admin (local-admin) revoked")
        local = first.admin()
        assert raw_status(local) == grpc.StatusCode.PERMISSION_DENIED
        local.close()
    finally:
        first.stop()
    again = BrokerThread(home)
    try:
        local = again.admin()
        assert raw_status(local) == grpc.StatusCode.PERMISSION_DENIED
        local.close()
        bob = AdminClient(Profile.load(tmp_path / "bob", run_file=home.run_file))
        ops = bob.call(
            bob.stub.ListOperators, admin_pb2.ListOperatorsRequest(include_revoked=True)
        ).operators
        assert [(o.name, o.local, o.HasField("revoked_at")) for o in ops] == [
            ("local-admin", True, True),
            ("bob", False, False),
        ]
        bob.close()
    finally:
        again.stop()
