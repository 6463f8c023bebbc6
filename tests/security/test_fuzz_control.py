"""Fuzzing the broker's control stream: Hello facts, inventories, heartbeats, replication
reports and command acknowledgements from an enrolled host that is party to nothing.

The broker runs as its own process (``sitepair-broker serve``). Each example opens a control
stream with the attacker's real certificate and sends a Hello (its facts fuzzed) and a few
fuzzed messages, some of them raw garbage; then it half-closes and reads the stream to its end,
so the broker has handled every message before the example is judged. The broker must answer
each stream (no hang), never crash a handler, and afterwards:

* every list an operator uses still answers and pages;
* nothing the attacker reported is stored unless it passes the rules (VM ids and disk ids are
  path components, names are display names);
* a real relationship between two other hosts keeps its status and health (reports for it from
  a host that is not party to it cost nothing);
* over the whole run, the broker's peak memory and its log did not grow with what was sent.

``SITEPAIR_FUZZ_EXAMPLES`` sets the budget (short in the default run, long with
``make test-slow``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.home import BrokerHome
from broker.store.models import InventoryVm, Relationship, RelationshipState
from broker.store.sqlite import SqliteStore
from sitepair import PROTOCOL_VERSION, paths
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2, common_pb2, control_pb2, replication_pb2
from tests.security.control_site import BIG_CHANNEL, MIB
from tests.support.agents import register_agent
from tests.support.brokers import BrokerProcess, create_key

DEFAULT_EXAMPLES = int(os.environ.get("SITEPAIR_FUZZ_EXAMPLES", "100")) // 2
SLOW_EXAMPLES = int(os.environ.get("SITEPAIR_FUZZ_SLOW_EXAMPLES", "3000")) // 3
#: Peak memory and log the broker may gain over a whole run, whatever was sent.
MEMORY_BOUND = 160 * MIB
LOG_PER_EXAMPLE = 2048

u64 = st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1))
ids = st.one_of(
    st.sampled_from(
        ["vm-1", "os", "../../x", "/etc/passwd", "a\\b", "a\0b", "..", "CON", "", "x" * 300]
    ),
    st.text(max_size=24),
)
names = st.one_of(st.sampled_from(["web01", "Web (prod) #2", "a\nb", "\u202egnp", ""]), st.text())
texts = st.one_of(st.text(max_size=64), st.sampled_from(["x" * 20_000]))


def disks() -> st.SearchStrategy[common_pb2.VirtualDiskRef]:
    return st.builds(
        common_pb2.VirtualDiskRef,
        id=ids,
        path=st.one_of(st.just("/srv/vm/os.vhdx"), texts),
        format=st.sampled_from(["vhdx", "vhd", "raw", "", "../x"]),
        virtual_size=u64,
        storage_class=st.one_of(st.just(""), ids),
        file_size=u64,
    )


def vms() -> st.SearchStrategy[common_pb2.VirtualMachine]:
    return st.builds(
        common_pb2.VirtualMachine,
        id=ids,
        name=names,
        generation=st.integers(0, 2**32 - 1),
        cpu_count=st.integers(0, 2**32 - 1),
        memory_mb=u64,
        state=st.sampled_from(["off", "running", "", "x" * 100]),
        disks=st.lists(disks(), max_size=3),
        nics=st.lists(
            st.builds(common_pb2.VmNic, name=names, network=names, mac=texts), max_size=2
        ),
    )


def inventories() -> st.SearchStrategy[common_pb2.Inventory]:
    return st.builds(
        common_pb2.Inventory,
        digest=st.one_of(st.just("ab" * 32), texts),
        vms=st.lists(vms(), max_size=6),
        storage=st.lists(
            st.builds(
                common_pb2.StorageClassification,
                name=ids,
                path=st.one_of(st.just("/srv/gold"), texts),
                total_bytes=u64,
                free_bytes=u64,
            ),
            max_size=3,
        ),
    )


def facts() -> st.SearchStrategy[common_pb2.HostFacts]:
    return st.builds(
        common_pb2.HostFacts,
        hostname=texts,
        backend=st.sampled_from(["directory", "hyperv", "", "x" * 500]),
        cloud=st.one_of(st.just(""), ids),
        replication_host=st.one_of(st.just("127.0.0.1"), texts),
        certificate_port=st.integers(0, 2**32 - 1),
        ticket_port=st.integers(0, 2**32 - 1),
        memory_total_bytes=u64,
    )


def statuses(victim_rel: str) -> st.SearchStrategy[control_pb2.RelationshipStatus]:
    return st.builds(
        control_pb2.RelationshipStatus,
        relationship_id=st.one_of(st.just(victim_rel), ids),
        # Every value the enums name, and values they do not (a newer or hostile peer).
        role=st.sampled_from([*control_pb2.Role.values(), 3, 2**31 - 1]),
        state=st.sampled_from([*control_pb2.ReplicationState.values(), 99, 2**31 - 1]),
        epoch=u64,
        committed_sequence=u64,
        cycles_succeeded=u64,
        cycles_failed=u64,
        cycles_missed=u64,
        last_error=texts,
        last_error_code=st.sampled_from([*replication_pb2.ErrorCode.values(), 99, 2**31 - 1]),
        pending_bytes=u64,
        points=st.lists(
            st.builds(control_pb2.RecoveryPoint, sequence=u64, app_consistent=st.booleans()),
            max_size=80,
        ),
    )


def messages(victim_rel: str) -> st.SearchStrategy[bytes]:
    agent = st.one_of(
        st.builds(lambda i: control_pb2.AgentMessage(inventory=i), inventories()),
        st.builds(
            lambda seq, vols: control_pb2.AgentMessage(
                heartbeat=control_pb2.Heartbeat(
                    seq=seq, metrics=common_pb2.HostMetrics(volumes=vols)
                )
            ),
            u64,
            st.lists(
                st.builds(common_pb2.VolumeMetrics, path=texts, total_bytes=u64, free_bytes=u64),
                max_size=80,
            ),
        ),
        st.builds(
            lambda ss: control_pb2.AgentMessage(
                replication=control_pb2.ReplicationReport(relationships=ss)
            ),
            st.lists(statuses(victim_rel), max_size=5),
        ),
        st.builds(
            lambda cid, state, err: control_pb2.AgentMessage(
                ack=control_pb2.CommandAck(command_id=cid, state=state, error=err)
            ),
            ids,
            st.integers(0, 5),
            texts,
        ),
        st.builds(lambda f: control_pb2.AgentMessage(hello=control_pb2.Hello(facts=f)), facts()),
    )
    return st.one_of(
        agent.map(lambda m: m.SerializeToString()),
        st.binary(max_size=64),  # garbage on the wire
    )


class Target:
    def __init__(self, home: BrokerHome, tmp: Path) -> None:
        self.broker = BrokerProcess(home)
        self.broker.start()
        self.admin = self.broker.admin()
        creds = tmp / "creds.json"
        create_key(self.admin, creds, uses=3)
        self.evil = register_agent(creds, tmp / "evil", name="hv-evil")
        victim_primary = register_agent(creds, tmp / "victim-a", name="hv-victim-a")
        victim_replica = register_agent(creds, tmp / "victim-b", name="hv-victim-b")
        self.victim_rel = "rel-victim"
        status = json.dumps({"state": "protected", "cycles_succeeded": 7}, sort_keys=True)
        store = SqliteStore.open(home.database)
        try:
            with store.write() as tx:
                tx.insert_relationship(
                    Relationship(
                        id=self.victim_rel,
                        vm_id="vm-victim",
                        vm_name="victim",
                        primary_cloud="a",
                        recovery_cloud="b",
                        primary_server=victim_primary.host_id,
                        replica_server=victim_replica.host_id,
                        state=RelationshipState.PROTECTED,
                        epoch=1,
                        policy_json="{}",
                        primary_status_json=status,
                    )
                )
        finally:
            store.close()
        self.victim_status = status
        self.control = self.broker.run_info()["control"]
        self.channel = grpc.secure_channel(
            self.control, self.evil.channel_credentials(), options=BIG_CHANNEL
        )
        self.connect = self.channel.stream_stream(
            "/sitepair.v1.Control/Connect",
            request_serializer=lambda b: b,
            response_deserializer=control_pb2.BrokerMessage.FromString,
        )
        self.outcomes: dict[str, int] = {}

    def peak(self) -> int:
        assert self.broker.proc is not None
        for line in Path(f"/proc/{self.broker.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stream(self, hello: common_pb2.HostFacts, body: list[bytes]) -> None:
        first = control_pb2.AgentMessage(
            hello=control_pb2.Hello(
                facts=hello, agent_version="0.1", protocol_version=PROTOCOL_VERSION
            )
        ).SerializeToString()
        try:
            replies = list(self.connect(iter([first, *body]), timeout=60))
            kinds = [r.WhichOneof("body") for r in replies]
            self.note("+".join(dict.fromkeys(k or "?" for k in kinds)) or "empty")
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the broker hung"
            assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()  # a handler crashed
            assert len(exc.details() or "") <= 1100
            self.note(exc.code().name)

    def note(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def check(self) -> None:
        servers = self.admin.list_all(
            self.admin.stub.ListServers, admin_pb2.ListServersRequest(), lambda p: p.servers
        )
        assert servers, "ListServers"
        protected = self.admin.list_all(
            self.admin.stub.ListProtected,
            admin_pb2.ListProtectedRequest(include_disabled=True),
            lambda p: p.vms,
        )
        assert protected, "ListProtected"
        for info in self.admin.list_all(
            self.admin.stub.ListVms, admin_pb2.ListVmsRequest(), lambda page: page.vms
        ):
            paths.check_component(info.vm.id, "stored VM id")
            paths.check_display_name(info.vm.name, "stored VM name")
            for disk in info.vm.disks:
                paths.check_component(disk.id, "stored disk id")
        victim = next(
            v
            for v in self.admin.list_all(
                self.admin.stub.ListProtected,
                admin_pb2.ListProtectedRequest(include_disabled=True),
                lambda page: page.vms,
            )
            if v.relationship_id == self.victim_rel
        )
        assert victim.state == "protected"
        store = SqliteStore(self.broker.home.database)
        try:
            with store.read() as tx:
                rel = tx.get_relationship(self.victim_rel)
        finally:
            store.close()
        assert rel is not None and rel.primary_status_json == self.victim_status

    def close(self) -> None:
        self.channel.close()
        self.admin.close()
        self.broker.stop()


def _log_size(home: BrokerHome) -> int:
    """The broker's log (the ``broker_home`` fixture logs to ``broker.log`` beside the home)."""
    log = home.root.parent / "broker.log"
    assert log.exists(), log
    return log.stat().st_size


def run(target: Target, examples: int, home: BrokerHome) -> None:
    peak_before = target.peak()
    log_before = _log_size(home)

    plausible = st.builds(
        common_pb2.HostFacts,
        hostname=st.text(max_size=30),
        backend=st.just("directory"),
        replication_host=st.just("127.0.0.1"),
        certificate_port=st.integers(0, 65535),
        memory_total_bytes=st.integers(0, 2**40),
    )

    # Half the streams open with facts the broker accepts, so that the messages after the Hello
    # are handled; the others fuzz the Hello itself.
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        hello=st.one_of(plausible, facts()), body=st.lists(messages(target.victim_rel), max_size=6)
    )
    def example(hello: common_pb2.HostFacts, body: list[bytes]) -> None:
        target.stream(hello, body)

    example()
    target.check()
    grown = target.peak() - peak_before
    assert grown < MEMORY_BOUND, f"the broker's peak memory grew by {grown >> 20} MiB"
    logged = _log_size(home) - log_before
    assert logged < LOG_PER_EXAMPLE * examples + 64 * 1024, f"the broker logged {logged} bytes"


@pytest.fixture
def target(broker_home: BrokerHome, tmp_path: Path) -> Iterator[Target]:
    t = Target(broker_home, tmp_path)
    try:
        yield t
    finally:
        t.close()


def test_fuzz_the_control_stream(target: Target, broker_home: BrokerHome) -> None:
    run(target, DEFAULT_EXAMPLES, broker_home)
    assert len(target.outcomes) > 1, target.outcomes  # both refusals and served streams


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_the_control_stream_long(target: Target, broker_home: BrokerHome) -> None:
    run(target, SLOW_EXAMPLES, broker_home)
    print("outcomes:", dict(sorted(target.outcomes.items())))


def test_the_checks_catch_a_stored_hostile_vm(target: Target) -> None:
    """The fuzzer's judgement is not empty: a hostile VM id in the store fails it."""
    store = SqliteStore(target.broker.home.database)
    try:
        with store.write() as tx:
            tx.replace_inventory(
                target.evil.host_id,
                [InventoryVm(target.evil.host_id, "../../x", "n", 2, 1, 1, "off", "[]", "[]", 0.0)],
                [],
                [],
            )
    finally:
        store.close()
    with pytest.raises(InvalidArgument):
        target.check()
