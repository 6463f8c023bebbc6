"""The replica receiver, attacked as issue 11 found it could be.

The receiver runs as its own process (tests.replication.procs) with real mutual TLS; the
attackers are a compromised primary that holds a valid certificate and a grant for its *own* VM,
and an unauthenticated client on the ticket port. They speak the wire protocol through the
project's own stubs. On a07fb6b 19 of these 23 tests fail; the other four (garbage bytes, a zstd
frame that declares no size) guard paths that were already safe.
"""

from __future__ import annotations

import asyncio
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard

from agent import config as config_mod
from agent.hosts.directory import DirectoryBackend
from agent.replication.blocks import BLOCK
from agent.replication.replica import ReplicaStore
from agent.replication.sender import CycleRefused, ReplicaClient
from agent.replication.service import ReplicationService
from sitepair.clock import SYSTEM_CLOCK
from sitepair.errors import InvalidArgument, NotFound, PermissionDenied, SitepairError
from sitepair.v1 import control_pb2, replication_pb2
from tests.replication.test_cycles import header, make_disk
from tests.security.replica_site import LIMITS, MiB, Site


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "state.json"
    }


# -- hole 1: disk ids from the header -------------------------------------------------------


HOSTILE_DISK_IDS = [
    "../../victim/disks/os",
    "../victim",
    "/etc/passwd",
    "os/../../victim",
    "..\\..\\victim",
    "os\0x",
    "..",
    "data",  # a safe name, but not a disk of the grant
]


@pytest.mark.parametrize("disk_id", HOSTILE_DISK_IDS)
def test_a_primary_cannot_write_another_replica_through_disk_ids(
    site: Site, tmp_path: Path, disk_id: str
) -> None:
    victim_src = tmp_path / "victim.vhdx"
    make_disk(victim_src, 4 * MiB, seed=1)
    site.grant("victim", "vm-victim")
    site.send_initial("victim", "vm-victim", victim_src)
    before = files_under(site.replicas)
    victim = site.replica_bytes("victim")

    evil_src = tmp_path / "evil.vhdx"
    make_disk(evil_src, 4 * MiB, seed=2)
    site.grant("evil", "vm-evil")  # the attacker's own VM: a valid grant
    with pytest.raises(CycleRefused) as info:
        site.send_initial("evil", "vm-evil", evil_src, disk_id=disk_id)
    assert info.value.code in (replication_pb2.ERROR_BAD_HEADER, replication_pb2.ERROR_WRONG_DISKS)
    assert site.replica_bytes("victim") == victim
    after = files_under(site.replicas)
    assert {k: v for k, v in after.items() if k.startswith("victim")} == {
        k: v for k, v in before.items() if k.startswith("victim")
    }
    # Nothing was created outside the replica folders.
    assert not (site.homes["replica"] / "victim").exists()
    assert sorted(p.name for p in site.replicas.iterdir()) == ["evil", "victim"]


def test_a_grant_without_disks_still_refuses_paths(site: Site, tmp_path: Path) -> None:
    """Grants stored by an older agent name no disks: the name rule still holds."""
    src = tmp_path / "evil.vhdx"
    make_disk(src, 4 * MiB, seed=2)
    site.grant("old", "vm-old", disks=())
    with pytest.raises(CycleRefused) as info:
        site.send_initial("old", "vm-old", src, disk_id="../../victim/disks/os")
    assert info.value.code == replication_pb2.ERROR_BAD_HEADER
    site.send_initial("old", "vm-old", src, disk_id="os")  # a plain id is fine


def test_digests_cannot_read_another_replica(site: Site, tmp_path: Path) -> None:
    """The read oracle: a disk id that leads into another replica, then Digests on it."""
    victim_src = tmp_path / "victim.vhdx"
    make_disk(victim_src, 4 * MiB, seed=1)
    site.grant("victim", "vm-victim")
    site.send_initial("victim", "vm-victim", victim_src)
    evil_src = tmp_path / "evil.vhdx"
    make_disk(evil_src, 4 * MiB, seed=2)
    site.grant("evil", "vm-evil", disks=())
    traversal = "../../victim/disks/os"
    with pytest.raises(CycleRefused):
        site.send_initial("evil", "vm-evil", evil_src, disk_id=traversal)
    with site.client() as c:
        for disk_id in (traversal, "../../victim/disks/os/base.vhdx", "/etc/passwd"):
            with pytest.raises(NotFound):
                c.digests("evil", disk_id, epoch=1)
        # The victim's own digests stay available to its own source.
        theirs, _ = c.digests("victim", "os", epoch=1)
        assert len(theirs) == 4 * MiB // BLOCK


@pytest.mark.parametrize("block", [1, 64, 4096, 3 * BLOCK])
def test_digests_take_only_the_allowed_block_sizes(site: Site, tmp_path: Path, block: int) -> None:
    src = tmp_path / "d.vhdx"
    make_disk(src, 4 * MiB)
    site.grant("rel", "vm")
    site.send_initial("rel", "vm", src)
    with site.client() as c, pytest.raises(InvalidArgument, match="block size"):
        c.digests("rel", "os", epoch=1, block=block)


# -- hole 7: a refused cycle's epoch, replica file modes ---------------------------------------


def test_a_refused_cycle_cannot_fence_the_real_source(site: Site, tmp_path: Path) -> None:
    """In certificate mode the sender writes the epoch itself: a cycle with an epoch higher than
    the grant's, refused for its content, used to be recorded first and fenced the real source
    (every later cycle at the true epoch was refused as stale)."""
    site.grant("rel", "vm")
    bad = replication_pb2.BlockBatch(
        index=0, codec=replication_pb2.CODEC_NONE, raw_length=BLOCK, payload=bytes(BLOCK - 1) + b"x"
    )
    bad.blocks.add(disk_id="os", offset=0, length=BLOCK, digest=bytes(32))
    head = header("rel", "vm", 1, replication_pb2.INITIAL, epoch=99)
    head.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
    head.batch_count = 1
    with site.channel() as ch:
        call = ch.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=replication_pb2.CycleMessage.SerializeToString,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        try:
            replies = list(
                call(
                    iter(
                        [
                            replication_pb2.CycleMessage(header=head),
                            replication_pb2.CycleMessage(batch=bad),
                        ]
                    ),
                    timeout=30,
                )
            )
            assert any(r.WhichOneof("body") == "refused" for r in replies), replies
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "never granted" in (exc.details() or "")
    with site.client() as c:
        assert c.get_state("rel").epoch == 1
    src = tmp_path / "d.vhdx"
    make_disk(src, 4 * MiB)
    site.send_initial("rel", "vm", src)  # the real source, at the grant's epoch, still works
    assert ReplicaStore.open(site.replicas / "rel").state.epoch == 1


def test_replica_files_are_private(site: Site, tmp_path: Path) -> None:
    src = tmp_path / "d.vhdx"
    make_disk(src, 4 * MiB)
    site.grant("rel", "vm", recovery_points=2)
    site.send_initial("rel", "vm", src)
    root = site.replicas / "rel"
    disks = [p for p in root.rglob("*") if p.suffix in (".vhdx", ".avhdx")]
    assert len(disks) >= 2  # the base and the layer of the recovery point
    for p in disks:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in [root, *(q for q in root.rglob("*") if q.is_dir())]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


# -- hole 3: decompression bombs ---------------------------------------------------------------


def _bomb(size: int, *, declare: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes (about 32 KiB for 1 GiB)."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    obj = cctx.compressobj(size=size if declare else -1)
    chunk = bytes(MiB)
    out = [obj.compress(chunk) for _ in range(size // MiB)]
    out.append(obj.flush())
    return b"".join(out)


def _cycle_with(site: Site, rel: str, vm: str, batch: replication_pb2.BlockBatch) -> list[Any]:
    """An initial cycle with one hand-made batch; the replies until the stream ends."""
    head = header(rel, vm, 1, replication_pb2.INITIAL)
    head.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
    head.batch_count = 1
    msgs = [
        replication_pb2.CycleMessage(header=head),
        replication_pb2.CycleMessage(batch=batch),
        replication_pb2.CycleMessage(trailer=replication_pb2.CycleTrailer(batch_count=1)),
    ]
    with site.channel() as ch:
        call = ch.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=replication_pb2.CycleMessage.SerializeToString,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        return list(call(iter(msgs), timeout=60))


@pytest.mark.parametrize("declare", [True, False])
def test_a_zstd_bomb_is_refused_without_being_decompressed(site: Site, declare: bool) -> None:
    site.grant("rel", "vm")
    payload = _bomb(1 << 30, declare=declare)
    assert len(payload) < 256 * 1024
    batch = replication_pb2.BlockBatch(
        index=0, codec=replication_pb2.CODEC_ZSTD, raw_length=BLOCK, payload=payload
    )
    batch.blocks.add(disk_id="os", offset=0, length=BLOCK, digest=bytes(32))
    before = site.peak_rss()
    replies = _cycle_with(site, "rel", "vm", batch)
    grown = site.peak_rss() - before
    refused = [r.refused for r in replies if r.WhichOneof("body") == "refused"]
    assert refused and refused[0].code == replication_pb2.ERROR_BAD_DIGEST, replies
    # Before the fix the receiver's peak RSS grew by about 1 GiB with a declared size.
    assert grown < 128 * MiB, f"the receiver's peak grew by {grown >> 20} MiB"


# -- hole 2: silent calls ----------------------------------------------------------------------


def test_silent_unauthenticated_calls_cannot_stall_the_receiver(site: Site, tmp_path: Path) -> None:
    src = tmp_path / "d.vhdx"
    make_disk(src, 4 * MiB)
    site.grant("rel", "vm")
    release = threading.Event()

    def silence() -> Iterator[bytes]:
        release.wait(120)
        return
        yield b""  # never reached: a stream that sends nothing

    outcomes: list[str] = []
    lock = threading.Lock()

    def idle_call(method: str) -> None:
        with site.channel("ticket") as ch:
            call = ch.stream_stream(
                f"/sitepair.v1.Replication/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            try:
                list(call(silence(), timeout=90))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                outcomes.append(code)

    # Forty silent calls on the port that asks for no certificate: a cycle that never sends its
    # header, a state or digests request that never arrives.
    threads = [
        threading.Thread(target=idle_call, args=(("Cycle", "GetState", "Digests")[i % 3],))
        for i in range(40)
    ]
    for t in threads:
        t.start()
    try:
        # Replication on the certificate port is not affected at all ...
        with site.client() as c:
            assert c.get_state("rel", timeout=20).committed_sequence == 0
        site.send_initial("rel", "vm", src)
        # ... and every silent call ends by itself, refused at once or cancelled when its
        # first message did not come in time, while its client still holds it open.
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a silent call held a receiver thread"
        assert set(outcomes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, outcomes
        assert "RESOURCE_EXHAUSTED" in outcomes  # the caps refused most of them at once
    finally:
        release.set()
    # Once they are gone, the ticket port serves real work again.
    site.grant("t-rel", "t-vm", auth="ticket")
    with site.client("ticket", ticket_provider=lambda: site.ticket("t-rel", "t-vm")) as c:
        assert c.get_state("t-rel").committed_sequence == 0


def test_a_silent_authenticated_cycle_is_cancelled_and_kept_for_resume(
    site: Site, tmp_path: Path
) -> None:
    """A source that stops sending mid-cycle frees its thread after the idle timeout."""
    site.grant("rel", "vm")
    head = header("rel", "vm", 1, replication_pb2.INITIAL)
    head.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
    head.batch_count = 3
    release = threading.Event()

    def header_then_silence() -> Iterator[replication_pb2.CycleMessage]:
        yield replication_pb2.CycleMessage(header=head)
        release.wait(120)

    with site.channel() as ch:
        call = ch.stream_stream(
            "/sitepair.v1.Replication/Cycle",
            request_serializer=replication_pb2.CycleMessage.SerializeToString,
            response_deserializer=replication_pb2.CycleReply.FromString,
        )
        replies = []
        with pytest.raises(grpc.RpcError) as info:
            for r in call(header_then_silence(), timeout=90):
                replies.append(r.WhichOneof("body"))
        release.set()
    assert replies == ["accepted"]
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_one_host_cannot_take_every_thread(site: Site) -> None:
    """Authenticated calls are capped per source host: the rest of the pool stays free."""
    for i in range(LIMITS["per_host"] + 2):
        site.grant(f"r{i}", f"vm{i}")
    release = threading.Event()
    outcomes: list[str] = []

    def hold(i: int) -> None:
        head = header(f"r{i}", f"vm{i}", 1, replication_pb2.INITIAL)
        head.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
        head.batch_count = 1

        def msgs() -> Iterator[replication_pb2.CycleMessage]:
            yield replication_pb2.CycleMessage(header=head)
            release.wait(60)

        with site.channel() as ch:
            call = ch.stream_stream(
                "/sitepair.v1.Replication/Cycle",
                request_serializer=replication_pb2.CycleMessage.SerializeToString,
                response_deserializer=replication_pb2.CycleReply.FromString,
            )
            try:
                list(call(msgs(), timeout=60))
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(LIMITS["per_host"] + 2)]
    for t in threads:
        t.start()
    try:
        deadline = threading.Event()
        for _ in range(300):  # the two calls over the cap are refused at once
            if outcomes.count("RESOURCE_EXHAUSTED") >= 2:
                break
            deadline.wait(0.1)
        assert outcomes.count("RESOURCE_EXHAUSTED") == 2, outcomes
        # Another host's work still gets a thread while the first holds its share.
        site.grant("o-rel", "o-vm", source=site.idents["other"].host_id)
        with site.client(who="other") as c:
            assert c.get_state("o-rel").committed_sequence == 0
    finally:
        release.set()
        for t in threads:
            t.join(30)


# -- hole 4: revocation on the replica host ----------------------------------------------------


def test_a_revoked_host_is_refused_on_both_ports(site: Site, tmp_path: Path) -> None:
    src = tmp_path / "d.vhdx"
    make_disk(src, 4 * MiB)
    site.grant("rel", "vm")
    site.grant("t-rel", "t-vm", auth="ticket")
    site.send_initial("rel", "vm", src)
    primary = site.idents["primary"].host_id
    site.state.revoke_host(primary, reason="removed", now=SYSTEM_CLOCK.now())
    with site.client() as c, pytest.raises(PermissionDenied, match="removed from the vault"):
        c.get_state("rel")
    # The certificate is still valid for hours: it does not matter.
    assert site.idents["primary"].cert_pem
    with (
        site.client("ticket", ticket_provider=lambda: site.ticket("t-rel", "t-vm")) as c,
        pytest.raises(PermissionDenied, match="removed from the vault"),
    ):
        c.get_state("t-rel")
    # The replica it sent is kept: a failover may need it.
    assert site.replica_bytes("rel")


def test_the_receiver_survives_garbage(site: Site) -> None:
    """Malformed bytes on each method end in a clear status, and the receiver goes on."""
    site.grant("rel", "vm")
    with site.channel() as ch:
        for method in ("Cycle", "GetState", "Digests"):
            call = ch.stream_stream(
                f"/sitepair.v1.Replication/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            try:
                list(call(iter([b"\xff\xff\xff\x0f garbage"]), timeout=20))
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    with ReplicaClient(
        identity=site.idents["primary"],
        replica_host=site.idents["replica"].host_id,
        address=f"127.0.0.1:{site.ports['certificate']}",
        auth="certificate",
    ) as c:
        try:
            assert c.get_state("rel").committed_sequence == 0
        except SitepairError as exc:  # pragma: no cover - the assertion message says it all
            raise AssertionError(f"the receiver stopped serving: {exc}") from exc


# -- hole 1: the replica folder a broker command names -----------------------------------------


def _service(site: Site) -> ReplicationService:

    home = site.homes["other"]  # a registered host whose agent is not running
    config = config_mod.load(home)
    return ReplicationService(
        home=home,
        config=config,
        backend=DirectoryBackend(home / "vms"),
        identity=lambda: site.idents["other"],
        clock=SYSTEM_CLOCK,
    )


def test_a_configuration_without_an_authentication_mode_is_refused(site: Site) -> None:
    """A ConfigureReplica or ConfigureSource that names no AuthMode (an unset field, or one this
    agent does not know) is refused, and nothing is granted or started."""
    service = _service(site)
    replica = control_pb2.ConfigureReplica(
        relationship_id="rel-x", vm_id="vm-x", source_host=site.idents["primary"].host_id
    )
    source = control_pb2.ConfigureSource(relationship_id="rel-y", vm_id="vm-y")
    try:
        for mode, shown in ((control_pb2.AUTH_MODE_UNSPECIFIED, "none"), (7, "unknown mode 7")):
            replica.auth = source.auth = mode  # type: ignore[assignment]
            with pytest.raises(InvalidArgument, match=f"authentication mode .*{shown}"):
                asyncio.run(service.configure_replica(replica))
            with pytest.raises(InvalidArgument, match=f"authentication mode .*{shown}"):
                asyncio.run(service.configure_source(source))
        assert service.state.grant("rel-x") is None and service.state.source("rel-y") is None
    finally:
        service.state.close()


@pytest.mark.parametrize(
    "folder",
    ["/etc/sitepair-x", "../outside", "replicas/../../outside", "replicas", "a\0b"],
)
def test_a_replica_folder_outside_the_replica_locations_is_refused(
    site: Site, tmp_path: Path, folder: str
) -> None:
    service = _service(site)
    home = site.homes["other"]
    if folder.startswith(("..", "replicas")):
        folder = str(home / folder)
    cmd = control_pb2.ConfigureReplica(
        relationship_id="rel-x",
        vm_id="vm-x",
        vm_name="x",
        source_host=site.idents["primary"].host_id,
        epoch=1,
        folder=folder,
        auth=control_pb2.AUTH_CERTIFICATE,
    )
    cmd.disks.add(disk_id="os", virtual_size=4 * MiB, format="vhdx")
    try:
        with pytest.raises((PermissionDenied, InvalidArgument)):
            asyncio.run(service.configure_replica(cmd))
        assert service.state.grant("rel-x") is None
        assert not (home.parent / "outside").exists()
        # Below the default replica path it is accepted, with the disks of the grant.
        cmd.folder = str(home / "replicas" / "rel-x")
        asyncio.run(service.configure_replica(cmd))
        grant = service.state.grant("rel-x")
        assert grant is not None and [d.disk_id for d in grant.disks] == ["os"]
        # A symlink planted below it that leads out is refused too.
        (home / "replicas").mkdir(exist_ok=True)
        (home / "replicas" / "link").symlink_to(tmp_path)
        cmd.relationship_id = "rel-y"
        cmd.folder = str(home / "replicas" / "link" / "rel-y")
        with pytest.raises(PermissionDenied):
            asyncio.run(service.configure_replica(cmd))
    finally:
        service.state.close()
