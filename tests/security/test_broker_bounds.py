"""No single agent can blind the broker: what agents send is bounded, lists page.

Written as an attacker acts. A host is enrolled for real (registration key, CSR, certificate),
then its certificate opens a raw control stream and the project's own stubs speak the wire
protocol, sending what no real agent would: megabytes of Hello facts and heartbeat metrics, a
huge inventory, and VMs whose ids and names are paths, NULs and control characters. Afterwards
every operator list must still answer and page, the hostile VMs must not be in the store, and
the broker's memory and log must not have grown with what was sent. Data an older broker stored
before the bounds existed must not break listing either, and an unauthenticated registration
with a 250,000-character key id must not write its size into the log.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import psutil
import pytest

from broker.cli import main as cli_main
from broker.client import AdminClient, Page, PageRequest
from broker.store.models import (
    InventoryVm,
    Job,
    JobState,
    Relationship,
    RelationshipState,
    Server,
    StoredInventory,
)
from sitepair import PROTOCOL_VERSION, paths, pki
from sitepair.errors import InvalidArgument
from sitepair.rpc import CONTROL_MAX_RECEIVE
from sitepair.v1 import (
    admin_pb2,
    common_pb2,
    control_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
)
from tests.security.control_site import BIG_CHANNEL, MIB, RawStream, eventually, hello
from tests.support.agents import register_agent
from tests.support.brokers import BrokerProcess, BrokerThread, create_key


def _vm(
    vm_id: str, name: str, *, disk_id: str = "os", disk_path: str = ""
) -> common_pb2.VirtualMachine:
    return common_pb2.VirtualMachine(
        id=vm_id,
        name=name,
        generation=2,
        cpu_count=2,
        memory_mb=2048,
        state="off",
        disks=[
            common_pb2.VirtualDiskRef(
                id=disk_id,
                path=disk_path or f"/srv/vms/{vm_id}/disks/{disk_id}.vhdx",
                format="vhdx",
                virtual_size=64 * MIB,
            )
        ],
        nics=[common_pb2.VmNic(name="nic0", network="corp", mac="00:15:5d:00:00:01")],
    )


#: VM ids a host controls that would lead out of a replica folder, or are not names at all.
HOSTILE_IDS = [
    "../../x",
    "..",
    ".",
    "/etc/passwd",
    "C:\\Windows\\System32",
    "\\\\server\\share",
    "a\x00b",
    "x/../../y",
    "CON",
    "nul.txt",
    "",
    "a" * 200,
    "-rf",
    "tab\there",
]
#: VM names that are not display names.
HOSTILE_NAMES = ["", "evil\x00name", "line\nbreak", "bell\x07", "\u202egnp.exe", "n" * 300]
LEGIT = [("vm-legit-1", "web01"), ("vm-legit-2", "Web Server 02 (prod)")]


def _hostile_inventory() -> common_pb2.Inventory:
    """Under the size cap, but every VM except the legitimate ones breaks a rule."""
    inv = common_pb2.Inventory(digest="ab" * 32)
    for vm_id in HOSTILE_IDS:
        inv.vms.append(_vm(vm_id, "innocent-name"))
    for i, name in enumerate(HOSTILE_NAMES):
        inv.vms.append(_vm(f"vm-badname-{i}", name))
    inv.vms.append(_vm("vm-baddisk-1", "bad disk 1", disk_id="../../etc"))
    inv.vms.append(_vm("vm-baddisk-2", "bad disk 2", disk_path="relative/disk.vhdx"))
    inv.vms.append(_vm("vm-baddisk-3", "bad disk 3", disk_path="/srv/a\x00b.vhdx"))
    many = _vm("vm-manydisks", "many disks")
    for i in range(300):  # more than any VM has (Hyper-V: 4 x 64 SCSI + 4 IDE)
        many.disks.add(id=f"d{i}", path=f"/srv/d{i}.vhdx", format="vhdx")
    inv.vms.append(many)
    # Bulk: thousands of VMs with names far over the cap, ~3 MiB in all.
    for i in range(1500):
        inv.vms.append(_vm(f"vm-bulk-{i}", "b" * 2000))
    for vm_id, name in LEGIT:
        inv.vms.append(_vm(vm_id, name))
    inv.vms.append(_vm("vm-legit-1", "duplicate of web01"))
    inv.networks.add(name="corp", subnets=["10.0.0.0/24"])
    inv.networks.add(name="bad\x00net")
    inv.storage.add(name="gold", path="/srv/gold", total_bytes=1 << 40, free_bytes=1 << 39)
    inv.storage.add(name="../escape", path="/srv/x")
    inv.storage.add(name="relative", path="srv/x")
    inv.storage.add(name="nulpath", path="/srv/\x00x")
    assert 3 * MIB < inv.ByteSize() < 4 * MIB
    return inv


def _server(admin: AdminClient, name: str) -> admin_pb2.Server:
    s: admin_pb2.Server = admin.call(admin.stub.GetServer, admin_pb2.GetServerRequest(server=name))
    return s


class _SizedPage(Page, Protocol):
    def ByteSize(self) -> int: ...


_RequestT = TypeVar("_RequestT", bound=PageRequest)
_PageT = TypeVar("_PageT", bound=_SizedPage)
_ItemT = TypeVar("_ItemT")


def _walk(
    admin: AdminClient,
    method: grpc.UnaryUnaryMultiCallable[_RequestT, _PageT],
    request: _RequestT,
    items: Callable[[_PageT], Iterable[_ItemT]],
) -> list[_ItemT]:
    """Every item of a paged list, asking for pages of 2, checking each page's size."""
    found: list[_ItemT] = []
    request.page_size = 2
    tokens: set[str] = set()
    while True:
        page = admin.call(method, request)
        got = list(items(page))
        assert len(got) <= 2
        assert page.ByteSize() < 8 * MIB
        found += got
        if not page.next_page_token:
            return found
        assert page.next_page_token not in tokens
        tokens.add(page.next_page_token)
        request.page_token = page.next_page_token


def test_one_agent_cannot_blind_the_broker(
    served: BrokerProcess, served_admin: AdminClient, tmp_path: Path
) -> None:
    admin = served_admin
    control = served.run_info()["control"]
    assert served.proc is not None
    broker_process = psutil.Process(served.proc.pid)
    creds = tmp_path / "creds.json"
    create_key(admin, creds, uses=2)
    good = register_agent(creds, tmp_path / "good", name="hv-good")
    evil = register_agent(creds, tmp_path / "evil", name="hv-evil")
    log_file = tmp_path / "broker.log"
    log_before = log_file.stat().st_size
    rss_before = broker_process.memory_info().rss

    # 1. A Hello with 7 MiB of facts: refused by the transport before it is read; one with
    # 1 MiB (under the control port's 4 MiB receive limit) by the facts cap. Nothing stored.
    for size, code in (
        (7 * MIB, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (1 * MIB, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        stream = RawStream(control, evil.channel_credentials())
        try:
            stream.send(hello=hello(common_pb2.HostFacts(hostname="h" * size)))
            with pytest.raises(grpc.RpcError) as err:
                stream.first()
            assert err.value.code() == code
            details = err.value.details() or ""
            assert len(details) < 1024
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert "host facts" in details
        finally:
            stream.close()

    # 2. A well-formed Hello, then megabytes of metrics, an oversized inventory and a hostile one.
    stream = RawStream(control, evil.channel_credentials())
    sent = 0
    try:
        stream.send(hello=hello())
        assert stream.first().WhichOneof("body") == "welcome"
        huge_metrics = common_pb2.HostMetrics(
            volumes=[common_pb2.VolumeMetrics(path="p" * 1024, total_bytes=1) for _ in range(3900)]
        )
        # Just under what the control port receives at all (4 MiB + 64 KiB).
        assert 3.5 * MIB < huge_metrics.ByteSize() < CONTROL_MAX_RECEIVE - 1024
        # More in all than the memory bound below: a broker that kept any of it would fail.
        for seq in range(1, 81):
            stream.send(heartbeat=control_pb2.Heartbeat(seq=seq, metrics=huge_metrics))
            sent += huge_metrics.ByteSize()
        # A sequence number past what the store's integers hold would fail the batch of every
        # agent's heartbeats written with it.
        stream.send(heartbeat=control_pb2.Heartbeat(seq=2**64 - 1))
        oversized = common_pb2.Inventory(
            digest="cd" * 32,
            vms=[_vm("vm-from-oversized", "oversized", disk_path="/" + "d" * (4 * MIB))],
        )
        stream.send(inventory=oversized)
        sent += oversized.ByteSize()
        hostile = _hostile_inventory()
        stream.send(inventory=hostile)
        sent += hostile.ByteSize()
        stream.send(
            heartbeat=control_pb2.Heartbeat(
                seq=5, metrics=common_pb2.HostMetrics(memory_total_bytes=424242)
            )
        )
        stream.send(ack=control_pb2.CommandAck(command_id="c" * (1 * MIB)))
        # The reader handles messages in order: the last heartbeat's metrics mean all is done.
        eventually(
            lambda: _server(admin, "hv-evil").metrics.memory_total_bytes == 424242,
            what="the last heartbeat",
        )

        # -- every list answers, and pages --
        servers = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
        assert sorted(s.name for s in servers) == ["hv-evil", "hv-good"]
        walked = _walk(
            admin, admin.stub.ListServers, admin_pb2.ListServersRequest(), lambda p: p.servers
        )
        assert sorted(s.name for s in walked) == ["hv-evil", "hv-good"]
        one = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest(page_size=1))
        assert len(one.servers) == 1 and one.next_page_token
        assert {
            s.name
            for s in admin.list_all(
                admin.stub.ListServers, admin_pb2.ListServersRequest(), lambda page: page.servers
            )
        } == {
            "hv-evil",
            "hv-good",
        }
        evil_view = _server(admin, "hv-evil")
        assert evil_view.facts.hostname == "evil"
        assert evil_view.vm_count == len(LEGIT)

        # -- the hostile VMs are not stored; the legitimate ones are --
        vms = _walk(admin, admin.stub.ListVms, admin_pb2.ListVmsRequest(), lambda p: p.vms)
        assert sorted((v.vm.id, v.vm.name) for v in vms) == sorted(LEGIT)
        assert [v.name for v in evil_view.inventory.vms] == [name for _, name in LEGIT]
        assert [s.name for s in evil_view.inventory.storage] == ["gold"]
        assert [n.name for n in evil_view.inventory.networks] == ["corp"]
        # What the store holds, read behind the broker's back.
        db = sqlite3.connect(f"file:{served.home.database}?mode=ro", uri=True)
        try:
            stored = db.execute(
                "SELECT vm_id, name, disks_json FROM vms WHERE server_id = ?", (evil.host_id,)
            ).fetchall()
            storage = db.execute(
                "SELECT name FROM host_storage WHERE server_id = ?", (evil.host_id,)
            ).fetchall()
            facts, metrics = db.execute(
                "SELECT facts_json, metrics_json FROM servers WHERE id = ?", (evil.host_id,)
            ).fetchone()
            (payload,) = db.execute(
                "SELECT payload FROM server_inventory WHERE server_id = ?", (evil.host_id,)
            ).fetchone()
        finally:
            db.close()
        for vm_id, name, disks_json in stored:
            paths.check_component(vm_id, "VM id")
            paths.check_display_name(name, "VM name")
            for disk in json.loads(disks_json):
                paths.check_component(disk["id"], "disk id")
                assert disk["path"].startswith("/srv/") and "\x00" not in disk["path"]
        assert sorted(vm_id for vm_id, _, _ in stored) == sorted(i for i, _ in LEGIT)
        assert storage == [("gold",)]
        assert len(facts) < 64 * 1024
        assert len(metrics) < 64 * 1024
        assert len(payload) < 64 * 1024
        for bad in HOSTILE_IDS:
            with pytest.raises(InvalidArgument):
                paths.check_component(bad, "VM id")

        # The other lists answer and page too.
        _walk(admin, admin.stub.ListJobs, admin_pb2.ListJobsRequest(), lambda p: p.jobs)
        _walk(admin, admin.stub.ListProtected, admin_pb2.ListProtectedRequest(), lambda p: p.vms)
        _walk(
            admin,
            admin.stub.ListRegistrationKeys,
            admin_pb2.ListRegistrationKeysRequest(include_inactive=True),
            lambda p: p.keys,
        )

        # The stream is still up: a hostile message is dropped, the agent is not disconnected.
        assert _server(admin, "hv-evil").state == "connected"
    finally:
        stream.close()

    # Heartbeats of other agents are still written (the huge sequence number broke nothing).
    agent_stream = RawStream(control, good.channel_credentials())
    try:
        agent_stream.send(hello=hello(common_pb2.HostFacts(hostname="good")))
        agent_stream.first()
        agent_stream.send(
            heartbeat=control_pb2.Heartbeat(
                seq=1, metrics=common_pb2.HostMetrics(memory_total_bytes=777)
            )
        )
        eventually(
            lambda: _server(admin, "hv-good").metrics.memory_total_bytes == 777,
            what="the other agent's heartbeat",
        )
    finally:
        agent_stream.close()

    # Removing the attacker leaves nothing that breaks listing the removed servers either.
    admin.call(admin.stub.RemoveServer, admin_pb2.RemoveServerRequest(server="hv-evil"))
    removed = admin.list_all(
        admin.stub.ListServers,
        admin_pb2.ListServersRequest(include_removed=True),
        lambda page: page.servers,
    )
    assert {(s.name, s.state) for s in removed} >= {("hv-evil", "removed")}

    # Memory and log did not grow with what was sent (~330 MiB): generous bounds, no timing.
    grown = broker_process.memory_info().rss - rss_before
    assert sent > 250 * MIB
    assert grown < 200 * MIB, f"broker process grew by {grown / MIB:.0f} MiB"
    logged = log_file.stat().st_size - log_before
    assert logged < 64 * 1024, f"the broker logged {logged} bytes"


# -- data an older broker stored ---------------------------------------------------------------


def _store_old_data(broker: BrokerThread) -> None:
    """What a broker without bounds would have stored for one hostile host, plus a vault bigger
    than one page."""
    now = time.time()
    old = Server(
        id="host-old",
        name="old-1",
        site="site-a",
        registered_at=now,
        registration_key_id="key-old",
        cert_serial="1",
        cert_not_after=now + 3600,
        facts_json=json.dumps({"hostname": "h" * (7 * MIB)}),
        metrics_json=json.dumps({"volumes": [{"path": "p" * (7 * MIB)}]}),
    )
    huge_inventory = common_pb2.Inventory(
        vms=[common_pb2.VirtualMachine(id="v", name="n" * (7 * MIB))]
    )
    with broker.ctx.store.write() as tx:
        tx.insert_server(old)
        for i in range(120):
            tx.insert_server(
                Server(
                    id=f"host-small-{i:03d}",
                    name=f"small-{i:03d}",
                    site="site-b",
                    registered_at=now,
                    registration_key_id="key-old",
                    cert_serial="1",
                    cert_not_after=now + 3600,
                )
            )
        tx.put_inventory(
            StoredInventory("host-old", "d", now, now, huge_inventory.SerializeToString())
        )
        big_disks = json.dumps(
            [{"id": "os", "path": "p" * (3 * MIB), "format": "vhdx", "virtual_size": 1}]
        )
        tx.replace_inventory(
            "host-old",
            [
                *(
                    InventoryVm(
                        "host-old",
                        f"vm-old-{i}",
                        f"old vm {i}",
                        2,
                        1,
                        1,
                        "off",
                        big_disks,
                        "[]",
                        now,
                    )
                    for i in range(4)
                ),
                InventoryVm("host-old", "vm-longname", "x" * 5000, 2, 1, 1, "off", "[]", "[]", now),
            ],
            [],
            [],
        )
        for i in range(4):
            tx.insert_job(
                Job(
                    id=f"job-old-{i}",
                    kind="refresh-server",
                    target="server/host-old",
                    state=JobState.SUCCEEDED,
                    created_at=now + i,
                    updated_at=now + i,
                    created_by="op",
                    result_json="r" * (3 * MIB),
                )
            )
            tx.insert_relationship(
                Relationship(
                    id=f"rel-old-{i}",
                    vm_id=f"vm-old-{i}",
                    vm_name=f"old vm {i}",
                    primary_cloud="a",
                    recovery_cloud="b",
                    primary_server="host-old",
                    replica_server="host-small-000",
                    state=RelationshipState.PROTECTED,
                    epoch=1,
                    policy_json="{}",
                    primary_status_json=json.dumps({"last_error": "e" * (3 * MIB)}),
                    # Disabled: nothing in the broker acts on these hosts that do not exist.
                    disabled_at=now,
                )
            )


def test_listing_survives_oversized_data_an_older_broker_stored(
    broker: BrokerThread, admin: AdminClient, capsys: pytest.CaptureFixture[str]
) -> None:
    _store_old_data(broker)

    first = admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest())
    assert len(first.servers) == 100 and first.next_page_token  # the default page size
    servers = admin.list_all(
        admin.stub.ListServers, admin_pb2.ListServersRequest(), lambda page: page.servers
    )
    assert len(servers) == 121
    assert len({s.id for s in servers}) == 121
    old = next(s for s in servers if s.name == "old-1")
    assert list(old.withheld) == ["facts", "metrics"]
    assert old.vm_count == 5
    shown = _server(admin, "old-1")
    assert set(shown.withheld) == {"facts", "metrics", "inventory"}
    assert not shown.facts.hostname and not shown.metrics.volumes

    vms = admin.list_all(admin.stub.ListVms, admin_pb2.ListVmsRequest(), lambda page: page.vms)
    assert sorted(v.vm.id for v in vms) == [f"vm-old-{i}" for i in range(4)]
    assert all(list(v.withheld) == ["disks"] for v in vms)

    jobs = admin.list_all(admin.stub.ListJobs, admin_pb2.ListJobsRequest(), lambda page: page.jobs)
    assert [j.id for j in jobs] == [f"job-old-{i}" for i in reversed(range(4))]
    assert all("result_json" in j.withheld for j in jobs)
    protected = admin.list_all(
        admin.stub.ListProtected,
        admin_pb2.ListProtectedRequest(include_disabled=True),
        lambda page: page.vms,
    )
    assert sorted(p.relationship_id for p in protected) == [f"rel-old-{i}" for i in range(4)]
    assert all("primary_status" in p.withheld for p in protected)

    # The operator's commands follow the pages and show everything.
    home = str(broker.home.root)
    assert cli_main(["--home", home, "servers", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 121
    assert cli_main(["--home", home, "vms", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli_main(["--home", home, "jobs", "list", "--limit", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli_main(["--home", home, "servers", "show", "old-1"]) == 0
    assert "withheld" in capsys.readouterr().out


# -- the enrollment port, before anyone is authenticated ---------------------------------------


@pytest.fixture
def enrollment(served: BrokerProcess) -> Iterator[enrollment_pb2_grpc.EnrollmentStub]:
    ca_pem = (served.home.admin_dir / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    address = served.run_info()["enrollment"]
    with grpc.secure_channel(address, creds, options=BIG_CHANNEL) as channel:
        yield enrollment_pb2_grpc.EnrollmentStub(channel)


@pytest.mark.parametrize(
    ("field", "code"),
    [("key_id", grpc.StatusCode.UNAUTHENTICATED), ("name", grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_unauthenticated_fields_are_cut_in_the_log(
    enrollment: enrollment_pb2_grpc.EnrollmentStub,
    tmp_path: Path,
    field: str,
    code: grpc.StatusCode,
) -> None:
    log_file = tmp_path / "broker.log"
    request = enrollment_pb2.RegisterRequest(
        key_id="key-0123456789ab",
        secret=b"s" * 32,
        name="hv-1",
        csr_der=pki.make_csr(pki.generate_key(), "hv-1"),
    )
    setattr(request, field, "k" * 250_000)
    before = log_file.stat().st_size
    with pytest.raises(grpc.RpcError) as err:
        enrollment.Register(request, timeout=10)
    # The refusal is logged before the answer is sent; give a slow disk a moment all the same.
    eventually(lambda: log_file.stat().st_size > before, what="the refusal in the log")
    time.sleep(0.2)
    grown = log_file.stat().st_size - before
    assert grown < 4096, f"the broker logged {grown} bytes for a {request.ByteSize()}-byte request"
    assert "250000" in log_file.read_text()[before:]  # the length is kept, the value is not
    assert err.value.code() == code
    assert len(err.value.details() or "") < 1024


def test_an_agent_of_an_older_protocol_is_refused_with_the_way_forward(
    served: BrokerProcess, served_admin: AdminClient, tmp_path: Path
) -> None:
    """Protocol 1 sent statuses and command results as free strings on field numbers protocol
    2 no longer reads: such an agent would be misread (every status refused, every result
    empty), so the broker says so at the Hello instead."""
    control = served.run_info()["control"]
    creds = tmp_path / "creds.json"
    create_key(served_admin, creds, uses=1)
    old = register_agent(creds, tmp_path / "old", name="hv-old")
    stream = RawStream(control, old.channel_credentials())
    try:
        older = hello()
        older.protocol_version = PROTOCOL_VERSION - 1
        stream.send(hello=older)
        with pytest.raises(grpc.RpcError) as err:
            stream.first()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "upgrade the agent" in (err.value.details() or "")
    finally:
        stream.close()
    # The same host speaking this protocol is welcome.
    stream = RawStream(control, old.channel_credentials())
    try:
        stream.send(hello=hello())
        assert stream.first().WhichOneof("body") == "welcome"
    finally:
        stream.close()


def test_a_hosts_cycle_numbers_never_fail_its_report() -> None:
    """The cycle history takes a primary's numbers as they come: values a hostile or confused
    host sends that the store cannot hold (not finite, negative, past 64-bit signed) are left
    out of the history, or clamped, instead of failing the report's transaction."""
    import math

    from broker.reports import MAX_STORED_INT, cycle_of
    from sitepair.protoconv import timestamp

    def status(**fields: object) -> control_pb2.RelationshipStatus:
        base: dict[str, object] = {
            "relationship_id": "rel-1",
            "committed_sequence": 7,
            "last_success_at": timestamp(2000.0),
            "last_cut_at": timestamp(1990.0),
            "last_cycle_seconds": 3.0,
            "last_cycle_bytes": 4096,
        }
        base.update(fields)
        return control_pb2.RelationshipStatus(**base)  # type: ignore[arg-type]

    good = cycle_of(status())
    assert good is not None and (good.sequence, good.cut_at, good.bytes) == (7, 1990.0, 4096)
    assert cycle_of(status(committed_sequence=0)) is None  # no cycle yet
    assert cycle_of(status(committed_sequence=2**64 - 1)) is None
    assert cycle_of(status(last_cycle_seconds=math.nan)) is None
    assert cycle_of(status(last_cycle_seconds=-1.0)) is None
    assert cycle_of(status(last_cycle_seconds=math.inf)) is None
    assert cycle_of(status(last_success_at=timestamp(-5.0))) is None
    clamped = cycle_of(status(last_cycle_bytes=2**64 - 1))
    assert clamped is not None and clamped.bytes == MAX_STORED_INT
