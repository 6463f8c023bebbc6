"""A Hyper-V VM in sitepair's terms: its ids, disk names, state, NICs and disk chains.

A VM sitepair registered (a failover of a replica) carries sitepair's VM id and its disk names
in its Notes (``sitepair-vm-id: ...``, ``sitepair-disks: scsi0-0=os;...``); other VMs are known
by Hyper-V's id and their disks by controller location (``scsi0-1``). A VM's definition as
``Get-VM`` gave it is kept as JSON (:func:`vm_to_json`) where a failover must make it again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from agent.hosts.base import NicRecord
from agent.hosts.hyperv_api import HvDrive, HvNic, HvVm, HyperVApi, notes_fields
from sitepair.errors import FailedPrecondition

#: Hyper-V state names in the contract's words (others are reported lower-cased).
STATES = {"Running": "running", "Off": "off", "Paused": "paused", "Saved": "saved"}


def sitepair_id(vm: HvVm) -> str:
    return notes_fields(vm.notes).get("vm-id") or vm.id


def disk_names(vm: HvVm) -> dict[str, str]:
    """slot -> disk id, as the Notes of a VM sitepair registered name them (else the slot)."""
    raw = notes_fields(vm.notes).get("disks", "")
    out = {}
    for item in raw.split(";"):
        slot, sep, disk_id = item.strip().partition("=")
        if sep and slot and disk_id:
            out[slot] = disk_id
    return out


def state_name(hv_state: str) -> str:
    return STATES.get(hv_state, hv_state.lower())


def nics_of(vm: HvVm) -> tuple[NicRecord, ...]:
    return tuple(NicRecord(name=n.name, network=n.switch, mac=n.mac) for n in vm.nics)


def vm_to_json(vm: HvVm) -> str:
    """A VM's definition as ``Get-VM`` gave it, as JSON (kept in a failover record)."""
    return json.dumps(dataclasses.asdict(vm), sort_keys=True)


def vm_from_json(text: str) -> HvVm:
    try:
        doc = json.loads(text)
        return HvVm(
            id=str(doc["id"]),
            name=str(doc["name"]),
            generation=int(doc["generation"]),
            cpu_count=int(doc["cpu_count"]),
            memory_mb=int(doc["memory_mb"]),
            state=str(doc["state"]),
            path=str(doc["path"]),
            notes=str(doc["notes"]),
            drives=tuple(HvDrive(slot=str(d["slot"]), path=str(d["path"])) for d in doc["drives"]),
            nics=tuple(
                HvNic(name=str(n["name"]), switch=str(n["switch"]), mac=str(n["mac"]))
                for n in doc["nics"]
            ),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FailedPrecondition(
            f"the definition of the VM a failover replaced cannot be read: {exc}",
            hint="make the old VM again by hand (New-VM over its disk files); the failover "
            "record in the replica's state.json names them under previous_vm",
        ) from exc


def same_drives(a: HvVm, b: HvVm) -> bool:
    return {(d.slot, d.path.lower()) for d in a.drives} == {
        (d.slot, d.path.lower()) for d in b.drives
    }


def chain_of(api: HyperVApi, path: str) -> list[Path]:
    """The chain of the disk ``path`` (``Get-VHD`` and its parents), base first."""
    return [Path(v.path or path) for v in reversed(api.vhd_chain(path))]
