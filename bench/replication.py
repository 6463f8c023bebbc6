#!/usr/bin/env python3
"""Replication benchmark: our cycles against rsync and a bare gRPC stream, on the same bytes.

Everything on our side is the real code: two agents enrolled through a real broker, the
directory host backend (``create_vm``, ``open_writer``, ``take_cut``), the source engine
(``SourceRelationship.run_cycle`` -> ``ReplicaClient.send_cycle``) in one process and the
replica's ``ReceiverServer`` in another (each agent has its own process, as on two hosts; both
on this machine's two cores). The peers, run alternately with ours, 3 rounds, medians:

1. **Initial replication** of a 2 GiB VHDX of disk-like data (64 KiB blocks: 20 % zeros, 40 %
   random, 40 % text; seed 42), against ``rsync --whole-file`` of the same bytes as a raw file
   through an rsync daemon on 127.0.0.1 (no encryption, no compression), and against a bare
   mutual-TLS gRPC stream of the same bytes in pre-serialised 1 MiB messages (read from the raw
   file, no processing: the ceiling of what gRPC moves here). Variants: 8084 (mTLS) and 8083
   (ticket), compression on and off, glibc's default malloc against MALLOC_MMAP_THRESHOLD_ /
   MALLOC_TRIM_THRESHOLD_, and a zero-heavy disk.
2. **Delta cycle** on a 4 GiB disk with 2 % of its 64 KiB blocks rewritten at random: the change
   log tracker and the scan tracker, against ``rsync --inplace --no-whole-file -I`` of the raw
   images through the daemon; bytes on the wire (the sum of our batches' ``wire_bytes``)
   against rsync's literal data.
3. **Delta cycles of a running guest** (``--parts guest-delta``, not in the default set: it needs
   QEMU and builds tests/support/guest.py's guest): the guest as a qemu-backend VM under TCG,
   writing durable records at a fixed pace, protected (initial cycle, untimed); its own write
   latency (per record, from its console) alone and with a delta cycle every N seconds, in
   alternated windows; then timed delta cycles against rsync of the same cut (the source's base
   images once the cycle released it, which are then exactly the cut, converted to raw by
   ``qemu-img``), each cycle's replica checked byte for byte against that raw image.

The page cache is dropped before every timed run when running as root (the output says so).
``--quick`` is a smoke test (small sizes, one round); ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BLOCK,
    MALLOC_TUNED,
    REPO,
    DiskLikeData,
    GiB,
    MiB,
    can_drop_caches,
    drop_caches,
    load_average,
    machine_facts,
    median,
    percentile,
    rotations,
    table,
    wait_for_quiet,
    write_json,
)

RELATIONSHIP_EPOCH = 1


# =============================================================================================
# Worker processes: one per agent (source, replica) and malloc setting.
# =============================================================================================
def _serve_receiver(home: Path) -> None:
    """The replica agent: ReceiverServer on 8084/8083 (ports 0) plus a bare gRPC sink with the
    same mutual-TLS credentials; prints the ports, then serves until stdin closes."""
    import grpc

    from agent.identity import AgentIdentity
    from agent.replication.receiver import ReceiverServer, ReplicaRegistry
    from agent.replication.state import ReplicationState
    from sitepair.clock import SYSTEM_CLOCK
    from sitepair.rpc import REPLICATION_MAX_MESSAGE, server_options

    ident = AgentIdentity.load(home)
    state = ReplicationState(home / "state" / "replication.db")
    receiver = ReceiverServer(registry=ReplicaRegistry(state, SYSTEM_CLOCK), identity=lambda: ident)
    ports = receiver.start(host="127.0.0.1", certificate_port=0, ticket_port=0)

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = 0
        for message in requests:
            n += len(message)
        return str(n).encode()

    sink = grpc.server(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(4),
        options=server_options(max_message_bytes=REPLICATION_MAX_MESSAGE),
    )
    sink.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)}
            ),
        )
    )
    creds = grpc.ssl_server_credentials(
        [(ident.key_pem, ident.cert_pem)],
        root_certificates=ident.ca_pem,
        require_client_auth=True,
    )
    ports["sink"] = sink.add_secure_port("127.0.0.1:0", creds)
    sink.start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()
    sink.stop(1)
    receiver.stop(1)
    state.close()


def _serve_sender(home: Path) -> None:
    """The source agent: runs one command per line of stdin, answers one JSON line each."""
    import grpc

    from agent.hosts.directory import DirectoryBackend
    from agent.identity import AgentIdentity
    from agent.replication.engine import SourceRelationship
    from agent.replication.state import ReplicationState
    from sitepair import pki, tickets
    from sitepair.clock import SYSTEM_CLOCK
    from sitepair.rpc import REPLICATION_MAX_MESSAGE, channel_options

    ident = AgentIdentity.load(home)
    state = ReplicationState(home / "state" / "replication.db")
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "cycle":
                found = state.source(cmd["relationship"])
                assert found is not None, cmd
                config = found[0]
                provider = None
                if config.auth == "ticket":
                    key = tickets.load_signing_key(Path(cmd["ticket_key"]))

                    def provider(c: Any = config, k: Any = key) -> str:
                        return tickets.issue(
                            k,
                            source_host=ident.host_id,
                            replica_host=c.replica_host,
                            relationship=c.relationship,
                            vm=c.vm_id,
                            epoch=c.epoch,
                            now=SYSTEM_CLOCK.now(),
                        )

                if cmd.get("backend") == "qemu":
                    from _guest import SPANS, timed_qemu_backend

                    backend: Any = timed_qemu_backend(Path(cmd["vm_root"]))
                    SPANS.clear()
                else:
                    backend = DirectoryBackend(Path(cmd["vm_root"]))
                    SPANS = []
                rel = SourceRelationship(
                    config,
                    backend=backend,
                    state=state,
                    identity=lambda: ident,
                    clock=SYSTEM_CLOCK,
                    work_dir=Path(cmd["work_dir"]),
                    ticket_provider=provider,
                    tracker=cmd["tracker"],
                    adaptive_compression=cmd.get("adaptive", True),
                )
                started_at = time.time()
                start = time.perf_counter()
                result = rel.run_cycle()
                wall = time.perf_counter() - start
                assert result is not None
                reply = {
                    "seconds": wall,
                    "spans": [("cycle", started_at, time.time()), *SPANS],
                    "send_seconds": result.seconds,
                    "kind": result.kind,
                    "batches": result.batches,
                    "raw_bytes": result.raw_bytes,
                    "wire_bytes": result.wire_bytes,
                    "zero_blocks": result.zero_blocks,
                    "data_blocks": result.data_blocks,
                    "compressed_batches": result.compressed_batches,
                    "uncompressed_batches": result.uncompressed_batches,
                }
            elif cmd["op"] == "raw":
                channel = grpc.secure_channel(
                    cmd["address"],
                    ident.channel_credentials(),
                    options=channel_options(
                        target_name=pki.agent_dns_name(cmd["replica_host"]),
                        max_message_bytes=REPLICATION_MAX_MESSAGE,
                    ),
                )
                push = channel.stream_unary(
                    "/bench.Sink/Push", request_serializer=None, response_deserializer=None
                )

                def chunks(path: str = cmd["path"]) -> Iterator[bytes]:
                    with Path(path).open("rb", buffering=0) as f:
                        while chunk := f.read(MiB):
                            yield chunk

                start = time.perf_counter()
                got = int(push(chunks()))
                wall = time.perf_counter() - start
                channel.close()
                reply = {"seconds": wall, "wire_bytes": got}
            else:
                reply = {"error": f"unknown op {cmd['op']}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


class Worker:
    """A child process of this script speaking JSON lines."""

    def __init__(self, role: str, home: Path, *, env: dict[str, str], log: Path) -> None:
        self.role = role
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", role, "--home", str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )

    def readline(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} worker died; see {self._log.name}")
        doc: dict[str, Any] = json.loads(line)
        if "error" in doc:
            raise RuntimeError(f"{self.role} worker: {doc['error']}")
        return doc

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def worker_env(malloc: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in MALLOC_TUNED:
        env.pop(k, None)
    if malloc == "tuned":
        env.update(MALLOC_TUNED)
    return env


# =============================================================================================
# rsync daemon
# =============================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RsyncDaemon:
    def __init__(self, folder: Path, module_path: Path) -> None:
        self.port = free_port()
        conf = folder / "rsyncd.conf"
        ids = "uid = 0\ngid = 0\n" if os.geteuid() == 0 else ""
        conf.write_text(f"use chroot = no\n{ids}[bench]\npath = {module_path}\nread only = no\n")
        self.log = folder / "rsyncd.log"
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
             f"--port={self.port}", f"--log-file={self.log}"],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("the rsync daemon did not start")

    def url(self, name: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/bench/{name}"

    def run(self, src: Path | list[Path], name: str, *options: str) -> dict[str, Any]:
        """rsync ``src`` (a file, or several files into the folder ``name``) to the module."""
        sources = [str(p) for p in src] if isinstance(src, list) else [str(src)]
        start = time.perf_counter()
        out = subprocess.run(
            ["rsync", "--stats", *options, *sources, self.url(name)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        wall = time.perf_counter() - start

        def stat(label: str) -> int:
            m = re.search(rf"^{label}: ([\d,]+)", out, re.M)
            return int(m.group(1).replace(",", "")) if m else -1

        return {
            "seconds": wall,
            "literal_bytes": stat("Literal data"),
            "matched_bytes": stat("Matched data"),
            "sent_bytes": stat("Total bytes sent"),
        }

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# =============================================================================================
# The orchestrator
# =============================================================================================
class Bench:
    #: Started by main() once the agents are enrolled.
    rsync: RsyncDaemon

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.rounds = 1 if args.quick else args.rounds
        self.cold = can_drop_caches()
        self.workers: dict[str, Worker] = {}
        self.results: dict[str, Any] = {}
        #: The 1-minute load at the end of each guest latency window, and the cores other
        #: processes used during it, by kind; (start, end) of the guest's pauses for quiet.
        self.window_loads: dict[str, list[float]] = {}
        self.window_foreign: dict[str, list[float]] = {}
        self.guest_pauses: list[tuple[float, float]] = []
        self._seq = 0

    # -- setup ------------------------------------------------------------------------------
    def enroll(self) -> None:
        """Two agents through a real broker's enrollment port (the broker is then stopped:
        replication does not pass through it)."""
        from agent.replication.state import ReplicationState
        from sitepair import tickets
        from tests.support.agents import register_agent
        from tests.support.brokers import BrokerThread, create_key, make_home

        broker = BrokerThread(make_home(self.folder / "broker", log_file=self.folder / "b.log"))
        try:
            self.homes: dict[str, Path] = {}
            self.idents: dict[str, Any] = {}
            for name, site in (("primary", "site-a"), ("replica", "site-b")):
                creds = self.folder / f"{name}.json"
                with contextlib.closing(broker.admin()) as admin:
                    create_key(admin, creds, site=site)
                home = self.folder / name
                self.idents[name] = register_agent(creds, home, name=f"hv-{name}")
                self.homes[name] = home
        finally:
            broker.stop()
        self.ticket_key_path = self.folder / "ticket.key"
        self.ticket_key = tickets.generate_signing_key()
        tickets.write_signing_key(self.ticket_key_path, self.ticket_key)
        self.source_state = ReplicationState(self.homes["primary"] / "state" / "replication.db")
        self.replica_state = ReplicationState(self.homes["replica"] / "state" / "replication.db")
        self.vm_root = self.homes["primary"] / "vms"
        self.work_dir = self.homes["primary"] / "replication-work"

    def start_workers(self) -> None:
        for malloc in ("tuned", "default"):
            env = worker_env(malloc)
            rx = Worker("receiver", self.homes["replica"], env=env, log=self.folder / "rx.log")
            self.workers[f"rx-{malloc}"] = rx
            self.ports = {**getattr(self, "ports", {}), malloc: rx.readline()}
            self.workers[f"tx-{malloc}"] = Worker(
                "sender", self.homes["primary"], env=env, log=self.folder / "tx.log"
            )

    def make_vm(self, name: str, size: int, data: DiskLikeData, raw: Path | None) -> str:
        """A directory-backend VM with one VHDX of ``size`` bytes of ``data`` written through
        the tracked writer (and the same bytes in a raw file for rsync)."""
        from agent.hosts.directory import DirectoryBackend

        backend = DirectoryBackend(self.vm_root)
        spec = backend.create_vm(name, disks=[("os", "vhdx", size)])
        per = MiB // BLOCK
        with backend.open_writer(spec.id) as w, _maybe_open(raw) as f:
            buf: list[bytes] = []
            off = 0
            for block in data.blocks(size // BLOCK):
                buf.append(block)
                if len(buf) == per:
                    chunk = b"".join(buf)
                    w.write("os", off, chunk)
                    if f is not None:
                        f.write(chunk)
                    off += len(chunk)
                    buf = []
            if buf:
                chunk = b"".join(buf)
                w.write("os", off, chunk)
                if f is not None:
                    f.write(chunk)
            w.flush()
        return spec.id

    def relationship(self, vm_id: str, *, auth: str, compress: bool, malloc: str) -> str:
        from agent.replication.state import Grant, SourceConfig
        from sitepair import tickets

        self._seq += 1
        rid = f"rel-{self._seq}"
        ports = self.ports[malloc]
        self.replica_state.put_grant(
            Grant(
                relationship=rid,
                vm_id=vm_id,
                vm_name=vm_id,
                source_host=self.idents["primary"].host_id,
                epoch=RELATIONSHIP_EPOCH,
                folder=str(self.homes["replica"] / "replicas" / rid),
                auth=auth,
                ticket_public_key=tickets.public_key_bytes(self.ticket_key).hex(),
                recovery_points=0,
            )
        )
        port = ports["certificate"] if auth == "certificate" else ports["ticket"]
        self.source_state.put_source(
            SourceConfig(
                relationship=rid,
                vm_id=vm_id,
                replica_host=self.idents["replica"].host_id,
                address=f"127.0.0.1:{port}",
                epoch=RELATIONSHIP_EPOCH,
                auth=auth,
                compression=compress,
            ),
        )
        return rid

    def forget(self, rid: str) -> None:
        self.replica_state.remove_grant(rid)
        self.source_state.remove_source(rid)
        shutil.rmtree(self.homes["replica"] / "replicas" / rid, ignore_errors=True)
        shutil.rmtree(self.work_dir / rid, ignore_errors=True)

    def cycle(
        self,
        rid: str,
        *,
        malloc: str,
        tracker: str = "changelog",
        adaptive: bool = True,
        backend: str = "directory",
        vm_root: Path | None = None,
    ) -> dict[str, Any]:
        return self.workers[f"tx-{malloc}"].call(
            op="cycle",
            relationship=rid,
            tracker=tracker,
            adaptive=adaptive,
            backend=backend,
            vm_root=str(vm_root or self.vm_root),
            work_dir=str(self.work_dir),
            ticket_key=str(self.ticket_key_path),
        )

    def cpu_seconds(self) -> float:
        """CPU time used so far by the agent workers, the rsync clients (reaped children of
        this process) and the rsync daemon with its per-connection children."""
        import resource

        import psutil

        total = 0.0
        procs = [w.proc.pid for w in self.workers.values()]
        if hasattr(self, "rsync"):
            procs.append(self.rsync.proc.pid)
        for pid in procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ru.ru_utime + ru.ru_stime

    def timed_rounds(self, peers: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
        """Every peer once per round, in a rotating order, page cache dropped before each."""
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in peers}
        for r, order in rotations(list(peers), self.rounds):
            for name in order:
                if self.cold:
                    drop_caches()
                cpu = self.cpu_seconds()
                res = peers[name]()
                time.sleep(0.3)  # let the rsync daemon reap its child (its CPU time counts)
                res["cpu_seconds"] = self.cpu_seconds() - cpu
                runs[name].append(res)
                print(
                    f"  round {r + 1}: {name}: {res['seconds']:.2f} s (load {load_average():.2f})",
                    file=sys.stderr,
                )
        return {
            name: {
                "runs": rs,
                "seconds": median([x["seconds"] for x in rs]),
                **{
                    k: median([x[k] for x in rs])
                    for k in (
                        "wire_bytes",
                        "literal_bytes",
                        "sent_bytes",
                        "raw_bytes",
                        "cpu_seconds",
                    )
                    if k in rs[0]
                },
            }
            for name, rs in runs.items()
        }

    # -- scenarios --------------------------------------------------------------------------
    def initial(self, name: str, size: int, data: DiskLikeData, *, full: bool) -> dict[str, Any]:
        raw = self.folder / f"{name}.raw"
        print(f"building {name}: {size / GiB:g} GiB VHDX + raw copy ...", file=sys.stderr)
        vm = self.make_vm(name, size, data, raw)
        dst = self.folder / "rsync" / f"{name}.raw"

        def rsync() -> dict[str, Any]:
            dst.unlink(missing_ok=True)
            return self.rsync.run(raw, dst.name, "--whole-file")

        def ours(
            auth: str, compress: bool, malloc: str, adaptive: bool = True
        ) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                rid = self.relationship(vm, auth=auth, compress=compress, malloc=malloc)
                try:
                    res = self.cycle(rid, malloc=malloc, adaptive=adaptive)
                finally:
                    self.forget(rid)
                return res

            return run

        def raw_stream(malloc: str = "tuned") -> dict[str, Any]:
            return self.workers[f"tx-{malloc}"].call(
                op="raw",
                path=str(raw),
                address=f"127.0.0.1:{self.ports[malloc]['sink']}",
                replica_host=self.idents["replica"].host_id,
            )

        peers: dict[str, Callable[[], dict[str, Any]]] = {"rsync": rsync}
        if full:
            peers["grpc-raw"] = raw_stream
        peers["ours-8084-zstd"] = ours("certificate", True, "tuned")
        if full:
            peers["ours-8084-zstd-always"] = ours("certificate", True, "tuned", adaptive=False)
            peers["ours-8084-plain"] = ours("certificate", False, "tuned")
            peers["ours-8083-zstd"] = ours("ticket", True, "tuned")
            peers["ours-8084-zstd-default-malloc"] = ours("certificate", True, "default")
        if self.args.peers:
            keep = {"rsync", *self.args.peers}
            peers = {k: v for k, v in peers.items() if k in keep}
        results = self.timed_rounds(peers)
        dst.unlink(missing_ok=True)
        for r in results.values():
            r["mb_per_s"] = size / r["seconds"] / 1e6
        return {"size": size, "peers": results}

    def delta(self, size: int) -> dict[str, Any]:
        data = DiskLikeData(42)
        src = self.folder / "delta-src.raw"
        dst = self.folder / "rsync" / "delta.raw"
        print(f"building the delta disks: 2 x {size / GiB:g} GiB VHDX + raw ...", file=sys.stderr)
        vms = {
            "changelog": self.make_vm("delta-log", size, data, src),
            "scan": self.make_vm("delta-scan", size, data, None),
        }
        shutil.copyfile(src, dst)
        rels = {
            t: self.relationship(vm, auth="certificate", compress=True, malloc="tuned")
            for t, vm in vms.items()
        }
        initial: dict[str, Any] = {}
        for tracker, rid in rels.items():
            if self.cold:
                drop_caches()
            print(f"initial cycle of the {tracker} disk ...", file=sys.stderr)
            initial[tracker] = self.cycle(rid, malloc="tuned", tracker=tracker)
        from agent.hosts.directory import DirectoryBackend

        backend = DirectoryBackend(self.vm_root)
        blocks = size // BLOCK
        changed = max(1, blocks * 2 // 100)
        rounds: dict[str, list[dict[str, Any]]] = {"rsync": [], "changelog": [], "scan": []}
        for r, order in rotations(list(rounds), self.rounds):
            # A fresh 2 % of the blocks, the same bytes into the raw image and both VMs.
            rng = random.Random(1000 + r)
            picks = sorted(rng.sample(range(blocks), changed))
            contents = [data.changed_block(rng) for _ in picks]
            with src.open("r+b") as f:
                for i, c in zip(picks, contents, strict=True):
                    f.seek(i * BLOCK)
                    f.write(c)
            for vm in vms.values():
                with backend.open_writer(vm) as w:
                    for i, c in zip(picks, contents, strict=True):
                        w.write("os", i * BLOCK, c)
                    w.flush()
            for name in order:
                if self.cold:
                    drop_caches()
                cpu = self.cpu_seconds()
                if name == "rsync":
                    # --ignore-times: rsync's quick check (size and time) once skipped the
                    # file altogether in a round (0 literal bytes in 0.15 s), which is no
                    # transfer at all; every round must move the changed blocks.
                    res = self.rsync.run(
                        src, dst.name, "--inplace", "--no-whole-file", "--ignore-times"
                    )
                    if res["literal_bytes"] <= 0:
                        raise RuntimeError(f"rsync moved no data in round {r + 1}: {res}")
                else:
                    res = self.cycle(rels[name], malloc="tuned", tracker=name)
                time.sleep(0.3)
                res["cpu_seconds"] = self.cpu_seconds() - cpu
                res["changed_bytes"] = changed * BLOCK
                rounds[name].append(res)
                print(f"  round {r + 1}: {name}: {res['seconds']:.2f} s", file=sys.stderr)
        out: dict[str, Any] = {"size": size, "changed_blocks": changed, "initial": initial}
        out["peers"] = {
            name: {
                "runs": rs,
                "seconds": median([x["seconds"] for x in rs]),
                "cpu_seconds": median([x["cpu_seconds"] for x in rs]),
                "wire_bytes": median([x.get("wire_bytes", x.get("literal_bytes", 0)) for x in rs]),
                **(
                    {
                        "literal_bytes": median([x["literal_bytes"] for x in rs]),
                        "sent_bytes": median([x["sent_bytes"] for x in rs]),
                    }
                    if name == "rsync"
                    else {"send_seconds": median([x["send_seconds"] for x in rs])}
                ),
            }
            for name, rs in rounds.items()
        }
        for rid in rels.values():
            self.forget(rid)
        dst.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        return out

    # -- a running guest --------------------------------------------------------------------
    def guest_delta(
        self, *, interval: float, every: float, window_cycles: int, timed_rounds: int
    ) -> dict[str, Any]:
        """The test guest as a qemu-backend VM (TCG) pausing ``interval`` s after each record:
        protected (initial cycle, untimed); then its write latency alone and with a delta cycle
        every ``every`` s, in alternated windows of ``window_cycles`` cycles; then timed delta
        cycles, each ``every`` s after the previous cut, each followed by rsync of the cut."""
        import _guest

        from agent.hosts import qemu_vm
        from agent.hosts.qemu import QemuBackend
        from agent.hosts.qemu_vm import Runtime
        from tests.support.guest import ConsoleLog, GuestImage, missing_tools

        if missing := missing_tools():
            raise RuntimeError(f"the guest-delta part needs {', '.join(missing)}")
        print("building (or finding in its cache) the test guest ...", file=sys.stderr)
        image = GuestImage.build()
        gdir = self.folder / "guest"
        boot = _guest.boot_disk(image, gdir, f"sitepair.interval={interval:g}")
        data = gdir / "data.vhdx"
        shutil.copyfile(image.data_template, data)
        vm_root = self.homes["primary"] / "qemu-vms"
        backend = QemuBackend(vm_root, accel="tcg", stop_timeout=30)
        spec = backend.create_vm("guest", disks=[("boot", "vhdx", boot), ("data", "vhdx", data)])
        self.guest_vm = (backend, spec.id)
        started = time.monotonic()
        backend.set_vm_state(spec.id, "running")
        serial = Runtime(backend.find_vm(spec.id)[0]).serial
        console = ConsoleLog(serial)
        tail = _guest.ConsoleTail(serial)
        try:
            console.wait_for(lambda c: len(c.acks()) >= 3, 180, what="3 ACKs")
            boot_seconds = time.monotonic() - started
            rid = self.relationship(spec.id, auth="certificate", compress=True, malloc="tuned")

            def cycle() -> dict[str, Any]:
                return self.cycle(rid, malloc="tuned", backend="qemu", vm_root=vm_root)

            qemu_pid = qemu_vm.running_instance(Runtime(backend.find_vm(spec.id)[0]))
            pids = [os.getpid(), self.rsync.proc.pid, *(w.proc.pid for w in self.workers.values())]
            pids += [qemu_pid.pid] if qemu_pid else []
            breaks: list[float] = []

            def quiet() -> None:
                self._guest_quiet(backend, spec.id, pids, breaks)

            print("initial cycle of the running guest (untimed) ...", file=sys.stderr)
            initial = cycle()
            spans: list[tuple[str, float, float]] = [tuple(x) for x in initial["spans"]]
            time.sleep(every)
            windows = self._guest_windows(cycle, spans, every, window_cycles, quiet, pids)
            bases = {d: chain[0] for d, chain in backend.disk_chains(spec.id).items()}
            quiet()
            rounds = self._guest_rounds(cycle, spans, rid, bases, every, timed_rounds)
            records = tail.records(breaks)
            lags = tail.lags(breaks)
            full = [x for x in console.lines() if x.startswith("SITEPAIR WRITER")]
            backend.set_vm_state(spec.id, "off")
            shutdown = console.shutdown()
        finally:
            tail.close()
        if full:
            raise RuntimeError(f"the guest's writer stopped ({full[0]}): its disk filled")
        if shutdown != "clean":
            raise RuntimeError(f"the guest did not shut down cleanly: {console.tail()}")
        return {
            "interval": interval,
            "every": every,
            "window_seconds": every * window_cycles,
            "latency_rounds": self.rounds,
            "timed_rounds": timed_rounds,
            "boot_seconds": boot_seconds,
            "initial": initial,
            "disks": {d: str(p.name) for d, p in bases.items()},
            "latency": _guest_latency(records, spans, windows),
            "window_loads": self.window_loads,
            "window_foreign_cores": self.window_foreign,
            "pauses": self.guest_pauses,
            "peers": _guest_peers(rounds, records),
            "records_total": len(records),
            # How late the console showed each record after its end on the host's clock (the
            # guest's clock mapped by the smallest such delay): the mapping's accuracy.
            "console_lag_p50": percentile(lags, 50),
            "console_lag_p99": percentile(lags, 99),
            "records": [dataclasses.astuple(r) for r in records],
            "windows": windows,
            "spans": spans,
        }

    def _guest_quiet(self, backend: Any, vm_id: str, pids: list[int], breaks: list[float]) -> None:
        """If other processes use more than QUIET_CORES, pause the guest (so that it neither
        writes nor loads the machine) until they have not for 15 s, at most 15 minutes; the
        guest's clock stands still meanwhile, which ``breaks`` records."""
        from _guest import QUIET_CORES, cpu_reading, foreign_cores

        a = cpu_reading(pids)
        time.sleep(3)
        used = foreign_cores(a, cpu_reading(pids))
        if used < QUIET_CORES or self.args.quick:  # a smoke test does not wait
            return
        print(f"other processes use {used:.2f} cores: guest paused until quiet", file=sys.stderr)
        paused = time.time()
        backend.set_vm_state(vm_id, "paused")
        deadline, calm = time.monotonic() + 900, 0
        while calm < 3 and time.monotonic() < deadline:
            a = cpu_reading(pids)
            time.sleep(5)
            used = foreign_cores(a, cpu_reading(pids))
            calm = calm + 1 if used < QUIET_CORES else 0
        backend.set_vm_state(vm_id, "running")
        breaks.append(time.time())
        self.guest_pauses.append((paused, time.time()))
        print(f"  guest resumed (other processes: {used:.2f} cores)", file=sys.stderr)
        time.sleep(2)

    def _guest_windows(
        self,
        cycle: Callable[[], dict[str, Any]],
        spans: list[tuple[str, float, float]],
        every: float,
        window_cycles: int,
        quiet: Callable[[], None],
        pids: list[int],
    ) -> dict[str, list[tuple[float, float]]]:
        """Alternated windows (rotating order each round) of the guest alone and of a delta
        cycle at the start of every ``every`` s; nothing else runs (no cache drops, no rsync).
        Each round starts once other processes are quiet."""
        from _guest import cpu_reading, foreign_cores

        window = every * window_cycles
        windows: dict[str, list[tuple[float, float]]] = {"alone": [], "cycles": []}
        for r, order in rotations(list(windows), self.rounds):
            quiet()
            for name in order:
                cpu = cpu_reading(pids)
                start = time.time()
                if name == "cycles":
                    for k in range(window_cycles):
                        _sleep_until(start + k * every)
                        spans += [tuple(x) for x in cycle()["spans"]]
                _sleep_until(start + window)
                windows[name].append((start, time.time()))
                foreign = foreign_cores(cpu, cpu_reading(pids))
                self.window_loads.setdefault(name, []).append(load_average())
                self.window_foreign.setdefault(name, []).append(foreign)
                print(
                    f"  latency round {r + 1}: {name} for {window:g} s (load "
                    f"{load_average():.2f}, other processes {foreign:.2f} cores)",
                    file=sys.stderr,
                )
        return windows

    def _guest_rounds(
        self,
        cycle: Callable[[], dict[str, Any]],
        spans: list[tuple[str, float, float]],
        rid: str,
        bases: dict[str, Path],
        every: float,
        count: int,
    ) -> dict[str, list[dict[str, Any]]]:
        """Timed delta cycles, each ``every`` s after the previous cut, each followed by rsync
        of that cut: the source's base images once the cycle released its cut (then exactly
        the cut) converted to raw by qemu-img, into the raw copies of the cut before."""
        src_dir = self.folder / "guest-raw"
        src_dir.mkdir(exist_ok=True)

        def to_raw() -> list[Path]:
            out = []
            for disk_id, base in bases.items():
                raw = src_dir / f"{disk_id}.raw"
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", str(base), str(raw)],
                    check=True,
                    capture_output=True,
                )
                out.append(raw)
            return out

        dst_dir = self.folder / "rsync" / "guest"
        dst_dir.mkdir(exist_ok=True)
        for raw in to_raw():
            shutil.copyfile(raw, dst_dir / raw.name)
        last_cut = max(a for name, a, _ in spans if name == "transaction")
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "rsync": []}
        for r in range(count):
            _sleep_until(last_cut + every)
            if self.cold:
                drop_caches()
            cpu = self.cpu_seconds()
            res = cycle()
            time.sleep(0.3)
            res["cpu_seconds"] = self.cpu_seconds() - cpu
            spans += [tuple(x) for x in res["spans"]]
            res["previous_cut_at"] = last_cut
            last_cut = next(a for name, a, _ in res["spans"] if name == "transaction")
            res["cut_at"] = last_cut
            convert = time.perf_counter()
            raws = to_raw()
            convert = time.perf_counter() - convert
            res["replica_matches"] = self._replica_matches(rid, raws)
            if not res["replica_matches"]:
                raise RuntimeError(f"round {r + 1}: the replica differs from the source's cut")
            runs["ours"].append(res)
            if self.cold:
                drop_caches()
            cpu = self.cpu_seconds()
            rs = self.rsync.run(raws, "guest/", "--inplace", "--no-whole-file", "--ignore-times")
            time.sleep(0.3)
            rs["cpu_seconds"] = self.cpu_seconds() - cpu
            rs["convert_seconds"] = convert
            if rs["literal_bytes"] <= 0:
                raise RuntimeError(f"rsync moved no data in round {r + 1}: {rs}")
            runs["rsync"].append(rs)
            print(
                f"  round {r + 1}: ours {res['seconds']:.2f} s, {res['wire_bytes']:,} B on the "
                f"wire; rsync {rs['seconds']:.2f} s, {rs['literal_bytes']:,} B literal",
                file=sys.stderr,
            )
        return runs

    def _replica_matches(self, rid: str, raws: list[Path]) -> bool:
        """The replica's latest layer of each disk holds exactly the bytes of ``raws`` (the
        source's cut, as qemu-img read it)."""
        from sitepair import vdisk

        roots = [p.parent for p in (self.homes["replica"] / "replicas" / rid).rglob("state.json")]
        if len(roots) != 1:
            return False
        state = json.loads((roots[0] / "state.json").read_text())
        for raw in raws:
            top = roots[0] / state["disks"][raw.stem]["chain"][-1]
            with vdisk.open_disk(top, read_only=True) as d, raw.open("rb") as f:
                if d.virtual_size != raw.stat().st_size:
                    return False
                for off in range(0, d.virtual_size, 4 * MiB):
                    n = min(4 * MiB, d.virtual_size - off)
                    if d.read(off, n) != f.read(n):
                        return False
        return True

    def close(self) -> None:
        if hasattr(self, "guest_vm"):
            from agent.hosts import qemu_vm
            from agent.hosts.qemu_vm import Runtime

            backend, vm_id = self.guest_vm
            with contextlib.suppress(Exception):
                inst = qemu_vm.running_instance(Runtime(backend.find_vm(vm_id)[0]))
                if inst is not None:
                    qemu_vm.kill(inst)
        for w in self.workers.values():
            w.close()
        with contextlib.suppress(AttributeError):
            self.rsync.stop()
        with contextlib.suppress(AttributeError):
            self.source_state.close()
            self.replica_state.close()


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _guest_latency(
    records: list[Any],
    spans: list[tuple[str, float, float]],
    windows: dict[str, list[tuple[float, float]]],
    seed: int = 1,
) -> dict[str, Any]:
    """The guest's record latencies per window kind, and those of the cycling windows by what
    was going on while each record was written."""
    from _guest import latency_stats, overlaps, record_size

    def within(ws: list[tuple[float, float]]) -> list[Any]:
        return [r for r in records if any(a <= r.end <= b for a, b in ws)]

    def seconds(ws: list[tuple[float, float]]) -> float:
        return sum(b - a for a, b in ws)

    in_windows = [(n, a, b) for n, a, b in spans if any(x <= a <= y for x, y in windows["cycles"])]

    def of(name: str) -> list[tuple[float, float]]:
        return [(a, b) for n, a, b in in_windows if n == name]

    phases: dict[str, list[Any]] = {"transaction": [], "block-commit": [], "cycle": [], "idle": []}
    for r in within(windows["cycles"]):
        for phase in ("transaction", "block-commit", "cycle"):
            if overlaps(r, of(phase)):
                phases[phase].append(r)
                break
        else:
            phases["idle"].append(r)
    out: dict[str, Any] = {}
    for name, ws in windows.items():
        out[name] = latency_stats(within(ws), seconds(ws))
        out[name]["record_bytes_per_s"] = sum(
            record_size(seed, r.seq) for r in within(ws)
        ) / seconds(ws)
    out["per_window"] = {
        name: [latency_stats(within([w]), w[1] - w[0]) for w in ws] for name, ws in windows.items()
    }
    out["by_phase"] = {name: latency_stats(rs) for name, rs in phases.items()}
    # Per cycle: the time in each kind of span inside it (a release commits every disk).
    per_cycle: dict[str, list[float]] = {}
    for a, b in of("cycle"):
        for name in ("cycle", "cut", "transaction", "release", "block-commit"):
            per_cycle.setdefault(name, []).append(
                sum(y - x for n, x, y in in_windows if n == name and a <= x and y <= b)
            )
    out["spans"] = {
        name: {
            "count": len(values),
            "median_seconds": median(values),
            "max_seconds": max(values, default=float("nan")),
        }
        for name, values in per_cycle.items()
    }
    return out


def _guest_peers(
    runs: dict[str, list[dict[str, Any]]], records: list[Any], seed: int = 1
) -> dict[str, Any]:
    """Medians of the timed rounds; for ours also the guest's records between the two cuts."""
    from _guest import record_size

    def span(res: dict[str, Any], name: str) -> float:
        return float(sum(b - a for n, a, b in res["spans"] if n == name))

    for res in runs["ours"]:
        between = [r for r in records if res["previous_cut_at"] < r.end <= res["cut_at"]]
        res["records"] = len(between)
        res["record_bytes"] = sum(record_size(seed, r.seq) for r in between)
        res["interval_seconds"] = res["cut_at"] - res["previous_cut_at"]
        for name in ("cut", "transaction", "release", "block-commit"):
            res[f"{name}_seconds"] = span(res, name)
    ours_keys = (
        "seconds", "cpu_seconds", "wire_bytes", "raw_bytes", "send_seconds", "cut_seconds",
        "transaction_seconds", "release_seconds", "block-commit_seconds", "records",
        "record_bytes", "interval_seconds",
    )  # fmt: skip
    rsync_keys = (
        "seconds", "cpu_seconds", "literal_bytes", "matched_bytes", "sent_bytes",
        "convert_seconds",
    )  # fmt: skip
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        keys = ours_keys if name == "ours" else rsync_keys
        out[name] = {"runs": rs, **{k: median([x[k] for x in rs]) for k in keys}}
    return out


@contextlib.contextmanager
def _maybe_open(path: Path | None) -> Iterator[Any]:
    if path is None:
        yield None
        return
    with path.open("wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


# =============================================================================================
# Output
# =============================================================================================
LABELS = {
    "rsync": "rsync daemon on 127.0.0.1, `--whole-file` (no encryption, no compression)",
    "grpc-raw": "bare gRPC stream, mTLS, pre-serialised 1 MiB messages (the ceiling)",
    "ours-8084-zstd": "sitepair initial cycle, 8084 mTLS, zstd adaptive (the default)",
    "ours-8084-zstd-always": "sitepair initial cycle, 8084 mTLS, zstd on every batch",
    "ours-8084-plain": "sitepair initial cycle, 8084 mTLS, no compression",
    "ours-8083-zstd": "sitepair initial cycle, 8083 TLS + ticket, zstd",
    "ours-8084-zstd-default-malloc": (
        "sitepair initial cycle, 8084 mTLS, zstd, glibc default malloc"
    ),
}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 0 else "?"


def initial_table(res: dict[str, Any]) -> str:
    peers = res["peers"]
    base = peers["rsync"]["seconds"]
    rows = []
    for name, r in peers.items():
        wire = r.get("wire_bytes", r.get("sent_bytes", -1))
        rows.append(
            [
                LABELS[name],
                f"{r['mb_per_s']:,.0f} MB/s",
                f"{base / r['seconds']:.2f}x",
                f"{r['seconds']:.2f} s",
                f"{r['cpu_seconds']:.1f} s",
                _mb(wire),
            ]
        )
    return table(
        ["peer", "throughput", "vs rsync", "wall time", "CPU time (both ends)", "on the wire"], rows
    )


def delta_table(res: dict[str, Any]) -> str:
    peers = res["peers"]
    base = peers["rsync"]["seconds"]
    rs = peers["rsync"]
    rows = [
        [
            "rsync daemon, `--inplace --no-whole-file --ignore-times`",
            f"{rs['seconds']:.2f} s",
            "1.00x",
            f"{rs['cpu_seconds']:.1f} s",
            f"{_mb(rs['literal_bytes'])} literal data ({_mb(rs['sent_bytes'])} sent in total)",
        ]
    ]
    for name, label in (("changelog", "change log"), ("scan", "scan tracker")):
        r = peers[name]
        rows.append(
            [
                f"sitepair delta cycle, {label} (of which sending {r['send_seconds']:.2f} s)",
                f"{r['seconds']:.2f} s",
                f"{r['seconds'] / base:.2f}x",
                f"{r['cpu_seconds']:.1f} s",
                f"{_mb(r['wire_bytes'])}",
            ]
        )
    return table(
        ["peer", "wall time", "vs rsync (time)", "CPU time (both ends)", "on the wire"], rows
    )


def _bytes(n: float) -> str:
    return f"{n / 1e3:,.0f} KB" if 0 <= n < 10e6 else _mb(n)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds == seconds else "-"


def guest_delta_table(res: dict[str, Any]) -> str:
    rs, ours = res["peers"]["rsync"], res["peers"]["ours"]
    rows = [
        [
            "rsync daemon, `--inplace --no-whole-file --ignore-times`, the cut's two disks as "
            "raw images",
            f"{rs['seconds']:.2f} s",
            "1.00x",
            f"{rs['cpu_seconds']:.1f} s",
            f"{_bytes(rs['literal_bytes'])} literal data ({_bytes(rs['sent_bytes'])} sent in "
            "total)",
            "(reads both images in full at both ends)",
        ],
        [
            "sitepair delta cycle of the running guest, qcow2 overlay as change log (cut "
            f"{ours['cut_seconds']:.2f} s, sending {ours['send_seconds']:.2f} s, release "
            f"{ours['release_seconds']:.2f} s)",
            f"{ours['seconds']:.2f} s",
            f"{ours['seconds'] / rs['seconds']:.2f}x",
            f"{ours['cpu_seconds']:.1f} s",
            _bytes(ours["wire_bytes"]),
            _bytes(ours["raw_bytes"]),
        ],
    ]
    return table(
        ["peer", "wall time", "vs rsync (time)", "CPU time (both ends)", "on the wire",
         "guest bytes sent"],
        rows,
    )  # fmt: skip


def guest_latency_table(res: dict[str, Any]) -> str:
    lat = res["latency"]

    def row(label: str, st: dict[str, Any]) -> list[str]:
        rate = f" ({st['records_per_s']:.2f}/s)" if "records_per_s" in st else ""
        return [
            label,
            f"{st['records']}{rate}",
            " / ".join(_ms(st[f"record_{k}"]) for k in ("p50", "p99", "max")),
            " / ".join(_ms(st[f"fsync_{k}"]) for k in ("p50", "p99", "max")),
        ]

    every = f"{res['every']:g}"
    ph = lat["by_phase"]
    rows = [
        row("guest alone", lat["alone"]),
        row(f"guest with a delta cycle every {every} s", lat["cycles"]),
        row("... of which records overlapping a cut's QMP `transaction`", ph["transaction"]),
        row("... overlapping a release's `block-commit`", ph["block-commit"]),
        row(
            "... overlapping the rest of a cycle (new overlays, plan, send, replica commit)",
            ph["cycle"],
        ),
        row("... between cycles", ph["idle"]),
    ]
    return table(
        ["the guest's records", "records (rate)", "write to durable p50 / p99 / max",
         "its two fsyncs p50 / p99 / max"],
        rows,
    )  # fmt: skip


def goals(doc: dict[str, Any]) -> list[str]:
    out = []
    ini = doc.get("initial", {}).get("peers", {})
    if "ours-8084-zstd" in ini:
        ratio = ini["rsync"]["seconds"] / ini["ours-8084-zstd"]["seconds"]
        out.append(f"initial >= 0.6x rsync: {ratio:.2f}x -> {'met' if ratio >= 0.6 else 'MISSED'}")
    if "delta" not in doc:
        return out
    d = doc["delta"]["peers"]
    base = d["rsync"]["seconds"]
    for name, goal in (("changelog", 0.2), ("scan", 0.7)):
        r = d[name]["seconds"] / base
        out.append(
            f"delta, {name} <= {goal}x rsync time: {r:.2f}x -> {'met' if r <= goal else 'MISSED'}"
        )
    for name in ("changelog", "scan"):
        w, lit = d[name]["wire_bytes"], d["rsync"]["literal_bytes"]
        out.append(
            f"delta, {name} bytes <= rsync literal data: {w / 1e6:.1f} vs {lit / 1e6:.1f} MB -> "
            f"{'met' if w <= lit else 'MISSED'}"
        )
    return out


def report(doc: dict[str, Any]) -> str:
    f = doc["facts"]
    cache = (
        "page cache dropped before every timed run"
        if doc["cold"]
        else "WARM page cache (not root: could not drop caches)"
    )
    lines = [
        f"Measured {f['date']} on {f['cpus']} CPUs ({f['cpu']}), Python {f['python']}, "
        f"grpcio {f['grpcio']}; {doc['rounds']} round(s), peers alternated, medians; {cache}; "
        f"sender and receiver in separate processes on the same cores; 1-min load "
        f"{f['load_1m_at_start']:.2f} at start, {doc['load_at_end']:.2f} at end.",
    ]
    if "initial" in doc:
        ini = doc["initial"]
        lines += [
            "",
            f"**Initial replication of a {ini['size'] / GiB:g} GiB disk-like VHDX** (64 KiB "
            "blocks: 20 % zeros, 40 % random, 40 % text; seed 42); rsync and the bare stream "
            "move the same bytes as a raw file:",
            "",
            initial_table(ini),
        ]
    if "zero_heavy" in doc:
        zero = doc["zero_heavy"]
        lines += [
            "",
            f"**Initial replication of a {zero['size'] / GiB:g} GiB zero-heavy disk** (80 % "
            "zero blocks, 10 % random, 10 % text):",
            "",
            initial_table(zero),
        ]
    if "delta" in doc:
        dl = doc["delta"]
        lines += [
            "",
            f"**Delta cycle on a {dl['size'] / GiB:g} GiB disk with 2 % of its 64 KiB blocks "
            f"rewritten at random** ({dl['changed_blocks']} blocks, "
            f"{dl['changed_blocks'] * BLOCK / 1e6:.0f} MB; a fresh set each round; our time is "
            "the whole `run_cycle`: cut, plan, send, stage, commit, apply, release):",
            "",
            delta_table(dl),
        ]
    if "guest_delta" in doc:
        g = doc["guest_delta"]
        ours, sp, alone = g["peers"]["ours"], g["latency"]["spans"], g["latency"]["alone"]
        runs = {name: g["peers"][name]["runs"] for name in ("ours", "rsync")}
        loads = {k: ", ".join(f"{x:.2f}" for x in v) for k, v in g["window_foreign_cores"].items()}
        per_window = {
            name: ", ".join(f"{_ms(w['record_p99'])} / {_ms(w['fsync_p99'])}" for w in windows)
            for name, windows in g["latency"]["per_window"].items()
        }
        lines += [
            "",
            f"**Delta cycles of a running guest** (tests/support/guest.py under TCG as a qemu "
            f"backend VM writing durable records of 16-64 KiB with a {g['interval']:g} s pause "
            f"after each: {alone['records_per_s']:.2f} records/s, "
            f"{alone['record_bytes_per_s'] / 1e3:.0f} KB/s when alone; disks "
            f"{', '.join(g['disks'].values())}; each cycle {g['every']:g} s after the previous "
            f"cut, in which the guest wrote {ours['records']:.0f} records, "
            f"{ours['record_bytes'] / 1e3:,.0f} KB of record files; rsync copies that same cut, "
            "the source's base images after the cycle released it, converted to raw by "
            f"`qemu-img convert` in {g['peers']['rsync']['convert_seconds']:.2f} s, not counted):",
            "",
            guest_delta_table(g),
            "",
            f"Medians of {g['timed_rounds']} rounds (each round: our cycle, then rsync of its cut)"
            "; per round, ours / rsync: "
            + ", ".join(
                f"{o['seconds']:.2f} / {r['seconds']:.2f} s"
                for o, r in zip(runs["ours"], runs["rsync"], strict=True)
            )
            + ".",
            "",
            f"**The guest's write latency** (its own clock: from the start of a record's write "
            f"to the fsync of its log line; {g['latency_rounds']} rounds of two windows of "
            f"{g['window_seconds']:g} s, alone and with cycles, alternated; pooled):",
            "",
            guest_latency_table(g),
            "",
            "p99 per window (write to durable / fsyncs), alone: "
            f"{per_window['alone']}; with cycles: {per_window['cycles']}. Cores used by other "
            f"processes (not the guest, agents, rsync or this script) in each window, alone: "
            f"{loads['alone']}; with cycles: {loads['cycles']}"
            + (
                f"; the guest was paused {len(g['pauses'])} time(s) to wait for quiet"
                if g["pauses"]
                else ""
            )
            + ".",
            "",
            f"In the cycling windows a cut took {_ms(sp['cut']['median_seconds'])} (max "
            f"{_ms(sp['cut']['max_seconds'])}), of which the QMP transaction "
            f"{_ms(sp['transaction']['median_seconds'])} (max "
            f"{_ms(sp['transaction']['max_seconds'])}); a release "
            f"{_ms(sp['release']['median_seconds'])} (max {_ms(sp['release']['max_seconds'])}),"
            f" of which the block-commit {_ms(sp['block-commit']['median_seconds'])} (max "
            f"{_ms(sp['block-commit']['max_seconds'])}) for both disks; medians of "
            f"{sp['cut']['count']} cycles. Records are placed against those spans by the "
            f"guest's clock, mapped to the host's through the console (lines seen "
            f"{_ms(g['console_lag_p50'])} after their record's end, p99 "
            f"{_ms(g['console_lag_p99'])}); the guest booted to its third record in "
            f"{g['boot_seconds']:.0f} s.",
        ]
    if found := goals(doc):
        lines += [
            "",
            ("Goals (not meaningful at --quick sizes): " if doc.get("quick") else "Goals: ")
            + "; ".join(found)
            + ".",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (smoke)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer (median)")
    parser.add_argument("--initial-gib", type=float, default=2.0)
    parser.add_argument("--delta-gib", type=float, default=4.0)
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait for a 1-min load below this first"
    )
    parser.add_argument(
        "--parts",
        default="initial,zero,delta",
        help="comma-separated parts to run: initial, zero (zero-heavy initial), delta, "
        "guest-delta (a running test guest under QEMU; not in the default set)",
    )
    parser.add_argument(
        "--guest-interval",
        type=float,
        default=0.25,
        help="guest-delta: the guest's pause after each record, seconds",
    )
    parser.add_argument(
        "--guest-every",
        type=float,
        help="guest-delta: seconds between cycles (default 10; 5 with --quick)",
    )
    parser.add_argument(
        "--guest-timed-rounds",
        type=int,
        help="guest-delta: timed delta rounds, ours then rsync (default 5; 1 with --quick)",
    )
    parser.add_argument(
        "--guest-window-cycles",
        type=int,
        help="guest-delta: cycles per latency window (default 3; 2 with --quick)",
    )
    parser.add_argument(
        "--peers",
        type=lambda v: [p for p in v.split(",") if p],
        default=[],
        help=f"only these initial-copy peers (rsync always runs): {', '.join(LABELS)}",
    )
    parser.add_argument("--worker", choices=["sender", "receiver"], help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "receiver":
        _serve_receiver(args.home)
        return 0
    if args.worker == "sender":
        _serve_sender(args.home)
        return 0
    parts = set(args.parts.split(","))
    if unknown := parts - {"initial", "zero", "delta", "guest-delta"}:
        parser.error(f"unknown --parts {', '.join(sorted(unknown))}")
    if unknown := set(args.peers) - set(LABELS):
        parser.error(f"unknown --peers {', '.join(sorted(unknown))}")
    if shutil.which("rsync") is None:
        print("rsync is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        initial_size, zero_size, delta_size = 64 * MiB, 64 * MiB, 128 * MiB
    else:
        initial_size = int(args.initial_gib * 1024) * MiB
        zero_size = initial_size
        delta_size = int(args.delta_gib * 1024) * MiB
        wait_for_quiet(args.max_load, 600)
    facts = machine_facts()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="repl-bench-", dir="/var/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rsync").mkdir(exist_ok=True)
    bench = Bench(args, folder)
    try:
        bench.enroll()
        bench.start_workers()
        bench.rsync = RsyncDaemon(folder, folder / "rsync")
        doc: dict[str, Any] = {
            "facts": facts,
            "cold": bench.cold,
            "rounds": bench.rounds,
            "quick": args.quick,
        }
        if "initial" in parts:
            doc["initial"] = bench.initial("disklike", initial_size, DiskLikeData(42), full=True)
        if "zero" in parts:
            zero = DiskLikeData(42, zeros=0.8, random_share=0.1)
            doc["zero_heavy"] = bench.initial("zeroheavy", zero_size, zero, full=False)
        if "delta" in parts:
            doc["delta"] = bench.delta(delta_size)
        if "guest-delta" in parts:
            doc["guest_delta"] = bench.guest_delta(
                interval=args.guest_interval,
                every=args.guest_every or (5.0 if args.quick else 10.0),
                window_cycles=args.guest_window_cycles or (2 if args.quick else 3),
                timed_rounds=args.guest_timed_rounds or (1 if args.quick else 5),
            )
        doc["load_at_end"] = load_average()
        doc["command"] = "bench/replication.py " + " ".join(sys.argv[1:])
        print(report(doc))
        write_json(args.json, doc)
    finally:
        bench.close()
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
