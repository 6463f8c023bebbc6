"""The broker's protection and failover orchestration is not misled (issue 11, broker side).

* A policy change reaches every relationship of a host, each with its own commands (hole 9).
* A VM name reported by a primary never leads the replica folder out of its storage; the grant
  names the VM's disks (hole 1).
* A host reports only for relationships it is party to, in its own role; made-up ids cost
  nothing (hole 5).
* A removed server is revoked on every other host (hole 4).
* A failed enable-protection job leaves no grant behind on the replica host (hole 7).

Real brokers and agents (the `directory` backend) on loopback, as in tests/protection.
"""

from __future__ import annotations

import contextlib
import gc
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.identity import AgentIdentity
from agent.replication.sender import ReplicaClient
from broker.agent_commands import granted_disks, replication_endpoint
from broker.client import wait_job
from broker.documents import ProtectedDisk, ProtectedVm
from broker.orchestration import Orchestration, Orchestrator
from broker.placement import replica_folder
from broker.reports import MAX_STATUS_POINTS, STATUS_TEXT_LIMITS
from broker.store.models import Command
from sitepair import pki
from sitepair.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from sitepair.protoconv import timestamp
from sitepair.v1 import admin_pb2, control_pb2, control_pb2_grpc, replication_pb2
from tests.protection import conftest as protection_fixtures
from tests.protection.conftest import Host, Sites, eventually, inventory_has
from tests.protection.test_walkthrough import MiB, make_vm, replica_content
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread, create_key

sites = protection_fixtures.sites  # the fixture: a broker and four agents on two sites


# -- helpers ------------------------------------------------------------------------------------
def setup_pair(
    s: Sites,
    *,
    primary_hosts: tuple[str, ...] = ("hv-a1", "hv-a2"),
    recovery_hosts: tuple[str, ...] = ("hv-b1", "hv-b2"),
) -> None:
    a = s.admin
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-a", site="site-a"))
    a.call(a.stub.CreateCloud, admin_pb2.CreateCloudRequest(name="cloud-b", site="site-b"))
    for host in primary_hosts:
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-a", server=host))
    for host in recovery_hosts:
        a.call(a.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud="cloud-b", server=host))
    s.job(
        a.call(
            a.stub.PairClouds,
            admin_pb2.PairCloudsRequest(
                primary="cloud-a", recovery="cloud-b", policy=policy("certificate", True)
            ),
        )
    )
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b"))
    a.call(a.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))


def policy(authentication: str, compression: bool) -> admin_pb2.Policy:
    return admin_pb2.Policy(
        copy_frequency_seconds=300, compression=compression, authentication=authentication
    )


def protect(s: Sites, vm: str, *, expect: str = "succeeded") -> admin_pb2.Job:
    return s.job(
        s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)), expect=expect
    )


def agent_docs(host: Host, table: str) -> dict[str, dict[str, Any]]:
    """The agent's own record of its grants or sources (``<home>/state/replication.db``)."""
    db = host.home / "state" / "replication.db"
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        rows = c.execute(f"SELECT relationship, doc FROM {table}").fetchall()
    return {k: json.loads(d) for k, d in rows}


def revoked_on(host: Host) -> list[str]:
    """The hosts an agent refuses on its replication ports (its own record)."""
    db = host.home / "state" / "replication.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return [r[0] for r in c.execute("SELECT host_id FROM revoked_hosts ORDER BY host_id")]


def job_commands(broker: BrokerThread, job_id: str) -> list[Command]:
    with broker.ctx.store.read() as tx:
        return tx.commands_for_job(job_id)


def body_of(cmd: Command) -> control_pb2.Command:
    message = control_pb2.Command()
    message.ParseFromString(cmd.payload)
    return message


def protected_any(s: Sites, vm_id: str) -> admin_pb2.ProtectedVm:
    """The newest relationship of a VM, disabled ones included."""
    vms = s.admin.call(
        s.admin.stub.ListProtected, admin_pb2.ListProtectedRequest(include_disabled=True)
    ).vms
    found = [v for v in vms if v.vm_id == vm_id or v.vm_name == vm_id]
    assert found, vm_id
    return max(found, key=lambda v: v.created_at.seconds + v.created_at.nanos / 1e9)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawAgent:
    """A control stream opened with a real enrolled agent certificate, driven by hand."""

    def __init__(self, broker: BrokerThread, identity: Any) -> None:
        self.channel = grpc.secure_channel(
            broker.control,
            identity.channel_credentials(),
            options=[
                ("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME),
                ("grpc.max_send_message_length", 16 << 20),
            ],
        )
        self._outbox: queue.Queue[control_pb2.AgentMessage | None] = queue.Queue()
        self._outbox.put(control_pb2.AgentMessage(hello=control_pb2.Hello()))
        self.call = control_pb2_grpc.ControlStub(self.channel).Connect(
            iter(self._outbox.get, None), timeout=110
        )
        self.acked: queue.Queue[str] = queue.Queue()
        self._seq = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in self.call:
                if message.WhichOneof("body") == "command":
                    # Answer every command (a ping is the barrier the tests wait on).
                    self.send(
                        control_pb2.AgentMessage(
                            ack=control_pb2.CommandAck(
                                command_id=message.command.id,
                                state=control_pb2.CommandAck.SUCCEEDED,
                            )
                        )
                    )
                    self.acked.put(message.command.id)

    def send(self, message: control_pb2.AgentMessage) -> None:
        self._outbox.put(message)

    def heartbeat(self) -> None:
        self._seq += 1
        self.send(
            control_pb2.AgentMessage(
                heartbeat=control_pb2.Heartbeat(seq=self._seq, sent_at=timestamp(time.time()))
            )
        )

    def report(self, *statuses: control_pb2.RelationshipStatus) -> None:
        self.send(
            control_pb2.AgentMessage(
                replication=control_pb2.ReplicationReport(relationships=list(statuses))
            )
        )

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()
        self.channel.close()


@contextlib.contextmanager
def rogue_agent(s: Sites, tmp_path: Path, name: str = "rogue") -> Iterator[tuple[RawAgent, str]]:
    """A host enrolled with a real key, in no cloud, party to no relationship."""
    creds = tmp_path / f"{name}.json"
    create_key(s.admin, creds, site="site-a")
    ident = register_agent(creds, tmp_path / name, name=name)
    raw = RawAgent(s.broker, ident)
    try:
        eventually(
            lambda: s.broker.ctx.sessions.get(ident.host_id) is not None, what="rogue connected"
        )
        yield raw, ident.host_id
    finally:
        raw.close()


def barrier(s: Sites, raw: RawAgent, host: str) -> None:
    """Return once the broker has handled everything ``raw`` sent before: the broker reads a
    stream in order, and the ping's acknowledgement comes after the reports."""
    raw.heartbeat()
    job = s.admin.call(
        s.admin.stub.PingServer, admin_pb2.PingServerRequest(server=host, note="barrier")
    )
    s.job(job)


# -- hole 9: a policy change reaches every relationship ---------------------------------------
def test_a_policy_change_reconfigures_every_relationship_of_a_host(sites: Sites) -> None:
    """Three VMs, one primary host, one replica host: `clouds policy` gives each relationship
    its own ConfigureReplica and ConfigureSource, and all keep replicating afterwards."""
    s = sites
    setup_pair(s, primary_hosts=("hv-a1",), recovery_hosts=("hv-b1",))
    models = {}
    for i, vm in enumerate(("web01", "web02", "web03")):
        models[vm] = make_vm(s, "hv-a1", vm, size=4 * MiB, seed=i)
    for vm in models:
        eventually(lambda vm=vm: inventory_has(s.admin, vm), what=vm)
        protect(s, vm)
    rels = {vm: s.protected(vm).relationship_id for vm in models}
    assert {s.protected(vm).replica_server for vm in models} == {"hv-b1"}

    done = s.job(
        s.admin.call(
            s.admin.stub.SetPairPolicy,
            admin_pb2.PairCloudsRequest(primary="cloud-a", policy=policy("ticket", False)),
        )
    )
    assert done.steps[1].message.startswith("3 protected VM(s) updated"), done.steps[1].message
    sent = job_commands(s.broker, done.id)
    per_rel = sorted(
        (
            c.kind,
            c.server_id,
            body_of(c).configure_replica.relationship_id
            or body_of(c).configure_source.relationship_id,
        )
        for c in sent
    )
    a1, b1 = s.hosts["hv-a1"].host_id, s.hosts["hv-b1"].host_id
    assert per_rel == sorted(
        [("configure_replica", b1, r) for r in rels.values()]
        + [("configure_source", a1, r) for r in rels.values()]
    )
    assert all(c.state.value == "succeeded" for c in sent)

    # Both hosts hold the new policy for every relationship...
    grants = agent_docs(s.hosts["hv-b1"], "grants")
    sources = agent_docs(s.hosts["hv-a1"], "sources")
    for vm, rel in rels.items():
        assert grants[rel]["auth"] == "ticket", vm
        assert sorted(d["disk_id"] for d in grants[rel]["disks"]) == ["data", "os"], vm
        assert (sources[rel]["auth"], sources[rel]["compression"]) == ("ticket", False), vm
    # ...and every VM replicates under it: new writes reach each replica.
    for i, (vm, model) in enumerate(models.items()):
        with s.hosts["hv-a1"].backend.open_writer(vm) as w:
            data = bytes([0x40 + i]) * 70_000
            w.write("os", MiB, data)
            w.flush()
        model["os"][MiB : MiB + len(data)] = data
        s.job(
            s.admin.call(
                s.admin.stub.ReplicationAction,
                admin_pb2.ReplicationActionRequest(vm=vm, action="cycle"),
            )
        )
        for disk, content in model.items():
            assert replica_content(s, vm, disk) == bytes(content), (vm, disk)


def test_a_step_sends_one_command_per_target_and_finds_it_again_after_a_restart(
    broker: BrokerThread, credentials: Path, tmp_path: Path
) -> None:
    """The reuse key is read back from the stored commands: a new orchestrator over the same
    store (a restarted broker) finds each relationship's command and sends none twice."""
    ident = register_agent(credentials, tmp_path / "hv", name="hv-1")  # offline: stays pending
    ctx = broker.ctx
    job = broker.loop.call(ctx.jobs.create("configure-pair", "pair/x", ["a", "b"], created_by="t"))

    def configure(rel: str) -> control_pb2.Command:
        return control_pb2.Command(
            configure_replica=control_pb2.ConfigureReplica(
                relationship_id=rel, auth=control_pb2.AUTH_TICKET
            )
        )

    def once(orch: Orchestrator, step: str, body: control_pb2.Command) -> str:
        return broker.loop.call(orch.submit_once(job, step, ident.host_id, body)).id

    first = [once(ctx.protection, "b", configure(r)) for r in ("rel-1", "rel-2", "rel-3", "rel-1")]
    assert len(set(first)) == 3 and first[0] == first[3]
    restarted = Orchestrator(
        Orchestration(
            store=ctx.store,
            clock=ctx.clock,
            jobs=ctx.jobs,
            dispatcher=ctx.dispatcher,
            sessions=ctx.sessions,
            spawn=broker.broker.spawn,
        )
    )
    assert [once(restarted, "b", configure(r)) for r in ("rel-1", "rel-2", "rel-3")] == first[:3]
    # Another step, or another kind for the same relationship, is another command.
    assert once(restarted, "a", configure("rel-1")) not in first
    source = control_pb2.Command(
        configure_source=control_pb2.ConfigureSource(relationship_id="rel-1")
    )
    assert once(restarted, "b", source) not in first
    assert len(job_commands(broker, job.id)) == 5


# -- hole 1: replica folders and granted disks --------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web01", "web01"),
        ("../../../elsewhere/x", "elsewhere-x"),
        ("..", "vm"),
        ("C:\\Windows\\System32", "C-Windows-System32"),
        ("CON", "vm-CON"),
        ("Ünïcodé VM #1", "Unicode-VM-1"),
    ],
)
def test_a_replica_folder_is_one_safe_component_inside_the_storage_path(
    name: str, expected: str, tmp_path: Path
) -> None:
    folder = replica_folder(str(tmp_path), name, "rel-0123456789ab")
    assert folder == str(tmp_path / f"{expected}-rel-0123456789ab")
    assert Path(folder).parent == tmp_path
    win = replica_folder("D:\\Replicas", name, "rel-0123456789ab")
    assert win == f"D:\\Replicas\\{expected}-rel-0123456789ab"


@pytest.mark.parametrize("root", ["", "gold", "relative/path", "D:relative"])
def test_a_storage_path_that_is_not_absolute_is_refused(root: str) -> None:
    with pytest.raises(InvalidArgument):
        replica_folder(root, "web01", "rel-0123456789ab")


def test_the_grant_names_the_vms_disks() -> None:
    disks = granted_disks(
        ProtectedVm(
            disks=(
                ProtectedDisk("os", "vhdx", 4 * MiB, path="/x/os.vhdx"),
                ProtectedDisk("data", "vhd", 2 * MiB),
            )
        )
    )
    assert [(d.disk_id, d.virtual_size, d.format) for d in disks] == [
        ("os", 4 * MiB, "vhdx"),
        ("data", 2 * MiB, "vhd"),
    ]


def test_a_hostile_vm_name_stays_inside_the_replica_storage(sites: Sites) -> None:
    """The primary reports a VM named ``../../../elsewhere/x``: the replica is created in the
    replica host's storage folder all the same, and its grant lists the VM's disks."""
    s = sites
    setup_pair(s, recovery_hosts=("hv-b1",))
    make_vm(s, "hv-a1", "evil", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "evil"), what="VM")
    hostile = "../../../elsewhere/x"
    with contextlib.closing(sqlite3.connect(s.broker.home.database)) as db, db:
        db.execute("UPDATE vms SET name = ? WHERE name = 'evil'", (hostile,))
    vm_id = next(
        v.vm.id
        for v in s.admin.call(s.admin.stub.ListVms, admin_pb2.ListVmsRequest()).vms
        if v.vm.name == hostile
    )
    done = protect(s, vm_id)
    v = s.protected(vm_id)
    gold = s.hosts["hv-b1"].home / "gold"
    assert Path(v.replica_folder) == gold / f"elsewhere-x-{v.relationship_id}"
    assert (Path(v.replica_folder) / "state.json").is_file()
    assert not (gold / ".." / ".." / ".." / "elsewhere").exists()
    assert not (s.hosts["hv-b1"].home.parent / "elsewhere").exists()
    grant = next(c for c in job_commands(s.broker, done.id) if c.kind == "configure_replica")
    cmd = body_of(grant).configure_replica
    assert cmd.folder == v.replica_folder
    assert [(d.disk_id, d.virtual_size, d.format) for d in cmd.disks] == [
        ("os", 2 * MiB, "vhdx"),
        ("data", 1 * MiB, "vhd"),
    ]


# -- hole 5: reports only from a party, in its role --------------------------------------------
PRIMARY, REPLICA = control_pb2.ROLE_PRIMARY, control_pb2.ROLE_REPLICA


def _status(
    rel: str, role: control_pb2.Role.ValueType, **fields: Any
) -> control_pb2.RelationshipStatus:
    return control_pb2.RelationshipStatus(relationship_id=rel, role=role, **fields)


def test_a_host_that_is_not_party_cannot_change_a_relationships_health(
    sites: Sites, tmp_path: Path
) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    protect(s, "web01")
    eventually(lambda: s.protected("web01").health == "normal", what="normal")
    rel = s.protected("web01").relationship_id
    reports = s.broker.ctx.reports

    with rogue_agent(s, tmp_path) as (raw, rogue):
        # Reports as the primary and as the replica, many a second (the real primary reports
        # once a second): cumulative counters that would read "100 % of cycles missed", a full
        # replica disk, a primary needing a resync, a replica far ahead.
        seen = []
        for i in range(1, 61):
            raw.report(
                _status(
                    rel,
                    PRIMARY,
                    state=control_pb2.STATE_RESYNC_REQUIRED,
                    cycles_succeeded=1_000_000,
                    cycles_missed=1000 * i,
                    last_error="x" * 100_000,
                    last_error_code=replication_pb2.ERROR_DISK_FULL,
                ),
                _status(rel, REPLICA, state=control_pb2.STATE_FENCED, committed_sequence=99_999),
            )
            raw.heartbeat()
            time.sleep(0.05)
            if i % 6 == 0:
                s.broker.loop.call(reports.evaluate_health())
                v = s.protected("web01")
                seen.append((v.health, [r.code for r in v.reasons]))
                samples = reports.history._samples.get(rel, ())
                assert all(missed < 1000 for _, _, missed, _ in samples), "rogue counters kept"
        barrier(s, raw, "rogue")
        assert all(health == "normal" for health, _ in seen), seen
        v = s.protected("web01")
        assert rogue not in (v.primary_server, v.replica_server)
        after = s.broker.loop.call(_stored(s, rel))
        assert "ERROR_DISK_FULL" not in after[0] and "99999" not in after[1]
        assert "xxxx" not in after[0] and "STATE_RESYNC_REQUIRED" not in after[0]

    # A party in the wrong role is refused too: the replica host speaking as the primary.
    replica = s.hosts[s.protected("web01").replica_server].host_id
    s.broker.loop.call(
        reports.on_report(
            replica,
            control_pb2.ReplicationReport(
                relationships=[
                    _status(rel, PRIMARY, last_error_code=replication_pb2.ERROR_DISK_FULL)
                ]
            ),
        )
    )
    assert "ERROR_DISK_FULL" not in s.broker.loop.call(_stored(s, rel))[0]


async def _stored(s: Sites, rel: str) -> tuple[str, str]:
    """The statuses the broker keeps for a relationship: (primary's, replica's)."""
    found = await s.broker.ctx.protection.relationship(rel)
    return found.primary_status_json, found.replica_status_json


def test_made_up_relationship_ids_cost_the_broker_nothing(sites: Sites, tmp_path: Path) -> None:
    """200,000 made-up ids from an enrolled host: no history, no store write, no memory kept."""
    s = sites
    reports, store = s.broker.ctx.reports, s.broker.ctx.store
    writes = []
    real_write = store.writing

    async def counting_write(fn: Any) -> Any:
        writes.append(fn)
        return await real_write(fn)

    def flood(prefix: str) -> list[control_pb2.AgentMessage]:
        messages = [
            control_pb2.AgentMessage(
                replication=control_pb2.ReplicationReport(
                    relationships=[
                        _status(f"{prefix}-{i:012x}", PRIMARY, cycles_missed=i)
                        for i in range(n, n + 4000)
                    ]
                )
            )
            for n in range(0, 200_000, 4000)
        ]
        # One report far over the cap: refused beyond the cap without being looked at.
        messages.append(
            control_pb2.AgentMessage(
                replication=control_pb2.ReplicationReport(
                    relationships=[_status(f"{prefix}-big-{i}", REPLICA) for i in range(20_000)]
                )
            )
        )
        return messages

    with rogue_agent(s, tmp_path) as (raw, _):
        # Built up front, so the test's own messages are not counted as the broker's growth.
        rounds = [flood("rel-a"), flood("rel-b")]
        history_before = len(reports.history)
        barrier(s, raw, "rogue")
        store.writing = counting_write  # type: ignore[method-assign]
        rss = []
        try:
            for messages in rounds:
                for message in messages:
                    raw.send(message)
                    raw.heartbeat()
                barrier(s, raw, "rogue")
                gc.collect()
                rss.append(rss_bytes())
        finally:
            del store.writing
        assert [fn for fn in writes if "on_report" in fn.__qualname__] == []
        assert len(reports.history) == history_before == 0
        # The first round sets the allocators' high-water mark for parsing; the second must
        # not add to it. Generous: a history entry per id would be well over 100 MiB.
        grown = rss[1] - rss[0]
        assert grown < 32 * MiB, grown >> 20
        with s.broker.ctx.store.read() as tx:
            assert tx.list_relationships(include_disabled=True) == []


def test_reported_text_and_points_are_bounded(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    protect(s, "web01")
    v = s.protected("web01")
    primary = s.hosts[v.primary_server]
    huge = control_pb2.RelationshipStatus(
        relationship_id=v.relationship_id,
        role=control_pb2.ROLE_PRIMARY,
        state=control_pb2.STATE_PROTECTED,
        last_error="e" * 1_000_000,
        last_error_code=replication_pb2.ERROR_OTHER,
        app_consistent_error="a" * 1_000_000,
        vm_id="v" * 10_000,
        points=[control_pb2.RecoveryPoint(sequence=i) for i in range(5_000)],
    )
    # Stop the real primary's reports so they do not overwrite the one under test.
    primary.stop()
    s.broker.loop.call(
        s.broker.ctx.reports.on_report(
            primary.host_id, control_pb2.ReplicationReport(relationships=[huge])
        )
    )
    doc = json.loads(s.broker.loop.call(_stored(s, v.relationship_id))[0])["status"]
    for name, limit in STATUS_TEXT_LIMITS.items():
        assert len(doc.get(name, "")) <= limit, name
    assert len(doc["last_error"]) == STATUS_TEXT_LIMITS["last_error"]
    assert len(doc["points"]) == MAX_STATUS_POINTS
    assert int(doc["points"][-1]["sequence"]) == 4_999  # the newest are kept


def test_the_cycle_history_forgets_disabled_relationships(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    protect(s, "web01")
    rel = s.protected("web01").relationship_id
    reports = s.broker.ctx.reports
    eventually(lambda: rel in reports.history, what="a report from the primary")
    s.job(
        s.admin.call(s.admin.stub.DisableProtection, admin_pb2.DisableProtectionRequest(vm="web01"))
    )
    assert rel not in reports.history
    # Also when it disappears behind this broker's back (another broker, a restore).
    reports.history.add("rel-gone", time.time(), 1, 0, 0)
    s.broker.loop.call(reports.evaluate_health())
    assert "rel-gone" not in reports.history


# -- hole 4: a removed server is revoked everywhere ---------------------------------------------
def test_removing_a_server_revokes_it_on_every_other_host(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    protect(s, "web01")
    replica = s.protected("web01").replica_server
    offline = next(n for n in ("hv-b1", "hv-b2") if n != replica)
    s.hosts[offline].stop()
    eventually(lambda: s.broker.ctx.sessions.get(s.hosts[offline].host_id) is None, what="offline")
    removed = s.hosts["hv-a1"]

    rel = s.protected("web01").relationship_id
    job = s.admin.call(s.admin.stub.RemoveServer, admin_pb2.RemoveServerRequest(server="hv-a1"))
    done = wait_job(s.admin, job.id)  # ends while a host is still offline (checked below)
    assert [st.name for st in done.steps][-1].startswith("tell the other hosts")
    cmds = job_commands(s.broker, job.id)
    targets = {c.server_id: c for c in cmds if c.kind == "revoke_host"}
    others = {h.host_id for n, h in s.hosts.items() if n != "hv-a1"}
    assert set(targets) == others
    for c in targets.values():
        assert body_of(c).revoke_host.host_id == removed.host_id
    assert targets[s.hosts[offline].host_id].state.value == "pending"
    assert offline in done.steps[3].message and "reconnect" in done.steps[3].message
    connected = [c for sid, c in targets.items() if sid != s.hosts[offline].host_id]
    assert [c.state.value for c in connected] == ["succeeded"] * 2, [c.error for c in connected]
    assert done.state == "succeeded", done.error
    assert "2 of 3 host(s) refuse hv-a1 now" in done.steps[3].message
    assert json.loads(done.result_json)["pending_on"] == [offline]

    # The offline host gets it when it reconnects; every other host now refuses hv-a1.
    s.hosts[offline].start()
    eventually(
        lambda: all(c.state.value == "succeeded" for c in job_commands(s.broker, job.id)),
        what="revocation delivered on reconnect",
    )
    for name, host in s.hosts.items():
        if name != "hv-a1":
            assert revoked_on(host) == [removed.host_id], name

    # The removed primary still holds a certificate valid for hours: its replica host refuses
    # it anyway (on a07fb6b it went on committing cycles into its replica).
    with s.broker.ctx.store.read() as tx:
        server = tx.get_server(s.hosts[replica].host_id)
    assert server is not None
    address, certificate_port, _ = replication_endpoint(server.facts_json)
    ident = AgentIdentity.load(removed.home)
    assert pki.not_after(pki.load_cert_pem(ident.cert_pem)) > time.time()
    with (
        ReplicaClient(
            identity=ident,
            replica_host=s.hosts[replica].host_id,
            address=f"{address}:{certificate_port}",
            auth="certificate",
        ) as client,
        pytest.raises(PermissionDenied, match="removed from the vault"),
    ):
        client.get_state(rel)

    # The VM whose primary was removed: health says why; disabling it still works.
    s.broker.loop.call(s.broker.ctx.reports.evaluate_health())
    v = s.protected("web01")
    assert v.health == "critical"
    reasons = {r.code: r.message for r in v.reasons}
    assert (
        "primary-host-removed" in reasons and "fail the VM over" in reasons["primary-host-removed"]
    )
    # A policy change leaves it alone instead of waiting for a host that never comes back.
    pc = s.job(
        s.admin.call(
            s.admin.stub.SetPairPolicy,
            admin_pb2.PairCloudsRequest(primary="cloud-a", policy=policy("certificate", False)),
        )
    )
    assert "a host was removed" in pc.steps[1].message
    s.job(
        s.admin.call(s.admin.stub.DisableProtection, admin_pb2.DisableProtectionRequest(vm="web01"))
    )


# -- hole 7: a failed enable-protection job rolls back ------------------------------------------
def test_a_failed_protection_removes_the_grant_from_the_replica_host(
    sites: Sites, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    agent = s.hosts["hv-a1"].agent
    assert agent is not None

    async def refuse(cmd: control_pb2.ConfigureSource) -> dict[str, Any]:
        raise FailedPrecondition("the primary refuses for this test")

    monkeypatch.setattr(agent.daemon.replication, "configure_source", refuse)
    done = protect(s, "web01", expect="failed")
    assert "the primary refuses" in done.error and "rolled back" in done.error
    v = protected_any(s, "web01")
    assert v.state == "disabled"
    replica = s.hosts[v.replica_server]
    assert v.relationship_id not in agent_docs(replica, "grants")
    assert v.replica_folder and not Path(v.replica_folder).exists()
    assert v.relationship_id not in agent_docs(s.hosts["hv-a1"], "sources")

    # The VM is free for another attempt, which works.
    monkeypatch.undo()
    protect(s, "web01")
    again = s.protected("web01")
    assert again.relationship_id != v.relationship_id and again.state == "protected"


def test_a_primary_removed_during_protection_leaves_no_grant_behind(sites: Sites) -> None:
    s = sites
    setup_pair(s)
    make_vm(s, "hv-a1", "web01", size=2 * MiB)
    eventually(lambda: inventory_has(s.admin, "web01"), what="VM")
    s.hosts["hv-a1"].stop()
    job = s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01"))
    eventually(
        lambda: (
            "waiting for hv-a1"
            in s.admin.call(s.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job.id))
            .steps[3]
            .message
        ),
        what="the job waits for the primary",
    )
    v = protected_any(s, "web01")
    replica = s.hosts[v.replica_server]
    assert v.relationship_id in agent_docs(replica, "grants")
    s.admin.call(s.admin.stub.RemoveServer, admin_pb2.RemoveServerRequest(server="hv-a1"))
    done = s.job(job, expect="failed")
    assert "rolled back" in done.error, done.error
    assert v.relationship_id not in agent_docs(replica, "grants")
    assert protected_any(s, "web01").state == "disabled"
