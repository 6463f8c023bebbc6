#!/usr/bin/env python3
"""Control-plane benchmark: N simulated agents heartbeating to one broker process.

The broker is the real one (``python -m broker.cli serve --home ...``) in its own process, with
``[heartbeat] interval = "1s"`` in its broker.toml. The agents are simulated, in a few separate
processes with grpc.aio, but speak the real protocol over real mutual TLS: each was enrolled
through the real enrollment port with one multi-use registration key (``agent.enroll.register``,
in parallel), and each holds its own connection and control stream: Hello, Welcome (whose
heartbeat interval it then uses), its inventory, then a Heartbeat with host metrics every
interval (on a drift-free schedule).

For N = 100, 500, 2000 (a fresh broker process for each, on the same store), once every agent is
connected and a warm-up has passed, it measures over a steady window:

* **heartbeat-to-store latency**: a reader watches the broker's SQLite store (``PRAGMA
  data_version`` every 5 ms; on every commit it reads ``servers``) and notes, for every new
  ``last_heartbeat_seq``, when it first became visible; the latency is that moment minus the
  agent's ``last_heartbeat_sent_at`` (same machine, same clock). This is what an operator or
  the liveness monitor sees. ``last_heartbeat_at`` alone would not do: the broker sets it when
  it *receives* the heartbeat, before the batched write, so ``last_heartbeat_at -
  last_heartbeat_sent_at`` leaves out the batching window and the commit; it is shown too, as
  the "received" latency. The resolution is the 5 ms poll. A heartbeat overwritten by the next
  one of the same agent before it was stored (the writer keeps the latest per server) counts as
  **coalesced**: a sign the broker is more than an interval behind;
* **broker CPU** (psutil on the broker's pid: user + system time over the window, in percent of
  one core) and its **RSS** at the end of the window.

``--quick`` runs N = 20, 50 with short windows (a smoke test); ``--json FILE`` writes every
number.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    load_average,
    machine_facts,
    percentile,
    table,
    wait_for_quiet,
    write_json,
)

#: Simulated-agent processes (each runs its share of the agents on one grpc.aio event loop).
SIM_PROCESSES = 4
#: New control streams per second while ramping up (all processes together).
CONNECT_RATE = 200.0
#: The most uses the broker allows on one registration key.
MAX_KEY_USES = 1000
#: How often the store watcher checks for a new commit.
POLL = 0.005


# =============================================================================================
# Simulated agents (child processes)
# =============================================================================================
def _enroll_share(credentials: Path, homes: list[str]) -> int:
    """Register agents (real ``agent.enroll.register``), 8 at a time in this process."""
    from agent import config as config_mod
    from agent.enroll import register
    from agent.identity import IdentityFiles

    toml = config_mod.render(vm_root="vms", certificate_port=0, ticket_port=0)

    def one(home: str) -> None:
        if IdentityFiles(Path(home)).info.exists():
            return
        register(credentials, name=Path(home).name, home=Path(home), agent_toml=toml, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, homes))
    return len(homes)


async def _simulate(homes: list[str], rate: float, max_seconds: float) -> dict[str, Any]:
    import grpc
    import grpc.aio

    from agent.control import EOF, inventory_to_proto
    from agent.facts import host_facts
    from agent.hosts.base import HostInventory
    from agent.identity import AgentIdentity
    from agent.metrics import sample
    from sitepair import PROTOCOL_VERSION, __version__, pki
    from sitepair.protoconv import timestamp
    from sitepair.rpc import channel_options
    from sitepair.v1 import control_pb2, control_pb2_grpc

    facts = host_facts(backend="directory")
    metrics = sample([Path(homes[0])])
    stats = {"connected": 0, "heartbeats": 0, "failures": 0, "goodbyes": 0, "intervals": set()}
    stop = asyncio.Event()

    async def agent(home: str, delay: float) -> None:
        await asyncio.sleep(delay)
        ident = AgentIdentity.load(Path(home))
        inventory = inventory_to_proto(HostInventory(), time.time())
        while not stop.is_set():
            try:
                async with grpc.aio.secure_channel(
                    ident.control_addresses[0],
                    ident.channel_credentials(),
                    options=channel_options(target_name=pki.BROKER_DNS_NAME),
                ) as channel:
                    call: Any = control_pb2_grpc.ControlStub(channel).Connect()  # type: ignore[call-arg]
                    await call.write(
                        control_pb2.AgentMessage(
                            hello=control_pb2.Hello(
                                facts=facts,
                                agent_version=__version__,
                                protocol_version=PROTOCOL_VERSION,
                            )
                        )
                    )
                    first = await call.read()
                    if first is EOF or first.WhichOneof("body") != "welcome":
                        raise RuntimeError("no Welcome")
                    interval = first.welcome.heartbeat_interval_ms / 1000
                    stats["intervals"].add(interval)
                    stats["connected"] += 1
                    await call.write(control_pb2.AgentMessage(inventory=inventory))

                    async def reader(call: Any = call) -> None:
                        while True:
                            msg = await call.read()
                            if msg is EOF:
                                return
                            if msg.WhichOneof("body") == "goodbye":
                                stats["goodbyes"] += 1

                    read_task = asyncio.create_task(reader())
                    loop = asyncio.get_running_loop()
                    seq = 0
                    next_at = loop.time()
                    try:
                        while not stop.is_set() and not read_task.done():
                            seq += 1
                            await call.write(
                                control_pb2.AgentMessage(
                                    heartbeat=control_pb2.Heartbeat(
                                        seq=seq,
                                        sent_at=timestamp(time.time()),
                                        metrics=metrics,
                                        inventory_digest=inventory.digest,
                                    )
                                )
                            )
                            stats["heartbeats"] += 1
                            next_at += interval
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(
                                    stop.wait(), timeout=max(0.0, next_at - loop.time())
                                )
                    finally:
                        read_task.cancel()
                        call.cancel()
                    stats["connected"] -= 1
            except (grpc.aio.AioRpcError, RuntimeError, OSError):
                stats["failures"] += 1
                await asyncio.sleep(0.5 + random.random())

    async def watch_stdin() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    tasks = [asyncio.create_task(agent(h, i / rate)) for i, h in enumerate(homes)]
    watcher = asyncio.create_task(watch_stdin())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    watcher.cancel()
    stats["intervals"] = sorted(stats["intervals"])
    return stats


# =============================================================================================
# The store watcher
# =============================================================================================
class StoreWatcher:
    """Notes when each agent's new heartbeat becomes visible in the broker's store."""

    def __init__(self, database: Path) -> None:
        self.db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout=5000")
        self.last: dict[str, int] = {}
        self.recording = False
        self.stored: list[float] = []
        self.received: list[float] = []
        self.coalesced = 0
        self.commits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        version = None
        while not self._stop.is_set():
            seen = time.time()
            v = self.db.execute("PRAGMA data_version").fetchone()[0]
            if v != version:
                version = v
                self.commits += self.recording
                rows = self.db.execute(
                    "SELECT id, last_heartbeat_seq, last_heartbeat_sent_at, last_heartbeat_at "
                    "FROM servers WHERE last_heartbeat_seq IS NOT NULL"
                ).fetchall()
                for sid, seq, sent, received in rows:
                    before = self.last.get(sid)
                    if before == seq:
                        continue
                    self.last[sid] = seq
                    if before is None or seq < before:
                        continue  # first sight, or a new stream (sequence starts over)
                    if self.recording:
                        self.stored.append(seen - sent)
                        self.received.append(received - sent)
                        self.coalesced += seq - before - 1
            time.sleep(POLL)

    def connected(self) -> int:
        n: int = self.db.execute("SELECT count(*) FROM servers WHERE connected = 1").fetchone()[0]
        return n

    def reset(self) -> None:
        self.stored, self.received, self.coalesced, self.commits = [], [], 0, 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.db.close()


# =============================================================================================
# The orchestrator
# =============================================================================================
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def enroll(keys: list[tuple[Path, list[Path]]]) -> float:
    """Register every agent, each key's agents shared among a few processes, all at once."""
    start = time.perf_counter()
    per_key = max(1, SIM_PROCESSES // len(keys))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--enroll-worker", str(credentials), *share],
            env=_env(),
        )
        for credentials, homes in keys
        for share in _split([str(h) for h in homes], per_key)
    ]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("enrollment failed")
    return time.perf_counter() - start


def run_phase(
    home: Any, homes: list[Path], n: int, *, warmup: float, window: float, folder: Path
) -> dict[str, Any]:
    import psutil

    from tests.support.brokers import BrokerProcess

    broker = BrokerProcess(home, log_path=folder / f"broker-{n}.out")
    broker.start()
    broker.pin_ports()  # identities name the first run's control address
    assert broker.proc is not None
    bproc = psutil.Process(broker.proc.pid)
    watcher = StoreWatcher(home.database)
    sims = []
    sim_log = (folder / f"sims-{n}.log").open("ab")
    try:
        shares = _split([str(h) for h in homes[:n]], SIM_PROCESSES)
        for share in shares:
            sims.append(
                subprocess.Popen(
                    [sys.executable, __file__, f"--rate={CONNECT_RATE / len(shares)}",
                     f"--max-seconds={warmup + window + n / CONNECT_RATE + 120}",
                     "--sim-worker", *share],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=sim_log,
                    env=_env(),
                    text=True,
                )
            )  # fmt: skip
        ramp_start = time.monotonic()
        deadline = ramp_start + n / CONNECT_RATE + 120
        while watcher.connected() < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in sims):
                raise RuntimeError(f"only {watcher.connected()} of {n} agents connected")
            time.sleep(0.2)
        ramp = time.monotonic() - ramp_start
        time.sleep(warmup)
        sim_ps = [psutil.Process(p.pid) for p in sims]
        cpu0 = bproc.cpu_times()
        sim0 = sum(sum(p.cpu_times()[:2]) for p in sim_ps)
        watcher.reset()
        watcher.recording = True
        t0 = time.monotonic()
        time.sleep(window)
        watcher.recording = False
        elapsed = time.monotonic() - t0
        cpu1 = bproc.cpu_times()
        sim1 = sum(sum(p.cpu_times()[:2]) for p in sim_ps)
        rss = bproc.memory_info().rss
        connected_end = watcher.connected()
        load = load_average()
    finally:
        sim_stats = []
        for p in sims:
            assert p.stdin is not None
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in sims:
            try:
                assert p.stdout is not None
                out = p.stdout.read()
                p.wait(60)
                sim_stats.append(json.loads(out.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                print(f"a simulated-agent process failed: {exc!r}", file=sys.stderr)
                p.kill()
        watcher.close()
        broker.stop()
        sim_log.close()
    stored = sorted(watcher.stored)
    received = sorted(watcher.received)
    broker_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed * 100
    return {
        "agents": n,
        "ramp_seconds": ramp,
        "window_seconds": elapsed,
        "stored_per_second": len(stored) / elapsed,
        "expected_per_second": n / min(s["intervals"][0] for s in sim_stats if s["intervals"]),
        "intervals": sorted({i for s in sim_stats for i in s["intervals"]}),
        "stored_ms": _percentiles(stored),
        "received_ms": _percentiles(received),
        "coalesced": watcher.coalesced,
        "commits_per_second": watcher.commits / elapsed,
        "broker_cpu_percent": broker_cpu,
        "broker_rss_bytes": rss,
        "sim_cpu_percent": (sim1 - sim0) / elapsed * 100,
        "connected_at_end": connected_end,
        "reconnects": sum(s["failures"] for s in sim_stats),
        "load_1m": load,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": percentile(values, 50) * 1000,
        "p95": percentile(values, 95) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": (values[-1] * 1000) if values else float("nan"),
    }


def report(doc: dict[str, Any]) -> str:
    f = doc["facts"]
    rows = []
    for r in doc["phases"]:
        s, rc = r["stored_ms"], r["received_ms"]
        rows.append(
            [
                f"{r['agents']}",
                f"{r['stored_per_second']:,.0f} / {r['expected_per_second']:,.0f}",
                f"{s['p50']:.0f} / {s['p95']:.0f} / {s['p99']:.0f} / {s['max']:.0f} ms",
                f"{rc['p50']:.0f} / {rc['p95']:.0f} / {rc['p99']:.0f} ms",
                f"{r['coalesced']}",
                f"{r['broker_cpu_percent']:.0f} %",
                f"{r['broker_rss_bytes'] / 2**20:.0f} MiB",
                f"{r['sim_cpu_percent']:.0f} %",
                f"{r['load_1m']:.2f}",
            ]
        )
    header = [
        "agents",
        "heartbeats stored/s (of expected)",
        "heartbeat-to-store p50 / p95 / p99 / max",
        "received p50 / p95 / p99",
        "coalesced",
        "broker CPU (of one core)",
        "broker RSS",
        "simulated agents' CPU",
        "load (1 min)",
    ]
    return "\n".join(
        [
            f"Measured {f['date']} on {f['cpus']} CPUs ({f['cpu']}), Python {f['python']}, "
            f"grpcio {f['grpcio']}; heartbeat interval {doc['interval']} s (from the broker's "
            f"Welcome); {doc['window']:.0f} s steady window after a {doc['warmup']:.0f} s "
            f"warm-up; {SIM_PROCESSES} simulated-agent processes on the same 2 cores as the "
            f"broker; {doc['enrolled']} agents enrolled in parallel in "
            f"{doc['enroll_seconds']:.1f} s; 1-min load {f['load_1m_at_start']:.2f} at start (the "
            "load column is measured during each window and includes this benchmark's own "
            "processes).",
            "",
            table(header, rows),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, 50, short windows")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--agents", type=int, nargs="*", help="N values (default 100 500 2000)")
    parser.add_argument("--window", type=float, default=30.0, help="steady window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait for a 1-min load below this first"
    )
    parser.add_argument("--enroll-worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sim-worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=CONNECT_RATE, help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.enroll_worker:
        _enroll_share(Path(args.enroll_worker[0]), args.enroll_worker[1:])
        return 0
    if args.sim_worker:
        stats = asyncio.run(_simulate(args.sim_worker, args.rate, args.max_seconds))
        print(json.dumps(stats), flush=True)
        return 0

    from broker.home import BrokerHome
    from tests.support.brokers import BrokerProcess, create_key, make_home

    counts = args.agents or ([20, 50] if args.quick else [100, 500, 2000])
    warmup, window = (2.0, 4.0) if args.quick else (args.warmup, args.window)
    if not args.quick:
        wait_for_quiet(args.max_load, 600)
    facts = machine_facts()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="control-bench-", dir="/var/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if (folder / "broker" / "broker.toml").exists():  # --dir of an earlier run: reuse
            home = BrokerHome(folder / "broker")
        else:
            home = make_home(folder / "broker", heartbeat="1s", log_file=folder / "broker.log")
        broker = BrokerProcess(home, log_path=folder / "broker-enroll.out")
        broker.start()
        try:
            broker.pin_ports()
            homes = [folder / "agents" / f"sim-{i:05d}" for i in range(max(counts))]
            keys = []
            with contextlib.closing(broker.admin()) as admin:
                for k in range(0, len(homes), MAX_KEY_USES):
                    creds = folder / f"fleet-{k // MAX_KEY_USES}.json"
                    group = homes[k : k + MAX_KEY_USES]
                    create_key(admin, creds, site="site-a", uses=len(group))
                    keys.append((creds, group))
            print(f"enrolling {len(homes)} agents ...", file=sys.stderr)
            enroll_seconds = enroll(keys)
        finally:
            broker.stop()
        doc: dict[str, Any] = {
            "facts": facts,
            "interval": 1.0,
            "warmup": warmup,
            "window": window,
            "enrolled": len(homes),
            "enroll_seconds": enroll_seconds,
            "phases": [],
        }
        for n in counts:
            print(f"N = {n} ...", file=sys.stderr)
            phase = run_phase(home, homes, n, warmup=warmup, window=window, folder=folder)
            print(json.dumps(phase), file=sys.stderr)
            doc["phases"].append(phase)
        doc["interval"] = doc["phases"][0]["intervals"][0] if doc["phases"] else 1.0
        doc["command"] = "bench/control_plane.py " + " ".join(sys.argv[1:])
        print(report(doc))
        write_json(args.json, doc)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
