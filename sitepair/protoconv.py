"""Small conversions between protobuf well-known types and our plain values."""

from __future__ import annotations

from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp


@overload
def timestamp(ts: float) -> Timestamp: ...
@overload
def timestamp(ts: None) -> None: ...
@overload
def timestamp(ts: float | None) -> Timestamp | None: ...
def timestamp(ts: float | None) -> Timestamp | None:
    """A Timestamp for ``ts`` seconds since the epoch (None stays None)."""
    if ts is None:
        return None
    t = Timestamp()
    t.FromNanoseconds(int(ts * 1e9))
    return t


def seconds(t: Timestamp) -> float:
    """Seconds since the epoch of a Timestamp (0.0 when unset)."""
    return t.seconds + t.nanos / 1e9
