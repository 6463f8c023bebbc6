"""GuestRun on the recovery host (agent/replication/guest.py, ReplicationService.guest_run), and
the exact proof through ReplicationService.failover: a replica made by a real initial cycle over
mutual TLS, a test VM made by the ``directory`` backend. The qemu backend's real guest is in
tests/qemu/test_guest_run.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.hosts.directory import DirectoryBackend
from agent.replication import guest
from agent.replication.service import ReplicationService
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.v1 import common_pb2, control_pb2, replication_pb2
from tests.replication.conftest import Pair
from tests.replication.test_cycles import header, make_disk, plan_for

MiB = 1 << 20


@pytest.fixture
def service(pair: Pair, tmp_path: Path) -> Iterator[ReplicationService]:
    """The replica host's replication service (not started: commands only), over a directory
    backend."""
    svc = ReplicationService(
        home=pair.replica_home,
        config=config_mod.load(pair.replica_home),
        backend=DirectoryBackend(tmp_path / "vms"),
        identity=lambda: pair.replica,
        clock=SYSTEM_CLOCK,
    )
    yield svc
    svc.state.close()


def run(service: ReplicationService, **fields: object) -> control_pb2.GuestRunResult:
    cmd = control_pb2.GuestRun(**{"relationship_id": "rel-1", "timeout_seconds": 10, **fields})  # type: ignore[arg-type]
    return asyncio.run(service.guest_run(cmd))


def test_a_test_failover_is_proven_and_only_its_vm_is_a_guest_target(
    pair: Pair, service: ReplicationService, tmp_path: Path
) -> None:
    src = tmp_path / "src.vhdx"
    make_disk(src, 4 * MiB)
    pair.grant("rel-1", "vm-1")
    with pair.client() as client:
        client.send_cycle(
            header("rel-1", "vm-1", 1, replication_pb2.INITIAL),
            plan_for(src, "os", replication_pb2.INITIAL),
            compress=True,
        )
    with pytest.raises(FailedPrecondition, match="no test failover of rel-1 is in place"):
        run(service, program="/bin/true")

    failover = control_pb2.Failover(
        relationship_id="rel-1",
        epoch=1,
        test=True,
        prove_exact=True,
        start_vm=True,
        vm=common_pb2.VirtualMachine(id="vm-1", name="web01", cpu_count=1, memory_mb=256),
    )
    result = asyncio.run(service.failover(failover))
    assert result.exact.checked and result.exact.mismatched_blocks == 0
    assert (result.exact.blocks_compared, result.exact.bytes_compared) == (4, 4 * MiB)
    assert result.started and service.backend.vm_state("web01-test") == "running"
    # The service answers a repeated command from the record.
    assert asyncio.run(service.failover(failover)) == result

    # The test VM is found, and the directory backend says it has no guest.
    with pytest.raises(FailedPrecondition, match="web01-test is a directory-backend VM"):
        run(service, program="/bin/true")
    # A relationship this host holds no replica of names no VM here.
    with pytest.raises(NotFound, match="no replication grant for relationship rel-2"):
        run(service, relationship_id="rel-2", program="/bin/true")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"relationship_id": "../rel"}, "relationship id"),
        ({"relationship_id": ""}, "relationship id"),
        ({"program": ""}, "1 to 1024 characters"),
        ({"program": "/" + "x" * 1024}, "1 to 1024 characters"),
        ({"program": "sh"}, "absolute path"),
        ({"program": "./sh"}, "absolute path"),
        ({"program": "/bin/sh\x00-x"}, "without control characters"),
        ({"program": "/bin/sh\n"}, "without control characters"),
        ({"args": ["x"] * 65}, "65 arguments"),
        ({"args": ["x" * 4097]}, "argument 0 .* over 4096"),
        ({"args": ["ok", "a\x00b"]}, "argument 1 .* NUL"),
        ({"args": ["x" * 4096] * 17}, "over 65536 characters"),
        ({"timeout_seconds": 0}, "1 to 3600 seconds, not 0"),
        ({"timeout_seconds": 3601}, "1 to 3600 seconds, not 3601"),
    ],
)
def test_every_field_is_checked_on_arrival(fields: dict[str, object], problem: str) -> None:
    cmd = control_pb2.GuestRun(
        relationship_id="rel-1", program="/bin/sh", args=["-c", "true"], timeout_seconds=60
    )
    for name, value in fields.items():
        if name == "args":
            del cmd.args[:]
            cmd.args.extend(value)  # type: ignore[arg-type]
        else:
            setattr(cmd, name, value)
    with pytest.raises(InvalidArgument, match=problem):
        guest.check_guest_run(cmd)


def test_accepted_requests() -> None:
    for program in ("/bin/sh", r"C:\Windows\System32\cmd.exe", "c:/tools/check.exe"):
        request = guest.check_guest_run(
            control_pb2.GuestRun(
                relationship_id="rel-1",
                program=program,
                args=["x" * 4096] * 16,
                timeout_seconds=3600,
            )
        )
        assert (request.program, len(request.args), request.timeout) == (program, 16, 3600)


def test_the_hyperv_backend_refuses_and_names_the_future_way(tmp_path: Path) -> None:
    """Exercised on Windows only for real; FakeHyperVApi stands in for Hyper-V here."""
    from agent.hosts.hyperv import HyperVBackend
    from tests.hosts.fake_hyperv import FakeHyperVApi

    hv = FakeHyperVApi(tmp_path / "host")
    made = hv.add_vm("web01-test", [("scsi0-0", "vhdx", MiB)])
    backend = HyperVBackend(tmp_path / "agent", hv)
    with pytest.raises(FailedPrecondition, match=r"PowerShell Direct, Invoke-Command -VMName"):
        backend.guest_run(made.id, "/bin/sh", [], 10)
