"""The protection policy a cloud pair carries, with the rules Azure Site Recovery applies.

A policy is checked as a whole: each field has its allowed values, and the combinations that do
not make sense are refused with an explanation (an application-consistent snapshot every 4
hours with only 2 recovery points kept, a ticket port that collides with the certificate port,
an offline initial replication without an export folder...).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sitepair.errors import InvalidArgument

COPY_FREQUENCIES = (30, 300, 900)
AUTH_PORTS = {"certificate": 8084, "ticket": 8083}
INITIAL_METHODS = ("network", "scheduled", "offline")


@dataclasses.dataclass(frozen=True)
class Policy:
    #: Seconds between cycles: 30 s, 5 min or 15 min (Hyper-V Replica's choices).
    copy_frequency: int = 300
    #: Additional hourly recovery points kept on the replica, 0-24.
    recovery_points: int = 0
    #: Hours between application-consistent snapshots, 0 (never) to 12, fewer than the points.
    app_consistent_hours: int = 0
    compression: bool = True
    #: "certificate" (mutual TLS, port 8084) or "ticket" (TLS + broker ticket, port 8083).
    authentication: str = "certificate"
    #: Replication port on the recovery hosts; 0 = the authentication's default.
    port: int = 0
    #: "network" (now), "scheduled" (at initial_at) or "offline" (export/import).
    initial_method: str = "network"
    initial_at: float = 0.0
    export_path: str = ""
    import_path: str = ""
    #: Remove the replica's disks when protection is disabled.
    delete_replica_on_disable: bool = False
    #: Bandwidth limit per VM, bytes per second (0 = unlimited).
    bandwidth_limit: int = 0

    @property
    def effective_port(self) -> int:
        return self.port or AUTH_PORTS[self.authentication]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Policy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise InvalidArgument(f"unknown policy field(s): {', '.join(unknown)}")
        return validate(cls(**doc))


def validate(p: Policy) -> Policy:
    if p.copy_frequency not in COPY_FREQUENCIES:
        raise InvalidArgument(
            f"copy frequency must be 30 s, 5 min or 15 min, not {p.copy_frequency} s"
        )
    if not 0 <= p.recovery_points <= 24:
        raise InvalidArgument(f"recovery points must be 0-24, not {p.recovery_points}")
    if not 0 <= p.app_consistent_hours <= 12:
        raise InvalidArgument(
            "application-consistent snapshot frequency must be 0-12 hours, "
            f"not {p.app_consistent_hours}"
        )
    if p.app_consistent_hours and p.app_consistent_hours >= p.recovery_points:
        raise InvalidArgument(
            f"an application-consistent snapshot every {p.app_consistent_hours} h needs more "
            f"than {p.app_consistent_hours} recovery points (the policy keeps {p.recovery_points})",
            hint="raise the recovery points or lower the snapshot frequency",
        )
    if p.authentication not in AUTH_PORTS:
        raise InvalidArgument(
            f"authentication must be 'certificate' or 'ticket', not {p.authentication!r}"
        )
    if p.port and not 1 <= p.port <= 65535:
        raise InvalidArgument(f"port {p.port} is not a TCP port")
    if p.initial_method not in INITIAL_METHODS:
        raise InvalidArgument(
            f"initial replication must be one of {', '.join(INITIAL_METHODS)}, "
            f"not {p.initial_method!r}"
        )
    if p.initial_method == "scheduled" and p.initial_at <= 0:
        raise InvalidArgument("a scheduled initial replication needs a start time")
    if p.initial_method == "offline" and not (p.export_path and p.import_path):
        raise InvalidArgument(
            "offline initial replication needs an export path (on the primary hosts) and an "
            "import path (on the recovery hosts)"
        )
    if p.bandwidth_limit < 0:
        raise InvalidArgument("bandwidth limit cannot be negative")
    return p
