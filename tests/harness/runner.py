"""Run one scenario: build the network and the cluster, run it, check, tear down, report."""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from broker.config import StoreConfig
from tests.harness import guest_scenarios
from tests.harness.cluster import Cluster
from tests.harness.network import PROFILES, Network, small_filesystem_unavailable
from tests.harness.report import ScenarioReport
from tests.harness.scenarios import SCENARIOS, SITES, SMALL_STORAGE, Run
from tests.support import postgres


def run_scenario(
    name: str,
    *,
    mode: str = "loopback",
    seed: int = 1,
    work: Path | None = None,
    soak: float = 0.0,
    kills: int = 0,
    profile: str = "lan",
    store: str = "sqlite",
    backend: str = "directory",
) -> ScenarioReport:
    """Run scenario ``name`` on a fresh deployment; ``profile`` is the inter-site link's WAN
    profile for the whole run (scenarios that reshape the link put it back afterwards);
    ``store`` is the broker's: its embedded SQLite, or a throwaway PostgreSQL server that the
    run starts and removes; ``backend`` is the hosts': ``directory`` (VM folders and the
    harness's writer) or ``qemu`` (QEMU under TCG, each VM the real test guest:
    tests/harness/guest_scenarios.py)."""
    report = ScenarioReport(
        name=name, mode=mode, seed=seed, profile=profile, store=store, backend=backend
    )
    scenarios, sites = SCENARIOS, SITES
    if backend == "qemu":
        why = guest_scenarios.unavailable_reason(name)
        if why:
            report.skipped = why
            return report
        scenarios, sites = guest_scenarios.SCENARIOS, guest_scenarios.SITES
    if store == "postgresql":
        reason = postgres.unavailable_reason()
        if reason:
            report.skipped = f"needs PostgreSQL: {reason}"
            return report
    if name in SMALL_STORAGE:
        reason = small_filesystem_unavailable()
        if reason:
            report.skipped = f"needs a small filesystem: {reason}"
            return report
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"sitepair-{name}-", dir=work))
    started = time.monotonic()
    stack = contextlib.ExitStack()
    net: Network | None = None
    cluster: Cluster | None = None
    try:
        net = stack.enter_context(
            Network.create(
                mode,  # type: ignore[arg-type]
                run_id=f"{seed}{int(time.time()) % 10000}",
                seed=seed,
                profile=PROFILES[profile],
            )
        )
        store_config: StoreConfig | None = None
        env: dict[str, str] = {}
        server: postgres.PostgresCluster | None = None
        if store == "postgresql":
            server, store_config, env = _postgres(stack)
        cluster = Cluster(
            root,
            sites=sites.get(name, {"a": 1, "b": 1}),
            network=net,
            small_storage=SMALL_STORAGE.get(name),
            store=store_config,
            env=env,
            backend=backend,
        )
        cluster.start_broker()
        cluster.add_agents()
        run = Run(cluster, report, root, seed, random.Random(seed), soak=soak, kills=kills)
        try:
            scenarios[name](run)
        finally:
            for vm in list(run.writers):
                run.stop_writer(vm)
        run.check_invariants()
        if server is not None:
            # The broker really kept its state there, and its home has no SQLite store.
            rows = server.admin_query("SELECT count(*) FROM jobs", "harness")
            jobs = int(str(rows[0][0]))
            sqlite = cluster.home is not None and (cluster.home.root / "broker.db").exists()
            report.check(
                "the broker's jobs are in PostgreSQL",
                jobs > 0 and not sqlite,
                f"{jobs} jobs in the database; broker.db in the home: {sqlite}",
            )
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
        stack.close()  # the network: proxies, processes left in it, namespaces
        report.seconds = time.monotonic() - started
        if report.passed and work is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            report.details["work folder"] = str(root)
    return report


def _postgres(
    stack: contextlib.ExitStack,
) -> tuple[postgres.PostgresCluster, StoreConfig, dict[str, str]]:
    """A throwaway PostgreSQL server for this run's broker (removed when ``stack`` closes),
    reached over its Unix socket so a broker inside a network namespace reaches it too."""
    binaries = postgres.bin_dir()
    assert binaries is not None  # unavailable_reason() said so
    server = postgres.PostgresCluster(binaries)
    stack.callback(server.stop)
    server.start()
    server.admin_sql(f"CREATE DATABASE harness OWNER {postgres.ROLE}")
    store = StoreConfig(backend="postgresql", dsn=server.socket_dsn("harness"))
    return server, store, {"SITEPAIR_DB_PASSWORD": postgres.PASSWORD}
