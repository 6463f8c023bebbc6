"""Following a job (``--wait``, ``jobs watch``): rate and time left of a step's progress, and
Ctrl-C, which stops following and says the job goes on and how to follow it again."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from broker.cli_jobs import progress_line
from broker.client import AdminClient
from sitepair.cliutil import ProgressRate, format_eta
from sitepair.v1 import admin_pb2
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, python_env

MiB = 1 << 20


def test_ctrl_c_while_waiting_says_the_job_keeps_running(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    """A ping of a registered host that is not running waits for it to connect: a job that
    stays running, followed with ``--wait`` by the program as a shell runs it; then SIGINT, as
    Ctrl-C sends it."""
    register_agent(credentials, tmp_path / "hv-off", name="hv-off")
    home = str(broker.home.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "--home", home, "servers", "ping", "hv-off", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first line: it is following the job now
        assert "ping-server" in first, first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    jobs = admin.call(admin.stub.ListJobs, admin_pb2.ListJobsRequest(kind="ping-server")).jobs
    assert len(jobs) == 1
    job_id = jobs[0].id
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    assert f"stopped following job {job_id}; the job keeps running on the broker" in err, err
    assert f"follow it with `sitepair-broker jobs watch {job_id}`" in err, err
    still = admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job_id))
    assert still.state not in ("succeeded", "failed", "cancelled"), still.state


def test_rate_and_time_left_from_successive_samples() -> None:
    rate = ProgressRate(window=30.0)
    assert rate.sample(100.0, 0, 100 * MiB) == ""  # one sample: no rate yet
    assert rate.sample(102.0, 20 * MiB, 100 * MiB) == "10.0 MiB/s, 8s left"
    assert rate.sample(104.0, 40 * MiB, 100 * MiB) == "10.0 MiB/s, 6s left"
    assert rate.sample(106.0, 60 * MiB, 100 * MiB) == "10.0 MiB/s, 4s left"
    # Samples older than the window no longer count (but the last before it): the rate
    # follows the recent speed, here 20 MiB in the 34 s since the sample at 106.
    assert rate.sample(140.0, 80 * MiB, 100 * MiB) == "602.4 KiB/s, 34s left"
    # A step that starts over (a retry) starts its rate over too.
    assert rate.sample(141.0, 0, 100 * MiB) == ""


def test_a_count_is_not_shown_as_bytes() -> None:
    """A step counting items (the VMs a policy goes to) shows items per second."""
    rate = ProgressRate()
    rate.sample(0.0, 0, 40)
    assert rate.sample(4.0, 10, 40) == "2.5/s, 12s left"


def test_time_left_reads_as_an_operator_reads_it() -> None:
    assert format_eta(0.2) == "1s"
    assert format_eta(59) == "59s"
    assert format_eta(725) == "12m05s"
    assert format_eta(12000) == "3h20m"


def test_the_progress_line_of_a_running_step() -> None:
    def job(done: int) -> admin_pb2.Job:
        return admin_pb2.Job(
            kind="enable-protection",
            target="vm/web01",
            state="running",
            steps=[
                admin_pb2.JobStep(index=0, name="check", state="succeeded"),
                admin_pb2.JobStep(
                    index=1,
                    name="initial replication",
                    state="running",
                    progress_done=done,
                    progress_total=64 * MiB,
                ),
            ],
        )

    rates: dict[int, ProgressRate] = {}
    first = progress_line(job(0), rates, 10.0)
    assert first.startswith("running   enable-protection vm/web01 | 2/2 initial replication [")
    assert "/s" not in first
    line = progress_line(job(16 * MiB), rates, 12.0)
    assert line.endswith(" 25.0% 8.0 MiB/s, 6s left"), line
