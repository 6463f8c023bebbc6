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

The page cache is dropped before every timed run when running as root (the output says so).
``--quick`` is a smoke test (small sizes, one round); ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
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

                rel = SourceRelationship(
                    config,
                    backend=DirectoryBackend(Path(cmd["vm_root"])),
                    state=state,
                    identity=lambda: ident,
                    clock=SYSTEM_CLOCK,
                    work_dir=Path(cmd["work_dir"]),
                    ticket_provider=provider,
                    tracker=cmd["tracker"],
                    adaptive_compression=cmd.get("adaptive", True),
                )
                start = time.perf_counter()
                result = rel.run_cycle()
                wall = time.perf_counter() - start
                assert result is not None
                reply = {
                    "seconds": wall,
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

    def run(self, src: Path, name: str, *options: str) -> dict[str, Any]:
        start = time.perf_counter()
        out = subprocess.run(
            ["rsync", "--stats", *options, str(src), self.url(name)],
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
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.rounds = 1 if args.quick else args.rounds
        self.cold = can_drop_caches()
        self.workers: dict[str, Worker] = {}
        self.results: dict[str, Any] = {}
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
            {},
        )
        return rid

    def forget(self, rid: str) -> None:
        self.replica_state.remove_grant(rid)
        self.source_state.remove_source(rid)
        shutil.rmtree(self.homes["replica"] / "replicas" / rid, ignore_errors=True)
        shutil.rmtree(self.work_dir / rid, ignore_errors=True)

    def cycle(
        self, rid: str, *, malloc: str, tracker: str = "changelog", adaptive: bool = True
    ) -> dict[str, Any]:
        return self.workers[f"tx-{malloc}"].call(
            op="cycle",
            relationship=rid,
            tracker=tracker,
            adaptive=adaptive,
            vm_root=str(self.vm_root),
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

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        with contextlib.suppress(AttributeError):
            self.rsync.stop()
        with contextlib.suppress(AttributeError):
            self.source_state.close()
            self.replica_state.close()


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
    lines += [
        "",
        ("Goals (not meaningful at --quick sizes): " if doc.get("quick") else "Goals: ")
        + "; ".join(goals(doc))
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
        help="comma-separated parts to run: initial, zero (zero-heavy initial), delta",
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
    if unknown := parts - {"initial", "zero", "delta"}:
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
