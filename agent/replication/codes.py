"""Why a cycle failed, as the wire says it: ``sitepair.v1.ErrorCode``.

The replica refuses a cycle with a code (``Refused.code``); the sender records the code of its
last failure (``RelationshipStatus.last_error_code``): the replica's refusal, or, for its own
failures, the kind of :class:`~sitepair.errors.SitepairError` (its gRPC status name). Messages
and log fields show a code by its readable name, "stale-epoch" for ``ERROR_STALE_EPOCH``.
"""

from __future__ import annotations

from typing import TypeAlias

from sitepair.errors import SitepairError, StaleEpoch
from sitepair.v1 import replication_pb2

ErrorCode: TypeAlias = replication_pb2.ErrorCode.ValueType

PROTOCOL = replication_pb2.ERROR_PROTOCOL
BUSY = replication_pb2.ERROR_BUSY
STALE_EPOCH = replication_pb2.ERROR_STALE_EPOCH
WRONG_BASE = replication_pb2.ERROR_WRONG_BASE
WRONG_DISKS = replication_pb2.ERROR_WRONG_DISKS
WRONG_RELATIONSHIP = replication_pb2.ERROR_WRONG_RELATIONSHIP
BAD_HEADER = replication_pb2.ERROR_BAD_HEADER
BAD_DIGEST = replication_pb2.ERROR_BAD_DIGEST
INCOMPLETE = replication_pb2.ERROR_INCOMPLETE
DISK_FULL = replication_pb2.ERROR_DISK_FULL
IO = replication_pb2.ERROR_IO
REFUSED = replication_pb2.ERROR_REFUSED
UNAVAILABLE = replication_pb2.ERROR_UNAVAILABLE
OTHER = replication_pb2.ERROR_OTHER


def code_name(code: ErrorCode) -> str:
    """The readable name of ``code``: "stale-epoch", "disk-full"; "" for none."""
    if code == replication_pb2.ERROR_NONE:
        return ""
    try:
        name = replication_pb2.ErrorCode.Name(code)
    except ValueError:
        return f"code-{int(code)}"  # from a newer peer
    return name.removeprefix("ERROR_").lower().replace("_", "-")


def code_of(exc: BaseException) -> ErrorCode:
    """The code of the sender's own failure ``exc``: by the kind of error (its status name),
    ``ERROR_OTHER`` for a kind the wire does not name."""
    if isinstance(exc, StaleEpoch):
        return STALE_EPOCH
    status = exc.status if isinstance(exc, SitepairError) else "INTERNAL"
    try:
        return replication_pb2.ErrorCode.Value(f"ERROR_{status}")
    except ValueError:
        return OTHER
