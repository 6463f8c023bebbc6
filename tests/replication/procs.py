"""Child processes for the kill tests: a replica receiver and a one-cycle sender.

python -m tests.replication.procs receiver HOME PORT_FILE [PORT]
    (SITEPAIR_TEST_LIMITS='{"workers": 8, ...}' overrides the receiver's Limits; the port file
    gets the certificate port, and PORT_FILE.json both ports)
python -m tests.replication.procs sender HOME VM_ROOT RELATIONSHIP WORK_DIR
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
from pathlib import Path

from agent.hosts.directory import DirectoryBackend
from agent.identity import AgentIdentity
from agent.replication.engine import SourceRelationship
from agent.replication.receiver import Limits, ReceiverServer, ReplicaRegistry
from agent.replication.state import ReplicationState
from sitepair.clock import SYSTEM_CLOCK


def receiver(home: Path, port_file: Path, port: int) -> int:
    faulthandler.register(signal.SIGUSR1)  # a test that finds the receiver stuck can dump it
    ident = AgentIdentity.load(home)
    state = ReplicationState(home / "state" / "replication.db")
    registry = ReplicaRegistry(state, SYSTEM_CLOCK)

    def on_commit(grant, store, header):  # type: ignore[no-untyped-def]
        store.maybe_seal(
            max_points=grant.recovery_points,
            interval=grant.point_interval,
            app_consistent=header.app_consistent,
        )

    limits = Limits(**json.loads(os.environ.get("SITEPAIR_TEST_LIMITS", "{}")))
    server = ReceiverServer(
        registry=registry, identity=lambda: ident, on_commit=on_commit, limits=limits
    )
    ports = server.start(host="127.0.0.1", certificate_port=port, ticket_port=0)
    Path(f"{port_file}.json").write_text(json.dumps(ports))
    port_file.write_text(str(ports["certificate"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1)
    return 0


def sender(home: Path, vm_root: Path, relationship: str, work_dir: Path) -> int:
    ident = AgentIdentity.load(home)
    state = ReplicationState(home / "state" / "replication.db")
    found = state.source(relationship)
    assert found is not None
    config, sender = found
    rel = SourceRelationship(
        config,
        backend=DirectoryBackend(vm_root),
        state=state,
        identity=lambda: ident,
        clock=SYSTEM_CLOCK,
        work_dir=work_dir,
        tracker=sender.tracker,
    )
    rel.run_cycle()
    return 0


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "receiver":
        sys.exit(
            receiver(
                Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0
            )
        )
    sys.exit(sender(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5])))
