"""Rotating the vault's CA without re-registering a host (docs/security.md, "Rotating the CA").

Real brokers (a ``serve`` process, or one in a thread where the test plays a compromised
broker), real agents in threads with the directory backend, real mutual TLS on every port.
"""

from __future__ import annotations

import json
import random
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent.identity import AgentIdentity
from broker import backup as backup_mod
from broker.ca import CertificateAuthority, Phase
from broker.cli import main as cli_main
from broker.client import AdminClient, wait_job
from broker.home import BrokerHome
from sitepair import pki, vdisk
from sitepair.clock import OffsetClock
from sitepair.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)
from tests.operator.test_backup import protected_site  # noqa: F401 - fixture
from tests.protection.conftest import Sites, eventually
from tests.protection.test_walkthrough import replica_content
from tests.store_pg.conftest import pg_cluster, pg_dsn  # noqa: F401 - fixtures
from tests.store_pg.test_brokers import _copy, _init
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerProcess, BrokerThread, create_key, make_home


def ca(capsys: pytest.CaptureFixture[str], home: BrokerHome, *args: str, status: int = 0) -> Any:
    """One ``sitepair-broker ca ...`` command as the home's operator: its JSON output, or its
    standard error when it fails."""
    try:
        got = cli_main(["ca", *args, "--home", str(home.root), "--json"])
    except SystemExit as exc:
        got = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert got == status, (args, out, err)
    return json.loads(out) if status == 0 else err


def all_hosts(capsys: pytest.CaptureFixture[str], home: BrokerHome, field: str) -> bool:
    hosts = ca(capsys, home, "status")["hosts"]
    return bool(hosts) and all(h[field] for h in hosts)


def run_cycle(broker: BrokerProcess, s: Sites, seed: int) -> None:
    """Change web01's disk on its primary, and replicate it over 8084 now."""
    rng = random.Random(seed)
    with s.hosts["hv-a1"].backend.open_writer("web01") as w:
        w.write("os", rng.randrange(0, 3 << 20), rng.randbytes(65536))
        w.flush()
    with broker.admin() as a:
        job = a.call(
            a.stub.ReplicationAction, admin_pb2.ReplicationActionRequest(vm="web01", action="cycle")
        )
        done = wait_job(a, job.id)
        assert done.state == "succeeded", (done.error, [(x.name, x.message) for x in done.steps])
        rel = a.call(a.stub.GetProtected, admin_pb2.ProtectedRef(vm="web01"))
        assert rel.policy.authentication == "certificate"  # 8084: certificates on both ends


def source_disk(s: Sites) -> bytes:
    chain = s.hosts["hv-a1"].backend.disk_chains("web01")["os"]
    with vdisk.open_disk(chain[-1], read_only=True) as d:
        return d.read(0, d.virtual_size)


def agent_certificate_of(
    ca_key_path: Path, ca_cert_path: Path, host_id: str
) -> tuple[bytes, bytes]:
    """A valid-looking agent certificate for ``host_id`` signed by the CA in those files."""
    key = pki.generate_key()
    cert = pki.issue_certificate(
        pki.load_private_key(ca_key_path),
        pki.load_cert(ca_cert_path),
        key.public_key(),
        pki.Identity(vault="test", role=pki.Role.AGENT, id=host_id, site="site-a"),
        common_name="hv-a1",
        now=time.time(),
        lifetime_seconds=3600,
        dns_names=(pki.agent_dns_name(host_id),),
    )
    return pki.key_to_pem(key), pki.cert_to_pem(cert)


def receiver_code(
    peer: AgentThread, key: bytes, cert: bytes, trust: x509.Certificate
) -> grpc.StatusCode:
    """The status a call to ``peer``'s certificate port (8084) with this certificate gets:
    UNAVAILABLE when the TLS handshake refuses it."""
    daemon = peer.daemon
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.cert_to_pem(trust), private_key=key, certificate_chain=cert
    )
    target = pki.agent_dns_name(daemon.identity.get().host_id)
    with grpc.secure_channel(
        f"127.0.0.1:{daemon.replication.ports['certificate']}",
        creds,
        options=[("grpc.ssl_target_name_override", target)],
    ) as ch:
        try:
            replication_pb2_grpc.ReplicationStub(ch).GetState(
                replication_pb2.ReplicaStateRequest(), timeout=5
            )
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


def test_whole_rotation_keeps_control_streams_and_replication(
    protected_site: tuple[BrokerProcess, Sites, list[AgentThread]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker, s, agents = protected_site
    home = broker.home
    old = pki.load_cert(home.ca_cert)
    streams = [a.daemon.control.sessions for a in agents]
    run_cycle(broker, s, seed=1)

    # start: a new CA beside the old one; every connected host confirms the bundle of both.
    started = ca(capsys, home, "rotate", "start")
    assert started["phase"] == "started" and started["generation"] == 1
    assert started["commands_sent"] == 2
    issuing = [c for c in started["certificates"] if c["issuing"]]
    assert [c["id"] for c in issuing] == [pki.key_id(old)]
    new_id = next(c["id"] for c in started["certificates"] if not c["issuing"])
    eventually(lambda: all_hosts(capsys, home, "bundle_current"), what="bundles confirmed")
    for h in s.hosts.values():
        ident = AgentIdentity.load(h.home)
        assert {pki.key_id(c) for c in ident.trusted} == {pki.key_id(old), new_id}
        assert ident.trust_generation == 1
        assert pki.issuer_id(ident.cert) == pki.key_id(old)  # still the old CA's certificate
    run_cycle(broker, s, seed=2)
    # A peer that confirmed the bundle takes a certificate of the new CA at once (hv-b1's
    # receiver reloads its trust, not only its own certificate).
    key, cert = agent_certificate_of(
        home.ca_dir / "next.key", home.ca_dir / "next.crt", s.hosts["hv-a1"].host_id
    )
    assert (
        receiver_code(agents[1], key, cert, pki.load_cert_pem(started["bundle_pem"].encode()))
        != grpc.StatusCode.UNAVAILABLE
    )

    # activate: the new CA issues; the broker, every host and the local operator get its
    # certificates, without a control stream being dropped.
    activated = ca(capsys, home, "rotate", "activate")
    assert activated["phase"] == "activated"
    assert [c["id"] for c in activated["certificates"] if c["issuing"]] == [new_id]
    assert "operators add" in activated["note"]
    eventually(lambda: all_hosts(capsys, home, "issuer_current"), what="hosts renewed")
    for h in s.hosts.values():
        assert pki.issuer_id(AgentIdentity.load(h.home).cert) == new_id
    assert pki.issuer_id(pki.load_cert(home.server_cert)) == new_id
    assert pki.issuer_id(pki.load_cert(home.admin_dir / "admin.crt")) == new_id
    run_cycle(broker, s, seed=3)
    assert [a.daemon.control.sessions for a in agents] == streams  # no reconnect at all

    # The phase survives a broker restart; agents reconnect once.
    broker.stop()
    broker.start()
    assert ca(capsys, home, "status")["phase"] == "activated"
    eventually(lambda: all(a.daemon.control.connected.is_set() for a in agents), what="reconnected")

    # finish: only the new CA is trusted; the old key is archived, private.
    finished = ca(capsys, home, "rotate", "finish")
    assert finished["phase"] == "none" and finished["generation"] == 3
    assert [c["id"] for c in finished["certificates"]] == [new_id]
    archive = home.ca_archive / pki.key_id(old)[:16]
    assert str(archive) in finished["note"]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    assert stat.S_IMODE((archive / "ca.key").stat().st_mode) == 0o600
    assert not (home.ca_dir / "previous.key").exists()
    eventually(lambda: all_hosts(capsys, home, "bundle_current"), what="final bundles")
    for h in s.hosts.values():
        assert [pki.key_id(c) for c in AgentIdentity.load(h.home).trusted] == [new_id]
    run_cycle(broker, s, seed=4)
    with broker.admin() as fresh:
        s.admin = fresh
        assert replica_content(s, "web01", "os") == source_disk(s)

    # A certificate of the old CA is refused now, by the broker and by a peer's receiver.
    a1 = s.hosts["hv-a1"].host_id
    key, cert = agent_certificate_of(archive / "ca.key", archive / "ca.crt", a1)
    bundle = pki.bundle_to_pem([pki.load_cert(home.ca_cert)])
    creds = grpc.ssl_channel_credentials(
        root_certificates=bundle, private_key=key, certificate_chain=cert
    )
    with grpc.secure_channel(
        broker.run_info()["control"],
        creds,
        options=[("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)],
    ) as ch:
        with pytest.raises(grpc.RpcError) as err:
            control_pb2_grpc.ControlStub(ch).Renew(control_pb2.RenewRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert receiver_code(agents[1], key, cert, pki.load_cert(home.ca_cert)) == (
        grpc.StatusCode.UNAVAILABLE
    )


# -- gates, refusals, attackers ----------------------------------------------------------------


@pytest.fixture
def hosts(broker: BrokerThread, admin: AdminClient, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Two registered hosts (not running yet)."""
    homes = {}
    for name in ("hv-1", "hv-2"):
        creds = tmp_path / f"{name}.json"
        create_key(admin, creds, site="site-a")
        homes[name] = tmp_path / name
        register_agent(creds, homes[name], name=name)
    yield homes


def test_activate_and_finish_are_refused_naming_the_hosts_left_behind(
    broker: BrokerThread, hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home = broker.home
    one = AgentThread(hosts["hv-1"])
    one.wait_connected()
    two: AgentThread | None = None
    try:
        ca(capsys, home, "rotate", "start")
        eventually(
            lambda: (
                [h["bundle_current"] for h in ca(capsys, home, "status")["hosts"]]
                in ([True, False], [False, True])
            ),
            what="hv-1's confirmation",
        )
        err = ca(capsys, home, "rotate", "activate", status=1)
        assert "1 host(s) have not confirmed the new trust bundle" in err
        assert "hv-2" in err and "hv-1" not in err and "--force" in err
        assert ca(capsys, home, "status")["phase"] == "started"  # nothing changed

        # hv-2 connects later: the bundle stored for it reaches it, and it confirms.
        two = AgentThread(hosts["hv-2"])
        two.wait_connected()
        eventually(lambda: all_hosts(capsys, home, "bundle_current"), what="hv-2 confirms")
        two.stop()
        two = None
        ca(capsys, home, "rotate", "activate")
        eventually(
            lambda: (
                [h["name"] for h in ca(capsys, home, "status")["hosts"] if h["issuer_current"]]
                == ["hv-1"]
            ),
            what="hv-1 renewed and said so",
        )
        assert pki.issuer_id(AgentIdentity.load(hosts["hv-1"]).cert) == broker.ctx.ca.id
        # hv-2 asks for a renewal and crashes before it stores the answer: the broker issued a
        # certificate of the new CA, but hv-2 still holds the old one, and finish must say so.
        target = [("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)]
        offline = AgentIdentity.load(hosts["hv-2"])
        with grpc.secure_channel(
            broker.control, offline.channel_credentials(), options=target
        ) as ch:
            csr = pki.make_csr(pki.generate_key(), "hv-2")
            lost = control_pb2_grpc.ControlStub(ch).Renew(
                control_pb2.RenewRequest(csr_der=csr), timeout=5
            )
        assert pki.issuer_id(pki.load_cert_pem(lost.certificate_pem)) == broker.ctx.ca.id
        err = ca(capsys, home, "rotate", "finish", status=1)
        assert "1 host(s) still hold a certificate of the old CA" in err
        assert "hv-2" in err and "hv-1" not in err
        assert broker.ctx.ca.phase == Phase.ACTIVATED

        # Forced: hv-2, still holding the old CA's certificate, is refused from then on.
        ca(capsys, home, "rotate", "finish", "--force")
        left_behind = AgentIdentity.load(hosts["hv-2"])
        with grpc.secure_channel(
            broker.control, left_behind.channel_credentials(), options=target
        ) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                control_pb2_grpc.ControlStub(ch).Renew(control_pb2.RenewRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        renewed = AgentIdentity.load(hosts["hv-1"])
        with grpc.secure_channel(
            broker.control, renewed.channel_credentials(), options=target
        ) as ch:
            csr = pki.make_csr(pki.generate_key(), "hv-1")
            got = control_pb2_grpc.ControlStub(ch).Renew(
                control_pb2.RenewRequest(csr_der=csr), timeout=5
            )
            assert pki.issuer_id(pki.load_cert_pem(got.certificate_pem)) == broker.ctx.ca.id
        assert one.daemon.control.connected.is_set()
    finally:
        one.stop()
        if two is not None:
            two.stop()


def _command(broker: BrokerThread, host_id: str, bundle: control_pb2.TrustBundle) -> Any:
    """Send a TrustBundle command as a compromised broker would, and wait for its outcome."""
    ctx = broker.ctx
    cmd = broker.loop.call(ctx.dispatcher.submit(host_id, control_pb2.Command(trust_bundle=bundle)))
    return broker.loop.call(ctx.dispatcher.wait(cmd.id, poll=0.5))


def test_an_agent_refuses_a_bundle_without_its_current_anchor(
    broker: BrokerThread, hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    agent = AgentThread(hosts["hv-1"])
    agent.wait_connected()
    try:
        ident = agent.daemon.identity.get()
        before = (hosts["hv-1"] / "identity" / "ca.crt").read_bytes()
        _, foreign = pki.create_ca("test", now=time.time())
        done = _command(
            broker,
            ident.host_id,
            control_pb2.TrustBundle(bundle_pem=pki.cert_to_pem(foreign), generation=9),
        )
        assert done.state.value == "failed"
        assert "does not hold the CA that issued this host's certificate" in done.error
        garbage = _command(
            broker, ident.host_id, control_pb2.TrustBundle(bundle_pem=b"x" * 70000, generation=9)
        )
        assert garbage.state.value == "failed" and "larger than 64 KiB" in garbage.error
        leaf = _command(
            broker,
            ident.host_id,
            control_pb2.TrustBundle(bundle_pem=ident.cert_pem + ident.ca_pem, generation=9),
        )
        assert leaf.state.value == "failed" and "not a CA" in leaf.error
        # Nothing changed: same anchor on disk and in memory, still connected, still renews.
        assert (hosts["hv-1"] / "identity" / "ca.crt").read_bytes() == before
        assert agent.daemon.identity.get().trust_generation == 0
        agent.loop.call(agent.daemon.renewer.renew_now())
        assert agent.daemon.control.connected.is_set()
        # The operator sees why.
        status = ca(capsys, broker.home, "status")
        assert "not a CA" in next(h for h in status["hosts"] if h["name"] == "hv-1")["error"]

        # A legitimate rotation, then an older bundle redelivered late: ignored.
        ca(capsys, broker.home, "rotate", "start")
        eventually(lambda: agent.daemon.identity.get().trust_generation == 1, what="bundle stored")
        old_only = _command(
            broker, ident.host_id, control_pb2.TrustBundle(bundle_pem=before, generation=0)
        )
        assert old_only.state.value == "succeeded"
        assert len(agent.daemon.identity.get().trusted) == 2
    finally:
        agent.stop()


def test_an_unauthenticated_client_or_an_agent_gets_nothing(
    broker: BrokerThread, hosts: dict[str, Path]
) -> None:
    ca_pem = broker.ctx.ca.pem
    target = [("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)]
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    for address in (broker.control, broker.enrollment):
        with grpc.secure_channel(address, no_cert, options=target) as ch:
            stub = admin_pb2_grpc.CertificateAuthorityStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetCaStatus(admin_pb2.GetCaStatusRequest(), timeout=5)
            assert err.value.code() in (
                grpc.StatusCode.UNAVAILABLE,  # the control port wants a client certificate
                grpc.StatusCode.UNIMPLEMENTED,  # the enrollment port has no such service
            )
            with pytest.raises(grpc.RpcError):
                stub.RotateCa(
                    admin_pb2.RotateCaRequest(phase=admin_pb2.RotateCaRequest.START), timeout=5
                )
    # An agent's certificate is not an operator's.
    ident = AgentIdentity.load(hosts["hv-1"])
    with grpc.secure_channel(broker.control, ident.channel_credentials(), options=target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.CertificateAuthorityStub(ch).RotateCa(
                admin_pb2.RotateCaRequest(phase=admin_pb2.RotateCaRequest.START), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert broker.ctx.ca.phase == Phase.NONE
    assert not (broker.home.ca_dir / "next.key").exists()


# -- state on disk -----------------------------------------------------------------------------


def test_backup_carries_the_rotation_and_restore_resumes_it(
    broker: BrokerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ca(capsys, broker.home, "rotate", "start")
    backup_mod.backup(broker.home, tmp_path / "backup")
    restored = BrokerHome(tmp_path / "restored")
    backup_mod.restore(tmp_path / "backup", restored.root)
    again = CertificateAuthority.load(restored, "test")
    assert again.phase == Phase.STARTED and again.generation == 1
    assert [pki.key_id(c) for c in again.bundle] == [pki.key_id(c) for c in broker.ctx.ca.bundle]
    assert stat.S_IMODE((restored.ca_dir / "next.key").stat().st_mode) == 0o600


def test_an_activation_interrupted_anywhere_is_completed_on_load(tmp_path: Path) -> None:
    home = BrokerHome(tmp_path / "home")
    ca_ = CertificateAuthority.create(home, "test", now=time.time())
    old = ca_.id
    ca_.start_rotation(time.time())
    new = pki.key_id(ca_.bundle[1])
    # As activate_rotation does, stopped after its first file move.
    (home.ca_dir / "rotation.json").write_text(json.dumps({"phase": "activating", "generation": 1}))
    home.ca_key.replace(home.ca_dir / "previous.key")
    loaded = CertificateAuthority.load(home, "test")
    assert loaded.phase == Phase.ACTIVATED and loaded.generation == 2
    assert loaded.id == new and [pki.key_id(c) for c in loaded.bundle] == [new, old]
    assert loaded.key.public_key() == loaded.cert.public_key()
    assert not (home.ca_dir / "next.key").exists()
    # And a finish stopped half way.
    (home.ca_dir / "rotation.json").write_text(json.dumps({"phase": "finishing", "generation": 2}))
    folder = home.ca_archive / old[:16]
    folder.mkdir(parents=True)
    (home.ca_dir / "previous.key").replace(folder / "ca.key")
    loaded = CertificateAuthority.load(home, "test")
    assert loaded.phase == Phase.NONE and loaded.generation == 3
    assert [pki.key_id(c) for c in loaded.bundle] == [new]
    assert (folder / "ca.crt").exists() and (folder / "ca.key").exists()


def test_a_host_registered_mid_rotation_gets_the_bundle_and_the_operator_sees_it(
    broker: BrokerThread,
    admin: AdminClient,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ca(capsys, broker.home, "rotate", "start")
    creds = tmp_path / "late.json"
    create_key(admin, creds, site="site-a")
    register_agent(creds, tmp_path / "late", name="hv-late")
    agent = AgentThread(tmp_path / "late")
    agent.wait_connected()
    try:
        eventually(lambda: all_hosts(capsys, broker.home, "bundle_current"), what="confirmed")
        assert len(agent.daemon.identity.get().trusted) == 2
        # The text views an operator reads, and the bundle for an operator's profile.
        assert cli_main(["ca", "status", "--home", str(broker.home.root)]) == 0
        out = capsys.readouterr().out
        assert "phase        started (generation 1)" in out
        assert "hv-late" in out and "current" in out and "issuing" in out and "trusted" in out
        bundle = tmp_path / "profile-ca.crt"
        assert (
            cli_main(["ca", "bundle", "--out", str(bundle), "--home", str(broker.home.root)]) == 0
        )
        assert {pki.key_id(c) for c in x509.load_pem_x509_certificates(bundle.read_bytes())} == {
            pki.key_id(c) for c in broker.ctx.ca.bundle
        }
    finally:
        agent.stop()


def test_an_agent_without_rotation_is_named_and_a_forced_finish_ends_its_stream(
    broker: BrokerThread, hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home = broker.home
    one, two = AgentThread(hosts["hv-1"]), AgentThread(hosts["hv-2"])
    # hv-2 plays an agent from before CA rotation: it has no handler for the command.
    two.daemon.executor._handlers.pop("trust_bundle")
    try:
        one.wait_connected()
        two.wait_connected()
        ca(capsys, home, "rotate", "start")

        def hv2() -> dict[str, Any]:
            status = ca(capsys, home, "status")
            found: dict[str, Any] = next(h for h in status["hosts"] if h["name"] == "hv-2")
            return found

        eventually(lambda: "does not know the command" in hv2()["error"], what="hv-2 refuses")
        assert "hv-2" in ca(capsys, home, "rotate", "activate", status=1)
        ca(capsys, home, "rotate", "activate", "--force")
        eventually(
            lambda: pki.issuer_id(one.daemon.identity.get().cert) == broker.ctx.ca.id,
            what="hv-1 renewed",
        )
        err = ca(capsys, home, "rotate", "finish", status=1)
        assert "hv-2" in err and "hv-1" not in err
        assert two.daemon.control.connected.is_set()  # its stream predates the rotation
        ca(capsys, home, "rotate", "finish", "--force")
        eventually(lambda: not hv2()["connected"], what="hv-2's stream ended")
        assert one.daemon.control.connected.is_set()
    finally:
        one.stop()
        two.stop()


def test_the_ca_expiry_metric_follows_the_issuing_ca(tmp_path: Path) -> None:
    # The broker's clock runs two days ahead, so the new CA expires two days after the old one.
    home = make_home(tmp_path / "broker")
    broker = BrokerThread(home, clock=OffsetClock(2 * 86400))
    try:
        metrics = broker.broker.metrics
        assert metrics is not None

        def ca_expiry() -> float | None:
            return metrics.registry.get_sample_value(
                "sitepair_broker_certificate_expiry_timestamp_seconds", {"certificate": "ca"}
            )

        old = pki.not_after(broker.ctx.ca.cert)
        assert ca_expiry() == old
        Request = admin_pb2.RotateCaRequest
        for phase in (Request.START, Request.ACTIVATE):
            broker.loop.call(broker.ctx.ca_rotation.rotate(phase, force=False, by="test"))
        assert ca_expiry() == pki.not_after(broker.ctx.ca.cert) > old + 86400
    finally:
        broker.stop()


def test_brokers_sharing_postgresql_follow_a_rotation_copied_between_their_homes(
    pg_dsn: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The procedure docs/security.md gives for several brokers: each phase on one broker, then
    its ca/ folder copied into the other's home and that broker restarted."""
    home1 = _init(tmp_path / "b1", pg_dsn)
    first = BrokerThread(home1)
    home2 = _copy(home1, tmp_path / "b2")
    second = BrokerThread(home2)
    agent: AgentThread | None = None
    try:
        creds = tmp_path / "hv.json"
        with first.admin() as a:
            create_key(a, creds, site="site-a")
        register_agent(creds, tmp_path / "hv", name="hv-1")
        agent = AgentThread(tmp_path / "hv")
        agent.wait_connected()
        for phase in ("start", "activate"):
            ca(capsys, home1, "rotate", phase)
            second.stop()
            shutil.rmtree(home2.ca_dir)
            shutil.copytree(home1.ca_dir, home2.ca_dir)
            second = BrokerThread(home2)
            one, two = ca(capsys, home1, "status"), ca(capsys, home2, "status")
            assert (two["phase"], two["bundle_sha256"]) == (one["phase"], one["bundle_sha256"])
        # What the host confirmed through the first broker, the second reads from the store.
        eventually(
            lambda: (
                all_hosts(capsys, home2, "bundle_current")
                and all_hosts(capsys, home2, "issuer_current")
            ),
            what="hv-1 renewed by the new CA, seen by the second broker",
        )
        # The second broker serves a certificate of the new CA and takes the host's new one.
        new_id = second.ctx.ca.id
        assert pki.issuer_id(pki.load_cert(home2.server_cert)) == new_id
        ident = AgentIdentity.load(tmp_path / "hv")
        target = [("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)]
        with grpc.secure_channel(second.control, ident.channel_credentials(), options=target) as ch:
            got = control_pb2_grpc.ControlStub(ch).Renew(
                control_pb2.RenewRequest(csr_der=pki.make_csr(pki.generate_key(), "hv-1")),
                timeout=5,
            )
        assert pki.issuer_id(pki.load_cert_pem(got.certificate_pem)) == new_id
    finally:
        if agent is not None:
            agent.stop()
        second.stop()
        first.stop()
