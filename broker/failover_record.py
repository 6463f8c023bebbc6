"""The failover record a relationship keeps (``relationships.failover_json``), typed.

A relationship being failed over keeps what the failover jobs need across broker restarts and
what ``vms show`` tells an operator: the job that raised the epoch, the old and the new primary,
the recovery point asked for and the VM made of it, the final cycle of a planned failover,
whether it was committed, whether the old primary is still to be fenced and whether
replication was reversed; and, separately, a test failover in place. It is stored as JSON,
``{"version": 1, ...}`` with the fields below (nested records as objects, absent ones null);
records from before the version field have the same keys and are read as well.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from broker.documents import load_versioned
from broker.store.base import StoreError
from sitepair.protoconv import seconds
from sitepair.v1 import control_pb2

VERSION = 1


@dataclasses.dataclass(frozen=True)
class MadeVm:
    """The VM a recovery host made of a recovery point (a failover or a test failover)."""

    epoch: int = 0
    test: bool = False
    #: The recovery point's cycle sequence, and when it was cut (host clock, unix seconds).
    point: int = 0
    cut_at: float = 0.0
    app_consistent: bool = False
    vm_name: str = ""
    vm_id: str = ""
    committed: bool = False
    started: bool = False

    @classmethod
    def of(cls, result: control_pb2.FailoverResult) -> MadeVm:
        return cls(
            epoch=result.epoch,
            test=result.test,
            point=result.point,
            cut_at=seconds(result.cut_at),
            app_consistent=result.app_consistent,
            vm_name=result.vm_name,
            vm_id=result.vm_id,
            committed=result.committed,
            started=result.started,
        )


@dataclasses.dataclass(frozen=True)
class FinalCycle:
    """A planned failover's last cycle of the shut-down VM, and the proof it matched."""

    sequence: int = 0
    final_bytes: int = 0
    disks_compared: int = 0
    mismatched_bytes: int = 0

    @classmethod
    def of(cls, result: control_pb2.ReplicationActionResult) -> FinalCycle:
        return cls(
            sequence=result.sequence,
            final_bytes=result.final_bytes,
            disks_compared=result.disks_compared,
            mismatched_bytes=result.mismatched_bytes,
        )


@dataclasses.dataclass(frozen=True)
class TestFailover:
    """A test failover in place (it runs beside production replication)."""

    __test__ = False  # a domain name, not a pytest test class

    #: The network the test VM's NICs are on ("" = none).
    network: str = ""
    #: Whether the test created that network (its cleanup removes it).
    created_network: bool = False
    job: str = ""
    result: MadeVm | None = None


@dataclasses.dataclass(frozen=True)
class FailoverRecord:
    """A relationship's failover record; the empty record means no failover in place."""

    #: The failover job that raised the epoch ("" = no failover in place).
    job: str = ""
    #: "planned" or "unplanned".
    type: str = ""
    epoch: int = 0
    epoch_before: int = 0
    old_primary: str = ""
    new_primary: str = ""
    #: The recovery point asked for: "latest", "latest-app-consistent" or a sequence.
    point: str = ""
    #: The relationship's state before the failover (a cancel goes back to it).
    previous_state: str = ""
    committed: bool = False
    fence_pending: bool = False
    reversed: bool = False
    final: FinalCycle | None = None
    result: MadeVm | None = None
    test: TestFailover | None = None

    def encode(self) -> str:
        if self == FailoverRecord():
            return "{}"
        doc = dataclasses.asdict(self)
        doc["version"] = VERSION
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> FailoverRecord:
        """The stored record (the empty one for none); a damaged record is a StoreError: the
        failover jobs cannot go on without it."""
        doc = load_versioned(text, VERSION, "relationship's failover record")
        try:
            return cls(
                job=str(doc.get("job", "")),
                type=str(doc.get("type", "")),
                epoch=int(doc.get("epoch") or 0),
                epoch_before=int(doc.get("epoch_before") or 0),
                old_primary=str(doc.get("old_primary", "")),
                new_primary=str(doc.get("new_primary", "")),
                point=str(doc.get("point", "")),
                previous_state=str(doc.get("previous_state", "")),
                committed=bool(doc.get("committed", False)),
                fence_pending=bool(doc.get("fence_pending", False)),
                reversed=bool(doc.get("reversed", False)),
                final=_final(doc.get("final")),
                result=_made(doc.get("result")),
                test=_test(doc.get("test")),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise StoreError(
                f"the relationship's failover record in the store is malformed: {exc}"
            ) from exc


def _made(doc: Any) -> MadeVm | None:
    if not doc:
        return None
    return MadeVm(
        epoch=int(doc.get("epoch") or 0),
        test=bool(doc.get("test", False)),
        point=int(doc.get("point") or 0),
        cut_at=float(doc.get("cut_at") or 0.0),
        app_consistent=bool(doc.get("app_consistent", False)),
        vm_name=str(doc.get("vm_name", "")),
        vm_id=str(doc.get("vm_id", "")),
        committed=bool(doc.get("committed", False)),
        started=bool(doc.get("started", False)),
    )


def _final(doc: Any) -> FinalCycle | None:
    if not doc:
        return None
    return FinalCycle(
        sequence=int(doc.get("sequence") or 0),
        final_bytes=int(doc.get("final_bytes") or 0),
        disks_compared=int(doc.get("disks_compared") or 0),
        mismatched_bytes=int(doc.get("mismatched_bytes") or 0),
    )


def _test(doc: Any) -> TestFailover | None:
    if not doc:
        return None
    return TestFailover(
        network=str(doc.get("network") or ""),
        created_network=bool(doc.get("created_network", False)),
        job=str(doc.get("job", "")),
        result=_made(doc.get("result")),
    )
