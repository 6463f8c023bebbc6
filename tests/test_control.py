"""The control stream: connect, inventory, heartbeats, commands exactly once, removal, restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent.control import AgentRemoved
from agent.hosts.directory import DirectoryBackend
from broker.client import AdminClient, wait_job
from broker.documents import decode_result
from sitepair import pki
from sitepair.errors import FailedPrecondition
from sitepair.v1 import admin_pb2, control_pb2, control_pb2_grpc
from tests.support.agents import AgentThread, register_agent
from tests.support.brokers import BrokerThread, create_key


def eventually(
    check: Callable[[], object], *, timeout: float = 20, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def server(admin: AdminClient, name: str) -> admin_pb2.Server:
    s: admin_pb2.Server = admin.call(admin.stub.GetServer, admin_pb2.GetServerRequest(server=name))
    return s


def test_agent_connects_reports_inventory_and_heartbeats(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    register_agent(
        credentials,
        home,
        name="hv-1",
        storage={"gold": str(tmp_path / "gold")},
        networks=[("corp", ["10.0.0.0/24"])],
    )
    (tmp_path / "gold").mkdir()
    backend = DirectoryBackend(home / "vms")
    backend.create_vm(
        "web01", disks=[("os", "vhdx", 64 << 20)], cpu=2, memory_mb=2048, nics=[("nic0", "corp")]
    )
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        s = eventually(
            lambda: (srv := server(admin, "hv-1")).inventory.vms and srv, what="inventory"
        )
        assert isinstance(s, admin_pb2.Server)
        assert s.state == "connected"
        vm = s.inventory.vms[0]
        assert (vm.name, vm.cpu_count, vm.memory_mb, vm.state) == ("web01", 2, 2048, "off")
        assert [(d.id, d.format, d.virtual_size) for d in vm.disks] == [("os", "vhdx", 64 << 20)]
        assert [(n.name, n.network) for n in vm.nics] == [("nic0", "corp")]
        assert [(n.name, list(n.subnets)) for n in s.inventory.networks] == [
            ("corp", ["10.0.0.0/24"])
        ]
        assert [st.name for st in s.inventory.storage] == ["gold"]
        assert s.facts.backend == "directory" and s.facts.cpu_count >= 1

        # Heartbeats carry psutil metrics into the store.
        s = eventually(
            lambda: (srv := server(admin, "hv-1")).metrics.memory_total_bytes and srv,
            what="metrics",
        )
        assert s.metrics.volumes and s.metrics.volumes[0].total_bytes > 0

        # A VM added on the host reaches the broker within a heartbeat or two.
        backend.create_vm("db01", disks=[("os", "vhd", 32 << 20)])
        eventually(lambda: len(server(admin, "hv-1").inventory.vms) == 2, timeout=10, what="new VM")
        names = sorted(v.name for v in server(admin, "hv-1").inventory.vms)
        assert names == ["db01", "web01"]
    finally:
        agent.stop()
    eventually(lambda: server(admin, "hv-1").state == "disconnected", what="disconnected on stop")


def test_ping_through_the_control_stream(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        job = admin.call(
            admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1", note="hello")
        )
        done = wait_job(admin, job.id)
        assert done.state == "succeeded", done
        assert json.loads(done.result_json) == {
            "host_id": ident.host_id,
            "name": "hv-1",
            "note": "hello",
        }
        assert [s.state for s in done.steps] == ["succeeded"]
    finally:
        agent.stop()


def _script_command(marker: Path) -> control_pb2.Command:
    return control_pb2.Command(
        run_script=control_pb2.RunScript(script="mark.py", args=[str(marker)], timeout_seconds=30)
    )


def _install_marker_script(home: Path) -> None:
    scripts = home / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "mark.py").write_text(
        "import sys, os\nwith open(sys.argv[1], 'a') as f:\n    f.write('ran\\n')\n"
    )


def test_command_sent_while_offline_is_delivered_once_after_reconnect(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    _install_marker_script(home)
    marker = tmp_path / "marker.txt"

    # The agent is offline: the command waits in the store, and the ping job says so.
    cmd = broker.loop.call(broker.ctx.dispatcher.submit(ident.host_id, _script_command(marker)))
    job = admin.call(admin.stub.PingServer, admin_pb2.PingServerRequest(server="hv-1"))
    eventually(
        lambda: (
            admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).state == "waiting"
        ),
        what="waiting",
    )
    assert (
        "offline"
        in admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id)).steps[0].message
    )

    # Connect, disconnect, reconnect a few times: the script runs exactly once.
    for _ in range(3):
        agent = AgentThread(home)
        try:
            agent.wait_connected()
            eventually(marker.exists, what="script ran")
            done = broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
            assert done.state.value == "succeeded"
            assert wait_job(admin, job.id).state == "succeeded"
        finally:
            agent.stop()
    assert marker.read_text() == "ran\n"


def test_redelivered_command_is_answered_from_the_journal(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    """The broker lost the ack (its record still says delivered): on the next stream the agent
    answers from its journal and the command does not run again."""
    import sqlite3

    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    _install_marker_script(home)
    marker = tmp_path / "marker.txt"
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        cmd = broker.loop.call(broker.ctx.dispatcher.submit(ident.host_id, _script_command(marker)))
        broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
    finally:
        agent.stop()
    with sqlite3.connect(broker.home.database) as db:
        db.execute(
            "UPDATE commands SET state = 'delivered', result_json = '' WHERE id = ?", (cmd.id,)
        )
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        done = broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
        assert done.state.value == "succeeded"
        result = decode_result("run_script", done.result_json).run_script
        assert result.script == "mark.py" and result.exit_status == 0  # from the journal
    finally:
        agent.stop()
    assert marker.read_text() == "ran\n"


def test_failed_script_reports_status_and_output(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    (home / "scripts").mkdir()
    (home / "scripts" / "fail.py").write_text("print('disk is on fire')\nraise SystemExit(3)\n")
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        cmd = broker.loop.call(
            broker.ctx.dispatcher.submit(
                ident.host_id,
                control_pb2.Command(run_script=control_pb2.RunScript(script="fail.py")),
            )
        )
        done = broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
        assert done.state.value == "failed"
        assert "status 3" in done.error and "disk is on fire" in done.error
        # A path outside the scripts folder is refused.
        cmd = broker.loop.call(
            broker.ctx.dispatcher.submit(
                ident.host_id,
                control_pb2.Command(run_script=control_pb2.RunScript(script="../x.py")),
            )
        )
        done = broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
        assert done.state.value == "failed" and "file name in the scripts folder" in done.error
        # A drill's check asks for the status in the result: the command succeeds with it, and
        # a script past its timeout is answered as timed out, not as an error.
        (home / "scripts" / "slow.py").write_text(
            "import time\nprint('begun', flush=True)\ntime.sleep(60)\n"
        )
        for script, timeout in (("fail.py", 30), ("slow.py", 1)):
            cmd = broker.loop.call(
                broker.ctx.dispatcher.submit(
                    ident.host_id,
                    control_pb2.Command(
                        run_script=control_pb2.RunScript(
                            script=script, timeout_seconds=timeout, report_exit=True
                        )
                    ),
                )
            )
            done = broker.loop.call(broker.ctx.dispatcher.wait(cmd.id))
            assert done.state.value == "succeeded", done.error
            result = decode_result("run_script", done.result_json).run_script
            if script == "fail.py":
                assert (result.exit_status, result.timed_out) == (3, False)
                assert "disk is on fire" in result.output
            else:
                assert result.timed_out and result.exit_status != 0
                assert "begun" in result.output
    finally:
        agent.stop()


def test_silent_server_is_marked_disconnected(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    """A stream that says Hello and then nothing: after `missed` heartbeat intervals the broker
    marks the server disconnected and closes the stream."""
    ident = register_agent(credentials, tmp_path / "a", name="hv-1")
    channel = grpc.secure_channel(
        broker.control,
        ident.channel_credentials(),
        options=[("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)],
    )

    def messages():  # type: ignore[no-untyped-def]
        yield control_pb2.AgentMessage(hello=control_pb2.Hello())
        time.sleep(30)

    with channel:
        call = control_pb2_grpc.ControlStub(channel).Connect(messages(), timeout=25)
        first = next(call)
        assert first.WhichOneof("body") == "welcome"
        assert server(admin, "hv-1").state == "connected"
        started = time.monotonic()
        rest = list(call)  # ends when the broker closes the stream (the deadline is 25 s)
        assert rest == []
        # heartbeat 1 s x 3 missed: closed after roughly 3-4 s, long before the 25 s deadline.
        assert time.monotonic() - started < 20
    eventually(lambda: server(admin, "hv-1").state == "disconnected", what="disconnected")


def test_removed_server_is_refused(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        job = admin.call(admin.stub.RemoveServer, admin_pb2.RemoveServerRequest(server="hv-1"))
        assert job.state == "succeeded"
        assert [s.state for s in job.steps] == ["succeeded"] * 4
        # The agent is told it was removed and stops with that reason.
        with pytest.raises(AgentRemoved, match="removed"):
            agent.future.result(20)
    finally:
        agent.stop()
    # Its certificate is refused from now on: no stream, no renewal.
    with grpc.secure_channel(
        broker.control,
        ident.channel_credentials(),
        options=[("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME)],
    ) as ch:
        stub = control_pb2_grpc.ControlStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Renew(
                control_pb2.RenewRequest(csr_der=pki.make_csr(pki.generate_key(), "x")), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "removed" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Connect(iter([control_pb2.AgentMessage(hello=control_pb2.Hello())]), timeout=5)
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [
        s.name for s in admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
    ] == []
    removed = admin.call(
        admin.stub.ListServers, admin_pb2.ListServersRequest(include_removed=True)
    ).servers
    assert [(s.name, s.state) for s in removed] == [("hv-1", "removed")]
    with pytest.raises(FailedPrecondition, match="already removed"):
        admin.call(admin.stub.RemoveServer, admin_pb2.RemoveServerRequest(server=ident.host_id))

    # It may come back only as a new server, through a new key, with a new identity.
    creds2 = tmp_path / "c2.json"
    create_key(admin, creds2)
    ident2 = register_agent(creds2, tmp_path / "b", name="hv-1")
    assert ident2.host_id != ident.host_id


def test_renewal_issues_fresh_key_and_old_identity(
    broker: BrokerThread, admin: AdminClient, credentials: Path, tmp_path: Path
) -> None:
    home = tmp_path / "a"
    ident = register_agent(credentials, home, name="hv-1")
    agent = AgentThread(home)
    try:
        agent.wait_connected()
        renewed = agent.loop.call(agent.daemon.renewer.renew_now())
        assert renewed.host_id == ident.host_id
        assert renewed.key_pem != ident.key_pem
        assert renewed.cert.serial_number != ident.cert.serial_number
        assert pki.identity_from_cert(renewed.cert).id == ident.host_id
        on_disk = pki.load_private_key(home / "identity" / "agent.key")
        assert on_disk.public_key() == renewed.cert.public_key()
        s = server(admin, "hv-1")
        assert int(s.certificate_not_after.seconds) == int(renewed.not_after)
    finally:
        agent.stop()
    # The next start uses the renewed certificate.
    agent = AgentThread(home)
    try:
        agent.wait_connected()
    finally:
        agent.stop()


def test_broker_serving_certificate_reloads_without_restart(
    broker: BrokerThread, admin: AdminClient
) -> None:
    import socket
    import ssl

    def serving_serial() -> int:
        host, port = broker.control.rsplit(":", 1)
        ctx = ssl.create_default_context(cadata=broker.ctx.ca.pem.decode())
        ctx.check_hostname = False
        adm = broker.home.admin_dir
        ctx.load_cert_chain(adm / "admin.crt", adm / "admin.key")
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    before = serving_serial()
    # Force a renewal: pretend the file is old by issuing a new one the same way the broker does.
    (broker.home.server_cert).unlink()
    assert broker.ctx.server_cert.ensure_fresh()
    after = serving_serial()
    assert after != before
    assert admin.call(admin.stub.GetBrokerInfo, admin_pb2.GetBrokerInfoRequest()).vault == "test"
