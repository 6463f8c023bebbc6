"""SIGKILL of the sender or the receiver at random moments of initial and delta cycles.

After every kill the replica must be exactly a committed point (the state before the cycle or
the state after it, never a mix), and replication must resume and finish. SITEPAIR_KILLS sets the
number of kills of each side (10 by default: 20 in the default run; more for a soak).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.hosts.directory import DirectoryBackend
from agent.replication.engine import SourceRelationship
from agent.replication.replica import ReplicaStore
from agent.replication.state import SenderState, SourceConfig
from sitepair import vdisk
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import SitepairError
from tests.replication.conftest import Pair
from tests.support.brokers import python_env

MiB = 1 << 20
KILLS = int(os.environ.get("SITEPAIR_KILLS", "10"))
SIZE = 24 * MiB
RATE = 8 * MiB  # bytes per second: cycles last over a second, so kills land inside them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReceiverProcess:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port_file = self.home / "receiver.port"
        port_file.unlink(missing_ok=True)
        log = (self.home / "receiver.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.replication.procs",
                "receiver",
                str(self.home),
                str(port_file),
                str(self.port),
            ],
            env=python_env(),
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert self.proc.poll() is None, (self.home / "receiver.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def digest_of(models: dict[str, bytearray]) -> dict[str, str]:
    return {d: hashlib.sha256(m).hexdigest() for d, m in models.items()}


def replica_digest(root: Path) -> tuple[int, dict[str, str]]:
    store = ReplicaStore.open(root)  # recover(): what a restarted receiver would do first
    out = {}
    for disk in store.state.disks:
        with vdisk.open_disk(store.latest_chain(disk), read_only=True) as d:
            out[disk] = hashlib.sha256(d.read(0, d.virtual_size)).hexdigest()
    return store.state.committed_sequence, out


def change(
    backend: DirectoryBackend,
    vm: str,
    models: dict[str, bytearray],
    rng: random.Random,
    nbytes: int,
) -> None:
    with backend.open_writer(vm) as w:
        left = nbytes
        while left > 0:
            disk = rng.choice(sorted(models))
            n = min(left, rng.choice([65536, 256 * 1024, MiB]))
            off = rng.randrange(0, len(models[disk]) - n)
            data = rng.randbytes(n)
            w.write(disk, off, data)
            models[disk][off : off + n] = data
            left -= n
        w.flush()


@pytest.fixture
def setup(pair: Pair, tmp_path: Path):  # type: ignore[no-untyped-def]
    pair.receiver.stop(1)  # the kill tests run the receiver as a process
    backend = DirectoryBackend(pair.primary_home / "vms")
    spec = backend.create_vm("kill01", disks=[("os", "vhdx", SIZE), ("data", "vhd", SIZE)])
    grant = pair.grant("rel-k", spec.id)
    port = free_port()
    config = SourceConfig(
        relationship="rel-k",
        vm_id=spec.id,
        replica_host=pair.replica.host_id,
        address=f"127.0.0.1:{port}",
        epoch=1,
        bandwidth_limit=RATE,
    )
    pair.state.put_source(config, SenderState(tracker="changelog"))
    # The sender process reads its source config from the primary's own state database.
    from agent.replication.state import ReplicationState

    primary_state = ReplicationState(pair.primary_home / "state" / "replication.db")
    primary_state.put_source(config, SenderState(tracker="changelog"))
    primary_state.close()
    receiver = ReceiverProcess(pair.replica_home, port)
    receiver.start()
    yield pair, backend, spec.id, config, receiver, Path(grant.folder), tmp_path
    receiver.stop()


@pytest.mark.slow  # about 30 s each: in make test-slow, which CI runs too
def test_receiver_killed_at_random_moments(setup) -> None:  # type: ignore[no-untyped-def]
    pair, backend, vm, config, receiver, root, tmp_path = setup
    rng = random.Random(1234)
    models = {"os": bytearray(SIZE), "data": bytearray(SIZE)}
    rel = SourceRelationship(
        config,
        backend=backend,
        state=pair.state,
        identity=lambda: pair.primary,
        clock=SYSTEM_CLOCK,
        work_dir=tmp_path / "work",
    )
    prev = digest_of(models)
    kills = mid_cycle = 0
    for round_ in range(KILLS):
        change(backend, vm, models, rng, (16 if round_ == 0 else 10) * MiB)
        cur = digest_of(models)
        done = threading.Event()
        errors: list[BaseException] = []

        def run(done: threading.Event = done, errors: list[BaseException] = errors) -> None:
            while not done.is_set():
                try:
                    rel.run_cycle()
                    done.set()
                except SitepairError:
                    time.sleep(0.2)  # the receiver is down: retry, as the runner does
                except BaseException as exc:
                    errors.append(exc)
                    done.set()

        t = threading.Thread(target=run)
        t.start()
        time.sleep(rng.uniform(0.05, 1.2))
        receiver.kill()
        kills += 1
        seq, got = replica_digest(root)
        assert got in ({}, prev, cur) if seq == 0 else got in (prev, cur), (
            f"round {round_}: replica is a mix"
        )
        mid_cycle += got != cur
        receiver.start()
        assert done.wait(120), "replication did not resume after the receiver came back"
        t.join()
        assert not errors, errors
        receiver.kill()  # quiesce to read the store, then serve again
        _, got = replica_digest(root)
        assert got == cur, f"round {round_}: replica differs after resuming"
        receiver.start()
        prev = cur
    assert kills == KILLS
    # The throttle makes cycles last over a second, so most kills land inside one.
    assert mid_cycle >= KILLS // 4, f"only {mid_cycle} of {KILLS} kills hit a cycle in flight"


@pytest.mark.slow
def test_sender_killed_at_random_moments(setup) -> None:  # type: ignore[no-untyped-def]
    pair, backend, vm, _config, receiver, root, tmp_path = setup
    rng = random.Random(99)
    models = {"os": bytearray(SIZE), "data": bytearray(SIZE)}
    prev = digest_of(models)
    mid_cycle = 0
    argv = [
        sys.executable,
        "-m",
        "tests.replication.procs",
        "sender",
        str(pair.primary_home),
        str(pair.primary_home / "vms"),
        "rel-k",
        str(tmp_path / "work"),
    ]
    for round_ in range(KILLS):
        change(backend, vm, models, rng, (16 if round_ == 0 else 10) * MiB)
        cur = digest_of(models)
        proc = subprocess.Popen(
            argv, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(rng.uniform(0.4, 1.9))  # the process needs ~0.4 s to start
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        receiver.kill()
        seq, got = replica_digest(root)
        assert got in ({}, prev, cur) if seq == 0 else got in (prev, cur), (
            f"round {round_}: replica is a mix"
        )
        mid_cycle += got != cur
        receiver.start()
        finish = subprocess.run(argv, env=python_env(), capture_output=True, text=True, timeout=120)
        assert finish.returncode == 0, finish.stderr[-3000:]
        receiver.kill()
        _, got = replica_digest(root)
        assert got == cur, f"round {round_}: replica differs after the sender resumed"
        receiver.start()
        prev = cur
    assert mid_cycle >= KILLS // 4, f"only {mid_cycle} of {KILLS} kills hit a cycle in flight"
