"""A test failover as an operator runs it: a mistaken ``--point`` or ``--network`` is refused
before any job starts, and a test failover job that fails leaves nothing that blocks the next."""

from __future__ import annotations

from broker.client import wait_job
from broker.store.models import JobState
from tests.operator.conftest import Run
from tests.protection.conftest import Sites, eventually
from tests.protection.test_failover import protect_running


def test_bad_arguments_are_refused_before_a_job_starts(sites: Sites, cli: Run) -> None:
    s = sites
    protect_running(s)
    eventually(lambda: s.protected("web01").replica_status.committed_sequence, what="a point")
    jobs_before = cli("jobs", "list")

    err = cli("vms", "failover", "web01", "--type", "test", "--point", "bogus", status=1)
    assert "--point must be latest, latest-app-consistent or a sequence number" in err
    err = cli("vms", "failover", "web01", "--type", "test", "--point", "999", status=1)
    assert "holds no recovery point 999; it holds" in err and "vms show web01" in err, err
    err = cli("vms", "failover", "web01", "--type", "test", "--network", "nope", status=1)
    assert "has no network 'nope'; it has: corp-b" in err, err
    cli("plans", "create", "app")
    cli("plans", "add-vm", "app", "web01")
    err = cli("plans", "failover", "app", "--type", "test", "--point", "bogus", status=1)
    assert "--point must be latest, latest-app-consistent or a sequence number" in err
    assert cli("jobs", "list") == jobs_before  # nothing started, nothing left behind

    out = cli("vms", "failover", "web01", "--type", "test", "--network", "corp-b", "--wait")
    assert "succeeded" in out, out
    cli("vms", "cleanup-test", "web01", "--wait")


def test_a_failed_test_failover_job_does_not_block_the_next(sites: Sites, cli: Run) -> None:
    s = sites
    protect_running(s)
    fo = s.broker.ctx.failover
    rel = s.broker.loop.call(fo.find("web01"))
    # A job that fails on the recovery host (a point pruned after the broker checked it, say):
    # started as the API would, with a point the host does not hold.
    job = s.broker.loop.call(
        fo.start_failover_job(
            "test-failover", rel, by="test", params={"point": "999", "network": ""}
        )
    )
    done = wait_job(s.admin, job.id)
    assert done.state == JobState.FAILED.value, done
    assert "a new test failover can start" in done.error, done.error
    assert "test" not in s.protected("web01").failover_json

    out = cli("vms", "failover", "web01", "--type", "test", "--wait")
    assert "succeeded" in out, out
    err = cli("vms", "failover", "web01", "--type", "test", status=1)
    assert "already in place" in err and "vms cleanup-test web01" in err, err
    cli("vms", "cleanup-test", "web01", "--wait")
