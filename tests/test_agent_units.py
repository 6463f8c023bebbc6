"""Agent pieces on their own: the command journal, configuration, backoff, inventory digests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.commands import CommandExecutor
from agent.control import backoff_delay, inventory_to_proto
from agent.hosts.base import DiskRecord, HostInventory, StorageRecord, VmRecord
from agent.journal import CommandJournal
from broker import config as broker_config
from sitepair.clock import ManualClock
from sitepair.errors import ConfigError
from sitepair.v1 import control_pb2


def _run(executor: CommandExecutor, cmd: control_pb2.Command) -> list[control_pb2.CommandAck]:
    acks: list[control_pb2.CommandAck] = []

    async def ack(a: control_pb2.CommandAck) -> None:
        acks.append(a)

    asyncio.run(executor.handle(cmd, ack))
    return acks


def test_command_runs_once_and_repeats_are_answered_from_the_journal(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "j.db")
    executor = CommandExecutor(journal, ManualClock())
    runs: list[str] = []

    async def ping(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        runs.append(cmd.id)
        return control_pb2.CommandResult(ping=control_pb2.PingResult(note=cmd.ping.note))

    executor.register("ping", ping)
    cmd = control_pb2.Command(id="c1", ping=control_pb2.Ping(note="x"))
    first = _run(executor, cmd)
    assert [a.state for a in first] == [
        control_pb2.CommandAck.RECEIVED,
        control_pb2.CommandAck.SUCCEEDED,
    ]
    again = _run(executor, cmd)
    assert [a.state for a in again] == [control_pb2.CommandAck.SUCCEEDED]
    assert again[0].result == first[1].result
    assert again[0].result.ping.note == "x"
    assert runs == ["c1"]
    journal.close()


def test_command_interrupted_by_a_crash_is_not_run_again(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "j.db")
    assert journal.begin("c1", "ping", 1.0) is None  # the process "dies" while running it
    journal.close()
    journal = CommandJournal(tmp_path / "j.db")
    assert journal.interrupted(2.0) == ["c1"]
    executor = CommandExecutor(journal, ManualClock())
    runs: list[str] = []

    async def ping(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        runs.append(cmd.id)
        return control_pb2.CommandResult(ping=control_pb2.PingResult())

    executor.register("ping", ping)
    acks = _run(executor, control_pb2.Command(id="c1", ping=control_pb2.Ping()))
    assert [a.state for a in acks] == [control_pb2.CommandAck.FAILED]
    assert "stopped while running" in acks[0].error
    assert runs == []
    journal.close()


def test_unknown_command_kind_fails_clearly(tmp_path: Path) -> None:
    executor = CommandExecutor(CommandJournal(tmp_path / "j.db"), ManualClock())
    acks = _run(
        executor, control_pb2.Command(id="c9", refresh_inventory=control_pb2.RefreshInventory())
    )
    assert acks[-1].state == control_pb2.CommandAck.FAILED
    assert "does not know the command 'refresh_inventory'" in acks[-1].error


def test_a_result_of_another_kind_fails_the_command(tmp_path: Path) -> None:
    executor = CommandExecutor(CommandJournal(tmp_path / "j.db"), ManualClock())

    async def ping(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        return control_pb2.CommandResult(fence=control_pb2.FenceResult())

    executor.register("ping", ping)
    acks = _run(executor, control_pb2.Command(id="c1", ping=control_pb2.Ping()))
    assert acks[-1].state == control_pb2.CommandAck.FAILED
    assert "a fence result for ping" in acks[-1].error


def test_a_journal_from_before_typed_results_re_acks_with_an_empty_result(
    tmp_path: Path,
) -> None:
    """A version-1 journal kept results as JSON text: it is migrated, its finished commands are
    answered again with their outcome and an empty result, and new results are kept typed."""
    import sqlite3

    path = tmp_path / "agent.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE commands (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, "
        "received_at REAL NOT NULL, finished_at REAL, result_json TEXT NOT NULL DEFAULT '', "
        "error TEXT NOT NULL DEFAULT '');"
        "INSERT INTO commands VALUES ('old', 'ping', 'succeeded', 1.0, 2.0, '{\"note\": \"x\"}', '');"
        "PRAGMA user_version = 1;"
    )
    db.close()
    journal = CommandJournal(path)
    executor = CommandExecutor(journal, ManualClock())

    async def ping(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        return control_pb2.CommandResult(ping=control_pb2.PingResult(note=cmd.ping.note))

    executor.register("ping", ping)
    old = _run(executor, control_pb2.Command(id="old", ping=control_pb2.Ping(note="x")))
    assert [a.state for a in old] == [control_pb2.CommandAck.SUCCEEDED]
    assert old[0].result == control_pb2.CommandResult()
    _run(executor, control_pb2.Command(id="new", ping=control_pb2.Ping(note="y")))
    journal.close()
    journal = CommandJournal(path)
    entry = journal.get("new")
    assert entry is not None and entry.command_result().ping.note == "y"
    journal.close()


def test_backoff_has_full_jitter_and_a_cap() -> None:
    delays = [backoff_delay(a) for a in range(40) for _ in range(20)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(backoff_delay(30) for _ in range(200)) > 15  # spread up to the cap
    assert len({round(backoff_delay(3), 6) for _ in range(50)}) > 40  # not in lockstep


def test_inventory_digest_ignores_free_space_but_not_vms() -> None:
    vm = VmRecord(
        id="1",
        name="a",
        generation=2,
        cpu_count=1,
        memory_mb=1,
        state="off",
        disks=(DiskRecord(id="d", path=Path("/x"), format="vhdx", virtual_size=1, file_size=5),),
    )
    a = inventory_to_proto(
        HostInventory(vms=(vm,), storage=(StorageRecord("g", Path("/g"), 10, 5),)), 1.0
    )
    b = inventory_to_proto(
        HostInventory(vms=(vm,), storage=(StorageRecord("g", Path("/g"), 10, 4),)), 2.0
    )
    assert a.digest == b.digest
    c = inventory_to_proto(HostInventory(vms=(vm, vm)), 1.0)
    assert c.digest != a.digest


def test_agent_config_errors_name_the_problem(tmp_path: Path) -> None:
    cfg = agent_config.parse(
        agent_config.render(storage={"gold": "g"}, networks=[("corp", ["10.0.0.0/8"])]), tmp_path
    )
    assert cfg.storage == (("gold", tmp_path / "g"),)
    assert cfg.networks[0].subnets == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match="unknown setting"):
        agent_config.parse("colour = 'red'", tmp_path)
    with pytest.raises(ConfigError, match="kind must be"):
        agent_config.parse("[backend]\nkind = 'xen'", tmp_path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        agent_config.parse("[backend", tmp_path)
    with pytest.raises(ConfigError, match="certificate_port must be a port"):
        agent_config.parse("[replication]\ncertificate_port = 70000", tmp_path)
    assert cfg.replication.compression == "adaptive"  # what render() writes, and the default
    always = agent_config.parse("[replication]\ncompression = 'always'", tmp_path)
    assert always.replication.compression == "always"
    with pytest.raises(ConfigError, match='compression must be "adaptive" or "always"'):
        agent_config.parse("[replication]\ncompression = 'max'", tmp_path)


def test_broker_config_errors_name_the_problem() -> None:
    text = broker_config.render("v1", enrollment="127.0.0.1:1", control="127.0.0.1:2", names=("h",))
    cfg = broker_config.parse(text)
    assert cfg.heartbeat.interval == 10 and cfg.keys.default_validity == 5 * 86400
    with pytest.raises(ConfigError, match="must set vault"):
        broker_config.parse("[listen]\n")
    with pytest.raises(ConfigError, match="vault name"):
        broker_config.parse('vault = "Bad Name"')
    with pytest.raises(ConfigError, match="unknown setting"):
        broker_config.parse('vault = "v"\n[heartbeat]\nintervall = "3s"')
    with pytest.raises(ConfigError, match="not a duration"):
        broker_config.parse('vault = "v"\n[heartbeat]\ninterval = "soon"')
    with pytest.raises(ConfigError, match="must be an integer"):
        broker_config.parse('vault = "v"\n[heartbeat]\nmissed = "3"')
    assert cfg.verify.interval == 7 * 86400 and cfg.verify.repair and cfg.verify.concurrent == 1
    off = broker_config.parse('vault = "v"\n[verify]\ninterval = "0"\nrepair = false')
    assert off.verify.interval == 0 and not off.verify.repair
    with pytest.raises(ConfigError, match=r"\[verify\].*concurrent >= 1"):
        broker_config.parse('vault = "v"\n[verify]\nconcurrent = 0')


def test_commands_of_one_relationship_run_in_delivery_order(tmp_path: Path) -> None:
    """A ConfigureReplica and the RemoveRelationship that undoes it, redelivered together after
    a reconnect, must not run concurrently: the removal would finish first and the grant would
    stay. Commands of other relationships still run alongside."""
    journal = CommandJournal(tmp_path / "j.db")
    executor = CommandExecutor(journal, ManualClock())
    events: list[str] = []
    release = asyncio.Event()

    async def configure(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        events.append(f"configure {cmd.configure_replica.relationship_id} start")
        if cmd.configure_replica.relationship_id == "rel-1":
            await release.wait()
        events.append(f"configure {cmd.configure_replica.relationship_id} end")
        return control_pb2.CommandResult(configure_replica=control_pb2.ConfigureReplicaResult())

    async def remove(cmd: control_pb2.Command) -> control_pb2.CommandResult:
        events.append(f"remove {cmd.remove_relationship.relationship_id}")
        return control_pb2.CommandResult(remove_relationship=control_pb2.RemoveRelationshipResult())

    executor.register("configure_replica", configure)
    executor.register("remove_relationship", remove)

    async def ack(a: control_pb2.CommandAck) -> None:
        return None

    async def scenario() -> None:
        tasks = [
            asyncio.create_task(executor.handle(c, ack))
            for c in (
                control_pb2.Command(
                    id="c1", configure_replica=control_pb2.ConfigureReplica(relationship_id="rel-1")
                ),
                control_pb2.Command(
                    id="c2",
                    remove_relationship=control_pb2.RemoveRelationship(relationship_id="rel-1"),
                ),
                control_pb2.Command(
                    id="c3", configure_replica=control_pb2.ConfigureReplica(relationship_id="rel-2")
                ),
            )
        ]
        for _ in range(1000):  # another relationship is not held up
            if "configure rel-2 end" in events and "configure rel-1 start" in events:
                break
            await asyncio.sleep(0.01)
        assert "configure rel-2 end" in events
        assert "remove rel-1" not in events  # the removal waits for the configuration
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert events.index("configure rel-1 end") < events.index("remove rel-1")
    assert executor._order == {}  # no lock is kept for relationships with nothing running
    journal.close()
