"""Health reasons computed from what the broker knows (broker.health.evaluate)."""

from __future__ import annotations

import json

from broker.health import CRITICAL, NORMAL, WARNING, CycleHistory, HealthConfig, evaluate
from broker.store.models import Relationship, RelationshipState, Server

NOW = 1_800_000_000.0


def server(name: str, *, offset: float = 0.0, connected: bool = True) -> Server:
    return Server(
        id=f"id-{name}",
        name=name,
        site="s",
        registered_at=NOW - 100,
        registration_key_id="k",
        cert_serial="1",
        cert_not_after=NOW + 86400,
        connected=connected,
        last_heartbeat_at=NOW - 1,
        last_heartbeat_sent_at=NOW - 1 + offset,
    )


def relationship(**changes: object) -> Relationship:
    base = Relationship(
        id="rel",
        vm_id="vm",
        vm_name="web01",
        primary_cloud="a",
        recovery_cloud="b",
        primary_server="id-hv-a",
        replica_server="id-hv-b",
        state=RelationshipState.PROTECTED,
        epoch=1,
        policy_json="{}",
        replica_folder="/srv/replicas/web01",
        primary_status_json=json.dumps({"last_success_at": NOW - 10}),
        updated_at=NOW - 10,
    )
    return Relationship(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def reasons(rel: Relationship, *, replica_offset: float = 0.0) -> dict[str, str]:
    _, found = evaluate(
        rel,
        primary=server("hv-a"),
        replica=server("hv-b", offset=replica_offset),
        now=NOW,
        config=HealthConfig(),
        history=CycleHistory(),
        agent_lifetime=86400,
    )
    return {r.code: f"{r.level}: {r.message}" for r in found}


def test_a_healthy_relationship_has_no_reasons() -> None:
    assert reasons(relationship()) == {}
    assert (
        evaluate(
            relationship(),
            primary=server("hv-a"),
            replica=server("hv-b"),
            now=NOW,
            config=HealthConfig(),
            history=CycleHistory(),
            agent_lifetime=86400,
        )[0]
        == NORMAL
    )


def test_a_host_clock_far_from_the_brokers_is_named_with_its_offset() -> None:
    assert reasons(relationship(), replica_offset=30) == {}
    warn = reasons(relationship(), replica_offset=-90)["replica-host-clock"]
    assert warn.startswith(WARNING) and "hv-b is 90 s behind" in warn
    crit = reasons(relationship(), replica_offset=7200)["replica-host-clock"]
    assert crit.startswith(CRITICAL) and "7200 s ahead" in crit and "NTP" in crit


def test_a_full_replica_disk_shows_even_while_paused() -> None:
    status = {"last_success_at": NOW - 10, "last_error_code": "disk-full", "last_error": "x"}
    for paused in (False, True):
        found = reasons(relationship(primary_status_json=json.dumps(status), paused=paused))
        full = found["replica-disk-full"]
        assert full.startswith(CRITICAL) and "hv-b" in full and "/srv/replicas/web01" in full


def test_verification_mismatches_repaired_or_not() -> None:
    bad = {"at": NOW, "sequence": 7, "mismatched_bytes": 65536, "repaired": False}
    found = reasons(relationship(verify_json=json.dumps(bad)))
    assert (
        found["replica-mismatch"].startswith(CRITICAL) and "sequence 7" in found["replica-mismatch"]
    )
    fixed = reasons(relationship(verify_json=json.dumps({**bad, "repaired": True})))
    assert list(fixed) == ["replica-mismatch-repaired"]
    assert fixed["replica-mismatch-repaired"].startswith(WARNING)
    clean = reasons(relationship(verify_json=json.dumps({**bad, "mismatched_bytes": 0})))
    assert clean == {}
