"""What the broker stores as JSON text about hosts and relationships, each with one codec.

Messages a host sends — its facts, its metrics, its status of each relationship — are stored in
one shape: protobuf's JSON mapping with the ``.proto`` field names (``snake_case``) and enums by
name, so a person reading the store sees the names the ``.proto`` files document. Every reader
goes through this module and gets the typed message back; nothing reads these columns with
``json.loads``.

- ``servers.facts_json`` is a :class:`~sitepair.v1.common_pb2.HostFacts`, ``servers.metrics_json``
  a :class:`~sitepair.v1.common_pb2.HostMetrics`. Brokers before this shape wrote them in
  protobuf's ``camelCase`` JSON names; the parser accepts both.
- ``relationships.primary_status_json`` / ``replica_status_json`` is a :class:`StoredStatus`:
  ``{"version": 2, "reported_at": <unix seconds>, "status": <RelationshipStatus>}``. Version 1
  (brokers before it) was the status flattened, its role, state and error code as free strings,
  ``last_success_at`` as unix seconds; :meth:`StoredStatus.decode` reads it too.

A document that does not parse (written by something else, or cut) reads as empty: a status or
a facts document is advisory, and the next report or hello replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from broker.store.base import StoreError
from broker.store.models import InventoryVm
from sitepair.protoconv import seconds, timestamp
from sitepair.v1 import common_pb2, control_pb2, replication_pb2

log = logging.getLogger("sitepair.broker.documents")

M = TypeVar("M", bound=Message)

#: The version :meth:`StoredStatus.encode` writes.
STATUS_VERSION = 2

Role = control_pb2.Role
State = control_pb2.ReplicationState
ErrorCode = replication_pb2.ErrorCode


def encode_message(message: Message) -> str:
    """A host's message as stored: JSON with the ``.proto`` field names, enums by name."""
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


def decode_message(text: str, message: M) -> M:
    """Fill ``message`` from a stored document (either JSON spelling); empty if it does not
    parse. Returns ``message``."""
    if not text or text == "{}":
        return message
    try:
        json_format.Parse(text, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        log.warning(
            "stored document unreadable; treated as empty",
            extra={"fields": {"type": message.DESCRIPTOR.name, "error": str(exc)[:200]}},
        )
        message.Clear()
    return message


def decode_facts(text: str) -> common_pb2.HostFacts:
    return decode_message(text, common_pb2.HostFacts())


def decode_metrics(text: str) -> common_pb2.HostMetrics:
    return decode_message(text, common_pb2.HostMetrics())


def load_versioned(text: str, version: int, what: str) -> dict[str, Any]:
    """The JSON object a versioned record is stored as (``{}`` for none). An object without a
    ``version`` field is from before it and reads as ``version``; anything else that is not
    ``version``, or not an object, is a :class:`StoreError` naming ``what``."""
    try:
        doc = json.loads(text or "{}")
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise StoreError(f"the {what} in the store is not a JSON object")
    if doc.get("version", version) != version:
        raise StoreError(
            f"the {what} has version {doc.get('version')!r}, this broker knows {version}",
            hint="upgrade this broker to the version that wrote it",
        )
    return doc


@dataclasses.dataclass(frozen=True)
class StoredStatus:
    """A host's last status of one relationship, as the broker keeps it."""

    status: control_pb2.RelationshipStatus
    #: When the broker received it (broker clock, unix seconds).
    reported_at: float

    @property
    def state(self) -> control_pb2.ReplicationState.ValueType:
        return self.status.state

    @property
    def last_success_at(self) -> float | None:
        """When the last cycle committed (the host's clock), None before the first one."""
        return seconds(self.status.last_success_at) or None

    def encode(self) -> str:
        return json.dumps(
            {
                "version": STATUS_VERSION,
                "reported_at": self.reported_at,
                "status": json_format.MessageToDict(self.status, preserving_proto_field_name=True),
            },
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: str) -> StoredStatus | None:
        """The stored status, or None when there is none (or it cannot be read)."""
        try:
            doc = json.loads(text or "{}")
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not doc:
            return None
        version = doc.get("version", 1)
        status = control_pb2.RelationshipStatus()
        try:
            if version == STATUS_VERSION:
                json_format.ParseDict(doc.get("status") or {}, status, ignore_unknown_fields=True)
            elif version == 1:
                _parse_v1(doc, status)
            else:
                raise ValueError(f"unknown version {version!r}")
            reported_at = float(doc.get("reported_at") or 0.0)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            log.warning(
                "stored status unreadable; treated as none",
                extra={"fields": {"error": str(exc)[:200]}},
            )
            return None
        return cls(status=status, reported_at=reported_at)


#: Version 1's free strings, by what they mean now.
_V1_ROLES = {"primary": Role.ROLE_PRIMARY, "replica": Role.ROLE_REPLICA}
_V1_STATES = {
    "initial-replication-pending": State.STATE_INITIAL_PENDING,
    "initial-replication": State.STATE_INITIAL_REPLICATION,
    "replicating": State.STATE_REPLICATING,
    "protected": State.STATE_PROTECTED,
    "resynchronizing": State.STATE_RESYNCHRONIZING,
    "resync-required": State.STATE_RESYNC_REQUIRED,
    "paused": State.STATE_PAUSED,
    "waiting-for-import": State.STATE_WAITING_FOR_IMPORT,
    "fenced": State.STATE_FENCED,
    "waiting-for-initial": State.STATE_WAITING_FOR_INITIAL,
    "replica": State.STATE_REPLICA,
    "error": State.STATE_REPLICA_ERROR,
}
_V1_ERRORS = {
    "protocol": ErrorCode.ERROR_PROTOCOL,
    "busy": ErrorCode.ERROR_BUSY,
    "stale-epoch": ErrorCode.ERROR_STALE_EPOCH,
    "wrong-base": ErrorCode.ERROR_WRONG_BASE,
    "wrong-disks": ErrorCode.ERROR_WRONG_DISKS,
    "wrong-relationship": ErrorCode.ERROR_WRONG_RELATIONSHIP,
    "bad-header": ErrorCode.ERROR_BAD_HEADER,
    "bad-digest": ErrorCode.ERROR_BAD_DIGEST,
    "incomplete": ErrorCode.ERROR_INCOMPLETE,
    "disk-full": ErrorCode.ERROR_DISK_FULL,
    "io-error": ErrorCode.ERROR_IO,
    "error": ErrorCode.ERROR_REFUSED,
    "unavailable": ErrorCode.ERROR_UNAVAILABLE,
    "failed_precondition": ErrorCode.ERROR_FAILED_PRECONDITION,
    "invalid_argument": ErrorCode.ERROR_INVALID_ARGUMENT,
    "not_found": ErrorCode.ERROR_NOT_FOUND,
    "permission_denied": ErrorCode.ERROR_PERMISSION_DENIED,
    "unauthenticated": ErrorCode.ERROR_UNAUTHENTICATED,
    "deadline_exceeded": ErrorCode.ERROR_DEADLINE_EXCEEDED,
    "resource_exhausted": ErrorCode.ERROR_RESOURCE_EXHAUSTED,
    "data_loss": ErrorCode.ERROR_DATA_LOSS,
    "internal": ErrorCode.ERROR_INTERNAL,
}


def _parse_v1(doc: dict[str, Any], status: control_pb2.RelationshipStatus) -> None:
    flat = {k: v for k, v in doc.items() if k not in ("reported_at", "last_success_at")}
    role = flat.pop("role", "")
    state = flat.pop("state", "")
    code = flat.pop("last_error_code", "")
    json_format.ParseDict(flat, status, ignore_unknown_fields=True)
    status.role = _V1_ROLES.get(role, Role.ROLE_UNSPECIFIED)
    status.state = _V1_STATES.get(state, State.REPLICATION_STATE_UNSPECIFIED)
    status.last_error_code = (
        _V1_ERRORS.get(code, ErrorCode.ERROR_OTHER) if code else ErrorCode.ERROR_NONE
    )
    last = doc.get("last_success_at")
    if last:
        status.last_success_at.CopyFrom(timestamp(float(last)))


def state_name(state: control_pb2.ReplicationState.ValueType) -> str:
    """How a reported state reads to an operator: ``STATE_RESYNC_REQUIRED`` -> "resync required"."""
    name = control_pb2.ReplicationState.Name(state)
    return name.removeprefix("STATE_").replace("_", " ").lower() if state else "unknown"


def status_of(text: str) -> control_pb2.RelationshipStatus:
    """The stored status's message; an empty one when there is none yet."""
    stored = StoredStatus.decode(text)
    return stored.status if stored is not None else control_pb2.RelationshipStatus()


def progress_message(status: control_pb2.RelationshipStatus) -> str:
    """What a job step shows while it waits on a host's cycles: the state and the last error."""
    if not status.relationship_id:
        return "waiting for the first report"
    message = state_name(status.state)
    if status.last_error:
        message += f"; last error: {status.last_error}"
    return message


#: Largest command result kept (its JSON); a larger one is dropped, the command still counts.
MAX_STORED_RESULT = 1 << 20
#: Keys of version 1 results (free JSON objects) that have another name in the typed results.
_V1_RESULT_KEYS = {"relationship": "relationship_id", "cleaned": "done", "cancelled": "done"}


def encode_result(result: control_pb2.CommandResult) -> str:
    """A command's result as stored in ``commands.result_json``: the typed result's JSON
    (``{"<kind>": {...}}``); "" when it is over :data:`MAX_STORED_RESULT`."""
    text = encode_message(result)
    if len(text) > MAX_STORED_RESULT:
        log.warning(
            "command result too large to keep",
            extra={"fields": {"kind": result.WhichOneof("body"), "bytes": len(text)}},
        )
        return ""
    return text


def decode_result(kind: str, text: str) -> control_pb2.CommandResult:
    """A stored command result, typed. Results stored by brokers before typed results (free
    JSON objects) are read as far as their keys match; an unreadable one is empty."""
    result = control_pb2.CommandResult()
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict) or not doc:
        return result
    fields = control_pb2.CommandResult.DESCRIPTOR.oneofs_by_name["body"].fields
    kinds = {f.name for f in fields}
    if len(doc) != 1 or next(iter(doc)) not in kinds:  # version 1: the kind's free object
        if kind not in kinds:
            return result
        doc = {kind: {_V1_RESULT_KEYS.get(k, k): v for k, v in doc.items()}}
    try:
        json_format.ParseDict(doc, result, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        log.warning(
            "stored command result unreadable; treated as empty",
            extra={"fields": {"kind": kind, "error": str(exc)[:200]}},
        )
        result.Clear()
    return result


def result_fields(result: control_pb2.CommandResult) -> dict[str, Any]:
    """A command's result as a job's result shows it: the kind's fields, zero values included."""
    kind = result.WhichOneof("body")
    if kind is None:
        return {}
    return json_format.MessageToDict(
        getattr(result, kind),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


@dataclasses.dataclass(frozen=True)
class Verification:
    """``relationships.verify_json``: the last comparison of a replica with its source, and
    the last attempt at one (for the schedule), as ``{"version": 1, ...}`` with these fields.
    Documents from before the version field have the same keys (``job`` for ``job_id``)."""

    #: When the last verification finished with a result (0 = never).
    at: float = 0.0
    job_id: str = ""
    by: str = ""
    #: The replica's cycle sequence that was compared.
    sequence: int = 0
    mismatched_bytes: int = 0
    repaired: bool = False
    #: When a scheduled verification last started (it may not have finished).
    attempted_at: float = 0.0

    VERSION = 1

    def encode(self) -> str:
        doc = dataclasses.asdict(self)
        doc["version"] = self.VERSION
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> Verification:
        try:
            doc = load_versioned(text, cls.VERSION, "verification record")
        except StoreError as exc:
            log.warning("verification record ignored", extra={"fields": {"why": exc.message}})
            return cls()
        try:
            return cls(
                at=float(doc.get("at") or 0.0),
                job_id=str(doc.get("job_id", doc.get("job", ""))),
                by=str(doc.get("by", "")),
                sequence=int(doc.get("sequence") or 0),
                mismatched_bytes=int(doc.get("mismatched_bytes") or 0),
                repaired=bool(doc.get("repaired", False)),
                attempted_at=float(doc.get("attempted_at") or 0.0),
            )
        except (TypeError, ValueError):
            log.warning("verification record unreadable; treated as never verified")
            return cls()


@dataclasses.dataclass(frozen=True)
class ProtectedDisk:
    id: str
    format: str
    virtual_size: int
    file_size: int = 0
    storage_class: str = ""
    path: str = ""


@dataclasses.dataclass(frozen=True)
class ProtectedNic:
    name: str
    #: The network on the recovery side (mapped); "" = none.
    network: str = ""
    #: The network on the primary side.
    source_network: str = ""


@dataclasses.dataclass(frozen=True)
class ProtectedVm:
    """``relationships.replica_vm_json``: the VM as the broker's inventory knew it when it was
    protected (what the replica is made for and a failover recreates), stored as
    ``{"version": 1, ...}`` with these fields; documents from before the version field have
    the same keys."""

    name: str = ""
    generation: int = 2
    cpu_count: int = 1
    memory_mb: int = 1024
    disks: tuple[ProtectedDisk, ...] = ()
    nics: tuple[ProtectedNic, ...] = ()
    #: An earlier relationship's replica of this VM is reused (a checksum resync, no full copy).
    adopt: bool = False
    #: Protection was disabled and the replica left in place, for a later protection to adopt.
    replica_kept: bool = False

    VERSION = 1

    @classmethod
    def from_inventory(
        cls, vm: InventoryVm, *, net_map: dict[str, str], adopt: bool
    ) -> ProtectedVm:
        """The record of ``vm`` as its host's inventory reports it now, its NICs mapped to the
        recovery side's networks (``net_map``: source network -> target network)."""
        disks = json.loads(vm.disks_json)
        nics = json.loads(vm.nics_json)
        return cls(
            adopt=adopt,
            name=vm.name,
            generation=vm.generation,
            cpu_count=vm.cpu_count,
            memory_mb=vm.memory_mb,
            disks=tuple(
                ProtectedDisk(
                    id=str(d["id"]),
                    format=str(d["format"]),
                    virtual_size=int(d.get("virtual_size") or 0),
                    file_size=int(d.get("file_size") or 0),
                    storage_class=str(d.get("storage_class") or ""),
                    path=str(d.get("path") or ""),
                )
                for d in disks
            ),
            nics=tuple(
                ProtectedNic(
                    name=n["name"],
                    network=net_map.get(n["network"], ""),
                    source_network=n["network"],
                )
                for n in nics
            ),
        )

    def reversed(self) -> ProtectedVm:
        """The VM replicating the other way round: each NIC's two networks swap sides."""
        return dataclasses.replace(
            self,
            nics=tuple(
                ProtectedNic(n.name, network=n.source_network, source_network=n.network)
                for n in self.nics
            ),
        )

    def encode(self) -> str:
        doc = dataclasses.asdict(self)
        doc["version"] = self.VERSION
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> ProtectedVm:
        """The stored VM; a document that cannot be read is a :class:`StoreError` (a
        relationship cannot be replicated or failed over without it)."""
        doc = load_versioned(text, cls.VERSION, "protected VM's record")
        try:
            return cls(
                name=str(doc.get("name", "")),
                generation=int(doc.get("generation", 2)),
                cpu_count=int(doc.get("cpu_count", 1)),
                memory_mb=int(doc.get("memory_mb", 1024)),
                disks=tuple(
                    ProtectedDisk(
                        id=str(d["id"]),
                        format=str(d.get("format") or ""),
                        virtual_size=int(d.get("virtual_size") or 0),
                        file_size=int(d.get("file_size") or 0),
                        storage_class=str(d.get("storage_class") or ""),
                        path=str(d.get("path") or ""),
                    )
                    for d in doc.get("disks", [])
                ),
                nics=tuple(
                    ProtectedNic(
                        name=str(n["name"]),
                        network=str(n.get("network") or ""),
                        source_network=str(n.get("source_network") or ""),
                    )
                    for n in doc.get("nics", [])
                ),
                adopt=bool(doc.get("adopt", False)),
                replica_kept=bool(doc.get("replica_kept", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the protected VM's record in the store is malformed: {exc}") from exc


def committed_cut_at(replica_status_json: str, primary_status_json: str) -> float | None:
    """The cut time of the latest point the replica committed (its status's ``last_cut_at``;
    the primary's, which it sets when a cycle commits, while the replica has not reported one),
    or None before the first point. Host clock, unix seconds."""
    for text in (replica_status_json, primary_status_json):
        stored = StoredStatus.decode(text)
        if stored is not None and stored.status.HasField("last_cut_at"):
            return seconds(stored.status.last_cut_at)
    return None


def rpo_lag(replica_status_json: str, primary_status_json: str, now: float) -> float | None:
    """The RPO lag: ``now`` minus :func:`committed_cut_at` (what a failover now would lose),
    never below 0 (a host clock ahead of the broker's); None before the first point."""
    cut = committed_cut_at(replica_status_json, primary_status_json)
    return None if cut is None else max(0.0, now - cut)
