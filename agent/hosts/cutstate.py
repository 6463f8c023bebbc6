"""``<vm>/changes/cuts.json``: the cuts of one VM and what the backend knows about its layers.

Written only by the backend, atomically (:func:`sitepair.fsutil.atomic_write`) and only while
it holds the VM's operations lock. It holds:

``seq``
    The sequence number of the newest cut (cut numbers only grow, also across rolled-back
    attempts).
``baseline_seq``
    The cut the next cut's ``changed`` starts from: the newest released cut, or the newest cut
    a resync made trustworthy again (``reset_tracking``); 0 = since the disks were created.
``cuts``
    Every cut not yet released, and the last few released ones (so a repeated
    ``release_cut`` is recognised). Each names, per disk, the layer it froze, and the file that
    holds the union bitmap its ``changed`` was computed from.
``taints``
    Reasons the tracking cannot be trusted, each with the cut it first affects. They stay
    until ``reset_tracking`` names a cut at or after that one.
``identities``
    Per disk, the identity (see :func:`agent.hosts.changelog.layer_identity`) of every
    non-active layer as the backend last left it. The active layer's identity lives in its
    change log header, because writers update it.
``pending`` / ``releasing``
    Journals of an interrupted ``take_cut`` / ``release_cut``, finished or undone by the next
    operation (see :mod:`agent.hosts.directory`).

What every backend's cut state shares (the newest cut number, the cuts, the taints, the
versioned JSON document and how a damaged one is reported) is :class:`CutLedger` and
:func:`decode`; the Hyper-V backend's state (:mod:`agent.hosts.hyperv_state`) builds on them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from sitepair.errors import ConfigError
from sitepair.fsutil import atomic_write

STATE_VERSION = 1
#: Released cuts remembered after their release, so a repeated release is a no-op.
KEEP_RELEASED = 32


@dataclasses.dataclass
class CutDisk:
    disk_id: str
    #: The chain entry (as in vm.json) of the layer this cut froze: the cut's top.
    frozen: str
    virtual_size: int
    format: str
    #: File (relative to ``changes/``) with the union bitmap of ``changed``; "" if untrusted.
    bits: str = ""


@dataclasses.dataclass
class CutRecord:
    cut_id: str
    seq: int
    taken_at: float
    app_consistent: bool
    #: ``baseline_seq`` when the cut was taken: ``changed`` covers cuts (since_seq, seq].
    since_seq: int
    untrusted_reason: str
    disks: list[CutDisk]
    released: bool = False


@dataclasses.dataclass
class Taint:
    #: The first cut this reason affects.
    seq: int
    reason: str


@dataclasses.dataclass
class PendingCut:
    """Journal of a ``take_cut`` between its intent and its record."""

    record: CutRecord
    #: disk id -> chain entry of the new active layer (child of ``CutDisk.frozen``).
    children: dict[str, str]


@dataclasses.dataclass
class Releasing:
    """Journal of a ``release_cut``: the layers to merge, in order, per disk."""

    cut_id: str
    seq: int
    layers: dict[str, list[str]]
    #: disk id -> the layer whose merge has started (it may be partly merged).
    current: dict[str, str] = dataclasses.field(default_factory=dict)


class _Cut(Protocol):
    cut_id: str
    seq: int
    released: bool


CutT = TypeVar("CutT", bound=_Cut)
T = TypeVar("T")


@dataclasses.dataclass
class CutLedger(Generic[CutT]):
    """The part of a backend's cut state every backend has: the newest cut number (cut
    numbers only grow), the cuts, and the taints; stored as versioned JSON (:meth:`to_json`,
    read back with :func:`decode`)."""

    seq: int = 0
    cuts: list[CutT] = dataclasses.field(default_factory=list)
    taints: list[Taint] = dataclasses.field(default_factory=list)

    def find(self, cut_id: str) -> CutT | None:
        return next((c for c in self.cuts if c.cut_id == cut_id), None)

    def outstanding(self) -> list[CutT]:
        """Unreleased cuts, oldest first."""
        return sorted((c for c in self.cuts if not c.released), key=lambda c: c.seq)

    def add_taint(self, seq: int, reason: str) -> None:
        if all(t.reason != reason for t in self.taints):
            self.taints.append(Taint(seq, reason))

    def trim_released(self) -> None:
        """Forget released cuts but the newest :data:`KEEP_RELEASED`."""
        released = sorted((c for c in self.cuts if c.released), key=lambda c: c.seq)
        drop = {c.cut_id for c in released[:-KEEP_RELEASED]} if released else set()
        self.cuts = [c for c in self.cuts if c.cut_id not in drop]

    def to_json(self) -> bytes:
        doc = {"version": STATE_VERSION, **dataclasses.asdict(self)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def decode(data: bytes, where: Path, parse: Callable[[dict[str, Any]], T], *, hint: str) -> T:
    """Read a cut state document written by :meth:`CutLedger.to_json`: ``parse`` builds the
    state from the JSON object; a damaged or unknown document is a ConfigError with ``hint``
    (what the operator can do about it)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            raise ValueError(f"unsupported version {version!r}")
        return parse(doc)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{where} is damaged: {exc}", hint=hint) from exc


def taints_from(doc: dict[str, Any]) -> list[Taint]:
    return [Taint(int(t["seq"]), str(t["reason"])) for t in doc["taints"]]


def load_file(path: Path, parse: Callable[[bytes, Path], T], empty: Callable[[], T]) -> T:
    """The state in ``path`` (``parse(data, path)``), or ``empty()`` if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return empty()
    return parse(data, path)


def save_file(path: Path, state: CutLedger[Any]) -> None:
    """Replace ``path`` with ``state`` atomically (the caller holds the VM's operations lock)."""
    atomic_write(path, state.to_json())


@dataclasses.dataclass
class TrackingState(CutLedger[CutRecord]):
    """The directory and QEMU backends' cut state (``changes/cuts.json``)."""

    baseline_seq: int = 0
    identities: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    pending: PendingCut | None = None
    releasing: Releasing | None = None

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> TrackingState:
        return decode(
            data,
            where,
            lambda doc: cls(
                seq=int(doc["seq"]),
                baseline_seq=int(doc["baseline_seq"]),
                cuts=[_cut(c) for c in doc["cuts"]],
                taints=taints_from(doc),
                identities={
                    str(d): {str(k): str(v) for k, v in m.items()}
                    for d, m in doc["identities"].items()
                },
                pending=_pending(doc["pending"]) if doc.get("pending") else None,
                releasing=_releasing(doc["releasing"]) if doc.get("releasing") else None,
            ),
            hint="the VM's change tracking must be restarted: move the changes folder "
            "aside; the next cycle then needs a resync",
        )


def _cut(c: dict[str, Any]) -> CutRecord:
    return CutRecord(
        cut_id=str(c["cut_id"]),
        seq=int(c["seq"]),
        taken_at=float(c["taken_at"]),
        app_consistent=bool(c["app_consistent"]),
        since_seq=int(c["since_seq"]),
        untrusted_reason=str(c["untrusted_reason"]),
        disks=[
            CutDisk(
                disk_id=str(d["disk_id"]),
                frozen=str(d["frozen"]),
                virtual_size=int(d["virtual_size"]),
                format=str(d["format"]),
                bits=str(d.get("bits", "")),
            )
            for d in c["disks"]
        ],
        released=bool(c.get("released", False)),
    )


def _pending(p: dict[str, Any]) -> PendingCut:
    return PendingCut(
        record=_cut(p["record"]),
        children={str(k): str(v) for k, v in p["children"].items()},
    )


def _releasing(r: dict[str, Any]) -> Releasing:
    return Releasing(
        cut_id=str(r["cut_id"]),
        seq=int(r["seq"]),
        layers={str(k): [str(x) for x in v] for k, v in r["layers"].items()},
        current={str(k): str(v) for k, v in r.get("current", {}).items()},
    )


def state_path(folder: Path) -> Path:
    return folder / "changes" / "cuts.json"


def load(folder: Path) -> TrackingState:
    return load_file(state_path(folder), TrackingState.from_json, TrackingState)


def save(folder: Path, state: TrackingState) -> None:
    save_file(state_path(folder), state)
