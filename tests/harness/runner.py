"""Run one scenario: build the network and the cluster, run it, check, tear down, report."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from tests.harness.cluster import Cluster, LoopbackNetwork, Network
from tests.harness.report import ScenarioReport
from tests.harness.scenarios import SCENARIOS, SITES, Run


def make_network(mode: str, run_id: str) -> Network:
    if mode == "loopback":
        return LoopbackNetwork()
    from tests.harness.network import harness_network  # namespaces: needs root and iproute2

    return harness_network(run_id)  # type: ignore[no-any-return]


def run_scenario(
    name: str,
    *,
    mode: str = "loopback",
    seed: int = 1,
    work: Path | None = None,
    soak: float = 0.0,
    kills: int = 0,
) -> ScenarioReport:
    report = ScenarioReport(name=name, mode=mode, seed=seed)
    root = Path(tempfile.mkdtemp(prefix=f"sitepair-{name}-", dir=work))
    started = time.monotonic()
    net: Network | None = None
    cluster: Cluster | None = None
    try:
        net = make_network(mode, f"{seed}{int(time.time()) % 10000}")
        cluster = Cluster(root, sites=SITES.get(name, {"a": 1, "b": 1}), network=net)
        cluster.start_broker()
        cluster.add_agents()
        run = Run(cluster, report, root, seed, random.Random(seed), soak=soak, kills=kills)
        try:
            SCENARIOS[name](run)
        finally:
            for vm in list(run.writers):
                run.stop_writer(vm)
        run.check_invariants()
        report.faults += cluster.faults
        bytes_moved = getattr(net, "bytes_moved", None)
        if bytes_moved is not None:
            report.bytes_moved = int(bytes_moved())
        report.passed = not report.errors
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
        report.details["traceback"] = traceback.format_exc()[-4000:]
        report.passed = False
    finally:
        if cluster is not None:
            cluster.stop()
        close = getattr(net, "close", None)
        if close is not None:
            close()
        report.seconds = time.monotonic() - started
        if report.passed and work is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            report.details["work folder"] = str(root)
    return report
