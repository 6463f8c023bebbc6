"""Mistyped arguments get an error that names the allowed values, from the command line and from
the admin API alike; never an internal error, never a silent change or an empty answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.client import AdminClient
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2
from tests.operator.conftest import Run


def test_key_uses_out_of_range_are_refused(broker_cli: Run, tmp_path: Path) -> None:
    out = str(tmp_path / "k.json")
    for uses in ("-3", "0", "1001"):
        err = broker_cli(
            "keys", "create", "--site", "site-a", "--uses", uses, "--out", out, status=2
        )
        assert "out of range: use 1 to 1000" in err, err
        assert "internal error" not in err
    err = broker_cli("keys", "create", "--site", "site-a", "--uses", "x", "--out", out, status=2)
    assert "'x' is not a whole number" in err
    assert not Path(out).exists()
    assert "uses 3," in broker_cli(
        "keys", "create", "--site", "site-a", "--uses", "3", "--out", out
    )


def test_job_states_and_sites_are_checked(
    broker_cli: Run, admin: AdminClient, tmp_path: Path
) -> None:
    err = broker_cli("jobs", "list", "--state", "bogus", status=2)
    assert "invalid choice: 'bogus'" in err and "succeeded" in err and "running" in err
    with pytest.raises(InvalidArgument, match="unknown job state 'bogus'; use one of queued"):
        admin.call(admin.stub.ListJobs, admin_pb2.ListJobsRequest(state="bogus"))
    assert broker_cli("jobs", "list", "--state", "failed").strip().endswith("(none)")

    # No site is known yet: a cloud or a server filter naming one is refused, and says how a
    # site comes to be.
    err = broker_cli("clouds", "create", "cloud-a", "--site", "site-a", status=1)
    assert "no site 'site-a' in this vault; known: none yet" in err
    assert "keys create --site NAME" in err
    broker_cli("keys", "create", "--site", "site-a", "--out", str(tmp_path / "k.json"))
    broker_cli("clouds", "create", "cloud-a", "--site", "site-a")
    err = broker_cli("clouds", "create", "cloud-b", "--site", "stie-a", status=1)
    assert "no site 'stie-a' in this vault; known: site-a" in err, err
    err = broker_cli("servers", "list", "--site", "stie-a", status=1)
    assert "known: site-a" in err
    assert broker_cli("servers", "list", "--site", "site-a").strip().endswith("(none)")
