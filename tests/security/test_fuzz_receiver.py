"""Fuzzing the replica receiver over the wire: cycle headers, batches, trailers, state and
digests requests, from a primary that holds a valid certificate and grant.

Each example starts from a valid cycle of a small random disk and mutates it the ways an attacker
or a broken network would: hostile and random disk ids, sizes, sequences, epochs, kinds and batch
counts in the header; indexes, codecs, raw lengths, block lists, digests and payload bytes of
batches (including zstd frames that declare far more than they hold); trailers with wrong counts
and digests; messages dropped, repeated, reordered, replaced by garbage, or a stream cut short.

After every example the receiver must have answered (no hang: each call has a deadline), still
serve, hold the control VM's replica exactly as committed, hold no file outside its replica
folder, and be able to reopen every replica it holds; and, at the end, its peak memory must not
have grown past a bound. The budget is ``SITEPAIR_FUZZ_EXAMPLES`` examples (a short run in the
default test run; ``make test-slow`` runs a long one, marked slow).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.replication.blocks import (
    BLOCK,
    BlockRef,
    CycleDigest,
    Encoder,
    blocks_for,
    group,
    plan_digest,
)
from agent.replication.replica import ReplicaStore
from sitepair import vdisk
from sitepair.v1 import replication_pb2
from tests.replication.test_cycles import header, make_disk
from tests.security.replica_site import MiB, Site

DEFAULT_EXAMPLES = int(os.environ.get("SITEPAIR_FUZZ_EXAMPLES", "100"))
SLOW_EXAMPLES = int(os.environ.get("SITEPAIR_FUZZ_SLOW_EXAMPLES", "3000"))
DISK = 2 * MiB
#: Peak memory the receiver may gain over a whole run (a single decompression bomb is 1 GiB).
MEMORY_BOUND = 192 * MiB

HOSTILE_IDS = [
    "os",
    "data",
    "",
    "..",
    "../control/disks/os",
    "/etc/passwd",
    "a\\b",
    "os\0",
    "CON",
    "x" * 300,
    "é",
]


def _valid_cycle(src: Path, rel: str, vm: str, seq: int, kind: int) -> list[Any]:
    """The messages of a valid cycle of ``src`` (as CycleMessage objects)."""
    with vdisk.open_disk(src, read_only=True) as d:
        size = d.virtual_size
        ranges = list(d.allocated_ranges())
        batches = group(blocks_for("os", ranges, size))
        head = header(rel, vm, seq, kind)
        head.disks.add(disk_id="os", virtual_size=size, format="vhdx")
        head.plan_digest = plan_digest(batches)
        head.batch_count = len(batches)
        enc = Encoder(compress=True)
        msgs: list[Any] = [replication_pb2.CycleMessage(header=head)]
        digest = CycleDigest()
        blocks = data_bytes = 0
        for i, batch in enumerate(batches):
            datas = [d.read(b.offset, b.length) for b in batch]
            e = enc.encode(i, batch, datas)
            msgs.append(replication_pb2.CycleMessage.FromString(e.message))
            for b, (k, dg) in zip(batch, e.kinds_digests, strict=True):
                digest.add(BlockRef(b.disk_id, b.offset, b.length), k, dg)
                blocks += 1
            data_bytes += e.raw_bytes
        msgs.append(
            replication_pb2.CycleMessage(
                trailer=replication_pb2.CycleTrailer(
                    batch_count=len(batches),
                    block_count=blocks,
                    data_bytes=data_bytes,
                    cycle_digest=digest.digest(),
                )
            )
        )
    return msgs


def _bomb(declared: int) -> bytes:
    obj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=declared)
    chunk = bytes(MiB)
    out = [obj.compress(chunk) for _ in range(declared // MiB)]
    out.append(obj.flush())
    return b"".join(out)


_BOMB: dict[int, bytes] = {}


def bomb() -> bytes:
    """A 1 GiB zero frame that declares its size (made once per run: it takes a second)."""
    if 1 not in _BOMB:
        _BOMB[1] = _bomb(1 << 30)
    return _BOMB[1]


# -- mutations ---------------------------------------------------------------------------------

u64 = st.one_of(
    st.integers(0, 8), st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1, DISK])
)
u32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1), st.sampled_from([BLOCK, BLOCK + 1]))


@st.composite
def mutate_header(draw: st.DrawFn, h: replication_pb2.CycleHeader) -> None:
    field = draw(
        st.sampled_from(
            ["disk_id", "size", "sequence", "base", "epoch", "kind", "batch_count", "disks", "rel"]
        )
    )
    if field == "disk_id":
        h.disks[0].disk_id = draw(st.one_of(st.sampled_from(HOSTILE_IDS), st.text(max_size=40)))
    elif field == "size":
        h.disks[0].virtual_size = draw(u64)
    elif field == "sequence":
        h.sequence = draw(u64)
    elif field == "base":
        h.base_sequence = draw(u64)
    elif field == "epoch":
        h.epoch = draw(u64)
    elif field == "kind":
        h.kind = draw(st.integers(0, 7))  # type: ignore[assignment]
    elif field == "batch_count":
        h.batch_count = draw(u64)
    elif field == "disks":
        for disk_id in draw(st.lists(st.sampled_from(HOSTILE_IDS), max_size=4)):
            h.disks.add(disk_id=disk_id, virtual_size=draw(u64), format=draw(st.text(max_size=6)))
    else:
        h.relationship_id = draw(st.sampled_from(["control", "nope", "", "x" * 1000]))


@st.composite
def mutate_batch(draw: st.DrawFn, b: replication_pb2.BlockBatch) -> None:
    field = draw(
        st.sampled_from(
            ["index", "codec", "raw", "flip", "truncate", "bomb", "block", "drop_block", "extra"]
        )
    )
    if field == "index":
        b.index = draw(u64)
    elif field == "codec":
        b.codec = draw(st.integers(0, 5))  # type: ignore[assignment]
    elif field == "raw":
        b.raw_length = draw(u32)
    elif field == "flip" and b.payload:
        data = bytearray(b.payload)
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
        b.payload = bytes(data)
    elif field == "truncate":
        b.payload = b.payload[: draw(st.integers(0, len(b.payload)))]
    elif field == "bomb":
        b.codec = replication_pb2.CODEC_ZSTD
        b.payload = bomb()
    elif field == "block" and b.blocks:
        blk = b.blocks[draw(st.integers(0, len(b.blocks) - 1))]
        what = draw(st.sampled_from(["disk", "offset", "length", "kind", "digest"]))
        if what == "disk":
            blk.disk_id = draw(st.sampled_from(HOSTILE_IDS))
        elif what == "offset":
            blk.offset = draw(u64)
        elif what == "length":
            blk.length = draw(u32)
        elif what == "kind":
            blk.kind = draw(st.integers(0, 5))  # type: ignore[assignment]
        else:
            blk.digest = draw(st.binary(max_size=40))
    elif field == "drop_block" and b.blocks:
        del b.blocks[draw(st.integers(0, len(b.blocks) - 1))]
    else:
        b.blocks.add(disk_id=draw(st.sampled_from(HOSTILE_IDS)), offset=draw(u64), length=BLOCK)


def mutated_stream(base: list[Any]) -> st.SearchStrategy[list[bytes]]:
    """Serialized messages of mutated copies of ``base`` (closed over, so that hypothesis
    does not print the whole cycle in every report)."""

    @st.composite
    def strategy(draw: st.DrawFn) -> list[bytes]:
        msgs: list[Any] = [type(m).FromString(m.SerializeToString()) for m in base]

        def find(body: str) -> list[int]:
            return [
                i
                for i, m in enumerate(msgs)
                if not isinstance(m, bytes) and m.WhichOneof("body") == body
            ]

        for _ in range(draw(st.integers(1, 3))):
            op = draw(
                st.sampled_from(
                    ["header", "batch", "trailer", "drop", "repeat", "swap", "garbage", "cut"]
                )
            )
            heads, batches, trailers = find("header"), find("batch"), find("trailer")
            if op == "header" and heads:
                draw(mutate_header(msgs[heads[0]].header))
            elif op == "batch" and batches:
                draw(mutate_batch(msgs[draw(st.sampled_from(batches))].batch))
            elif op == "trailer" and trailers:
                t = msgs[trailers[0]].trailer
                setattr(
                    t,
                    draw(st.sampled_from(["batch_count", "block_count", "data_bytes"])),
                    draw(u64),
                )
                if draw(st.booleans()):
                    t.cycle_digest = draw(st.binary(max_size=33))
            elif op == "drop" and len(msgs) > 1:
                del msgs[draw(st.integers(0, len(msgs) - 1))]
            elif op == "repeat" and msgs:
                i = draw(st.integers(0, len(msgs) - 1))
                msgs.insert(i, msgs[i])
            elif op == "swap" and len(msgs) > 1:
                i = draw(st.integers(0, len(msgs) - 2))
                msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
            elif op == "garbage":
                msgs.insert(draw(st.integers(0, len(msgs))), draw(st.binary(max_size=64)))
            elif op == "cut":
                msgs = msgs[: draw(st.integers(0, len(msgs)))]
        return [m if isinstance(m, bytes) else m.SerializeToString() for m in msgs]

    return strategy()


# -- the run -----------------------------------------------------------------------------------


class Fuzz:
    def __init__(self, site: Site, tmp: Path) -> None:
        self.site = site
        # A control replica that must never change, and a target relationship to fuzz.
        control_src = tmp / "control.vhdx"
        make_disk(control_src, DISK, seed=7, writes=8)
        site.grant("control", "vm-control")
        site.send_initial("control", "vm-control", control_src)
        self.control = site.replica_bytes("control")
        self.src = tmp / "target.vhdx"
        make_disk(self.src, DISK, seed=3, writes=6)
        self.base = {
            kind: _valid_cycle(self.src, "target", "vm-target", 1, kind)
            for kind in (replication_pb2.INITIAL,)
        }
        self.channel: grpc.Channel | None = None
        self.reconnect()
        self.outcomes: dict[str, int] = {}
        self.peak_before = site.peak_rss()
        self.generation = 0
        self.rel = "control"
        self.outside = self.outside_files()

    def reconnect(self) -> None:
        """A new connection per example: a mutant whose stream the receiver refused while we
        were still sending leaves that HTTP/2 stream half-open on our side until the
        connection closes (16 of them and the connection takes no more streams)."""
        if self.channel is not None:
            self.channel.close()
        self.channel = self.site.channel()
        self.cycle = self.channel.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=lambda b: b,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        self.digests = self.channel.stream_stream(
            "/sitepair.v1.Replication/Digests",
            request_serializer=lambda b: b,
            response_deserializer=replication_pb2.DigestBatch.FromString,
        )
        self.state = self.channel.stream_unary(
            "/sitepair.v1.Replication/GetState",
            request_serializer=lambda b: b,
            response_deserializer=replication_pb2.ReplicaState.FromString,
        )

    def fresh_target(self) -> None:
        """Each example fuzzes a new relationship, so a committed mutant does not stop the next
        example's valid base from being accepted."""
        self.generation += 1
        self.reconnect()
        self.rel = f"target-{self.generation}"
        self.site.grant(self.rel, "vm-target", disks=("os",))

    def note(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def send(self, stream: list[bytes]) -> None:
        def messages() -> Iterator[bytes]:
            yield from stream

        try:
            replies = list(self.cycle(messages(), timeout=30))
            kinds = [r.WhichOneof("body") for r in replies]
            refused = [r.refused.code for r in replies if r.WhichOneof("body") == "refused"]
            self.note(
                f"refused:{refused[0]}" if refused else ("+".join(sorted(set(kinds))) or "empty")
            )
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the receiver hung"
            assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()  # a handler crashed
            self.note(exc.code().name)

    def ask(self, rel: str, disk_id: str, block: int, epoch: int) -> None:
        req = replication_pb2.DigestsRequest(
            relationship_id=rel, disk_id=disk_id, block_size=block, epoch=epoch
        ).SerializeToString()
        try:
            n = sum(1 for _ in self.digests(iter([req]), timeout=30))
            self.note(f"digests:{n}")
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
            self.note(f"digests:{exc.code().name}")
        try:
            self.state(
                iter(
                    [replication_pb2.ReplicaStateRequest(relationship_id=rel).SerializeToString()]
                ),
                timeout=30,
            )
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)

    def outside_files(self) -> set[Path]:
        """Files of the replica host's home outside its replica folder (not walking into it:
        a long run holds thousands of replicas)."""
        home = self.site.homes["replica"]
        out: set[Path] = set()
        for top, dirs, files in os.walk(home):
            if Path(top) == home and "replicas" in dirs:
                dirs.remove("replicas")
            out.update(Path(top, f) for f in files)
        return out

    def check(self, *, everything: bool = False) -> None:
        """After each example: the control replica is intact, nothing appeared outside the
        replica folder but the agent's own state, and this example's replica (every replica,
        with ``everything``) reopens, recover() included."""
        site = self.site
        assert site.replica_bytes("control") == self.control
        new = self.outside_files() - self.outside
        assert {p for p in new if "state" not in p.parts} == set()
        folders = site.replicas.iterdir() if everything else [site.replicas / self.rel]
        for folder in folders:
            if folder.exists():
                ReplicaStore.open(folder)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


def run(site: Site, tmp: Path, examples: int) -> Fuzz:
    fz = Fuzz(site, tmp)
    bases = fz.base[replication_pb2.INITIAL]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        stream=mutated_stream(bases),
        digests=st.tuples(
            st.sampled_from(["control", "target-1", "nope", "x" * 500]),
            st.one_of(st.sampled_from(HOSTILE_IDS), st.text(max_size=20)),
            st.sampled_from([0, 1, 64, 4096, BLOCK, 1 << 20, 2 << 20, 2**32 - 1]),
            st.integers(0, 3),
        ),
    )
    def example(stream: list[bytes], digests: tuple[str, str, int, int]) -> None:
        fz.fresh_target()
        rewritten = []
        for raw in stream:
            try:
                m = replication_pb2.CycleMessage.FromString(raw)
            except Exception:  # garbage stays garbage
                rewritten.append(raw)
                continue
            if m.WhichOneof("body") == "header" and m.header.relationship_id == "target":
                m.header.relationship_id = fz.rel
                rewritten.append(m.SerializeToString())
            else:
                rewritten.append(raw)
        fz.send(rewritten)
        fz.ask(*digests)
        fz.check()

    try:
        example()
        fz.check(everything=True)
    finally:
        fz.close()
    return fz


def _assert_bounded(site: Site, fz: Fuzz) -> None:
    grown = site.peak_rss() - fz.peak_before
    assert grown < MEMORY_BOUND, f"the receiver's peak memory grew by {grown >> 20} MiB"


def test_fuzz_the_receiver(site: Site, tmp_path: Path) -> None:
    fz = run(site, tmp_path, DEFAULT_EXAMPLES)
    _assert_bounded(site, fz)
    # The run exercised refusals, not only one path.
    assert sum(v for k, v in fz.outcomes.items() if k.startswith("refused:")) > 0, fz.outcomes


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_the_receiver_long(site: Site, tmp_path: Path) -> None:
    fz = run(site, tmp_path, SLOW_EXAMPLES)
    _assert_bounded(site, fz)
    print("outcomes:", dict(sorted(fz.outcomes.items())))


def test_the_valid_base_cycle_commits(site: Site, tmp_path: Path) -> None:
    """The fuzzer's starting point is a valid cycle: unmutated, it commits byte for byte."""
    fz = Fuzz(site, tmp_path)
    try:
        fz.fresh_target()
        stream = []
        for m in fz.base[replication_pb2.INITIAL]:
            copy = type(m).FromString(m.SerializeToString())
            if copy.WhichOneof("body") == "header":
                copy.header.relationship_id = fz.rel
            stream.append(copy.SerializeToString())
        fz.send(stream)
        assert fz.outcomes == {"accepted+batch_ack+committed": 1} or fz.outcomes == {
            "accepted+committed": 1
        }, fz.outcomes
        with vdisk.open_disk(fz.src, read_only=True) as d:
            assert site.replica_bytes(fz.rel) == d.read(0, d.virtual_size)
    finally:
        fz.close()
