"""Reading what the PowerShell scripts of :mod:`agent.hosts.hyperv_powershell` print.

Each script prints one JSON document as its last line (``ConvertTo-Json -Compress``):
:func:`read_document` finds it and undoes Windows PowerShell 5.1's array quirks; the ``parse_*``
functions turn its objects into the types of :mod:`agent.hosts.hyperv_api`, refusing a field
that is missing or of the wrong type with an error that names the cmdlet; a failure the script
reported becomes a :mod:`sitepair.errors` exception (:func:`command_error`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.hosts.hyperv_api import (
    HvChanges,
    HvCheckpoint,
    HvDrive,
    HvNic,
    HvReferencePoint,
    HvVhd,
    HvVm,
    RctUnavailable,
    check_guid,
    slot_name,
)
from sitepair.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SitepairError,
    Unavailable,
)

#: PowerShell error categories that say "retry later" rather than "this cannot work".
_BUSY_CATEGORIES = {"ResourceBusy", "ResourceUnavailable", "OperationTimeout", "ConnectionError"}
#: GetVirtualDiskChanges return values that are transient (access denied is not: it persists).
_RCT_TRANSIENT = {
    32772: "timeout",
    32774: "system is in use",
    32777: "system is not available",
    32778: "out of memory",
}
BOM = "\ufeff"


def read_document(stdout: str) -> Any:
    """The JSON document a script printed, or ``None`` if there is none.

    The script prints its document last, on one line (``ConvertTo-Json -Compress`` escapes
    line breaks inside strings), through ``[Console]::Out`` so no formatting or wrapping
    applies. Anything before it (a ``WARNING:`` a cmdlet printed, a byte order mark) is not
    part of it: the last non-empty line is the document."""
    lines = [line.strip() for line in stdout.replace(BOM, "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    try:
        return _unwrap(json.loads(lines[-1]))
    except ValueError:
        return None


def _unwrap(value: Any) -> Any:
    """Windows PowerShell 5.1 may print an array as ``{"value": [...], "Count": n}`` (the
    script removes the type data that does it; this is the belt to those braces)."""
    if (
        isinstance(value, dict)
        and set(value) == {"value", "Count"}
        and isinstance(value["value"], list)
    ):
        return value["value"]
    return value


def command_error(cmdlet: str, where: str, err: Any, hint: str) -> SitepairError:
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or "unknown error")
    category = str(err.get("category") or "")
    text = f"{cmdlet}{where} failed: {message}"
    if category == "ObjectNotFound":
        return NotFound(text, hint=hint)
    if category == "PermissionDenied":
        return PermissionDenied(
            text, hint="run the agent as a member of Hyper-V Administrators (or as LocalSystem)"
        )
    if category in ("InvalidArgument", "InvalidData"):
        return InvalidArgument(text, hint=hint)
    if category in _BUSY_CATEGORIES:
        return Unavailable(text, hint=hint)
    return FailedPrecondition(text, hint=hint)


def _field(doc: Any, key: str, what: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise FailedPrecondition(f"unexpected output from {what}: no {key!r} in {doc!r:.200}")
    return doc[key]


def _int(doc: Any, key: str, what: str) -> int:
    value = _field(doc, key, what)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FailedPrecondition(f"unexpected output from {what}: {key} is {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise FailedPrecondition(f"unexpected output from {what}: {key} is {value!r}") from exc


def _str(doc: Any, key: str, what: str) -> str:
    value = _field(doc, key, what)
    return "" if value is None else str(value)


def _list(doc: Any, key: str, what: str) -> list[Any]:
    value = _unwrap(doc.get(key)) if isinstance(doc, dict) else None
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]  # ConvertTo-Json may print a one-element array as its element


def format_mac(raw: str) -> str:
    """``00155D010203`` -> ``00:15:5d:01:02:03`` ("" for Hyper-V's unassigned all-zero MAC)."""
    digits = re.sub(r"[^0-9A-Fa-f]", "", raw).lower()
    if len(digits) != 12 or digits == "0" * 12:
        return ""
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def parse_drive(doc: Any, what: str) -> HvDrive | None:
    """A drive, or ``None`` for one with no virtual disk file (a pass-through disk)."""
    path = _str(doc, "Path", what)
    if not path:
        return None
    return HvDrive(
        slot=slot_name(
            _str(doc, "ControllerType", what),
            _int(doc, "ControllerNumber", what),
            _int(doc, "ControllerLocation", what),
        ),
        path=path,
    )


def parse_vm(doc: Any, what: str) -> HvVm:
    drives = tuple(d for d in (parse_drive(x, what) for x in _list(doc, "Drives", what)) if d)
    nics = tuple(
        HvNic(
            name=_str(n, "Name", what),
            switch=_str(n, "SwitchName", what),
            mac=format_mac(_str(n, "MacAddress", what)),
        )
        for n in _list(doc, "Nics", what)
    )
    return HvVm(
        id=check_guid(_str(doc, "Id", what), f"{what} VM id"),
        name=_str(doc, "Name", what),
        generation=_int(doc, "Generation", what),
        cpu_count=_int(doc, "ProcessorCount", what),
        memory_mb=_int(doc, "MemoryStartup", what) // (1024 * 1024),
        state=_str(doc, "State", what),
        path=_str(doc, "Path", what),
        notes=_str(doc, "Notes", what),
        drives=drives,
        nics=nics,
    )


def parse_vhd(doc: Any, what: str) -> HvVhd:
    return HvVhd(
        path=_str(doc, "Path", what),
        format=_str(doc, "VhdFormat", what).lower(),
        type=_str(doc, "VhdType", what).lower(),
        virtual_size=_int(doc, "Size", what),
        file_size=_int(doc, "FileSize", what),
        parent_path=_str(doc, "ParentPath", what),
    )


def parse_checkpoint(doc: Any, what: str) -> HvCheckpoint:
    drives = tuple(d for d in (parse_drive(x, what) for x in _list(doc, "Drives", what)) if d)
    return HvCheckpoint(
        id=check_guid(_str(doc, "Id", what), f"{what} checkpoint id"),
        name=_str(doc, "Name", what),
        vm_id=check_guid(_str(doc, "VMId", what), f"{what} VM id"),
        type=_str(doc, "SnapshotType", what),
        drives=drives,
    )


def parse_reference_point(doc: Any, vm: HvVm, what: str) -> HvReferencePoint:
    """Join the reference point's RCT ids to the VM's drives by the path of each virtual disk
    (Windows paths compare case-insensitively). A disk that cannot be joined is left out: the
    backend then has no RCT id for it and its next cut needs a resync."""
    rct = [str(x) for x in _list(doc, "ResilientChangeTrackingIdentifiers", what)]
    paths = [str(x) for x in _list(doc, "DiskPaths", what)]
    by_path = {d.path.lower(): d.slot for d in vm.drives}
    pairs = []
    for path, rct_id in zip(paths, rct, strict=False):
        slot = by_path.get(path.lower())
        if slot and rct_id:
            pairs.append((slot, rct_id))
    return HvReferencePoint(
        id=_str(doc, "InstanceID", what), vm_id=vm.id, rct_ids=tuple(sorted(pairs))
    )


def parse_changes(doc: Any, path: str, limit_id: str) -> HvChanges:
    what = "GetVirtualDiskChanges"
    code = _int(doc, "ReturnValue", what)
    job_state = _int(doc, "JobState", what)
    if code == 4096 and job_state != 7:
        raise RctUnavailable(
            f"GetVirtualDiskChanges of {path} since RCT id {limit_id} failed: "
            f"{_str(doc, 'JobError', what)}"
        )
    if code in _RCT_TRANSIENT:
        raise Unavailable(
            f"GetVirtualDiskChanges of {path}: {_RCT_TRANSIENT[code]} ({code})",
            hint="retried at the next cycle",
        )
    if code == 32769:
        raise PermissionDenied(
            f"GetVirtualDiskChanges of {path}: access denied",
            hint="run the agent as a member of Hyper-V Administrators (or as LocalSystem)",
        )
    if code not in (0, 4096):
        raise RctUnavailable(
            f"Hyper-V cannot list the changes of {path} since RCT id {limit_id} "
            f"(GetVirtualDiskChanges returned {code})"
        )
    offsets = [int(x) for x in _list(doc, "ChangedByteOffsets", what)]
    lengths = [int(x) for x in _list(doc, "ChangedByteLengths", what)]
    if len(offsets) != len(lengths):
        raise FailedPrecondition(
            f"GetVirtualDiskChanges of {path}: {len(offsets)} offsets but {len(lengths)} lengths"
        )
    return HvChanges(
        processed=_int(doc, "ProcessedByteLength", what),
        ranges=tuple(zip(offsets, lengths, strict=True)),
    )
