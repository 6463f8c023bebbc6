"""The narrow Hyper-V management API the ``hyperv`` backend needs: the protocol and its types.

**Windows only, and never run against a real Hyper-V host.** Its implementation,
:class:`agent.hosts.hyperv_powershell.PowerShellHyperVApi`,
drives Hyper-V through Windows PowerShell 5.1 (the Hyper-V module and the
``root/virtualization/v2`` CIM classes) on a Windows Server 2016 or later host with the Hyper-V
role. It cannot run on Linux, and nobody has run it on Windows yet: what is tested is how it
builds each command and how it reads the JSON each command prints, against outputs written by
hand in the shape Windows PowerShell emits (``tests/hosts/test_hyperv_api.py``). The backend
above this boundary (:mod:`agent.hosts.hyperv`) is tested against ``FakeHyperVApi``
(``tests/hosts/fake_hyperv.py``), a simulation over real VHDX/VHD files. ``docs/hyperv-backend.md``
lists what that does and does not prove.

The API is deliberately small: the calls the backend makes, in Hyper-V's own terms.

=============================  ===========================================================
:meth:`HyperVApi.list_vms`     ``Get-VM``, ``Get-VMHardDiskDrive``, ``Get-VMNetworkAdapter``
``vhd_info`` / ``vhd_chain``   ``Get-VHD`` (format, type, sizes, parent), of several disks / of
                               one disk and all its parents
``list_switches``              ``Get-VMSwitch``
``create_recovery_checkpoint`` ``Msvm_VirtualSystemSnapshotService.CreateSnapshot``,
                               SnapshotType 32768 (recovery), ConsistencyLevel 1 (application
                               consistent, VSS in the guest) or 2 (crash consistent); then
                               ``Rename-VMSnapshot`` to sitepair's name
``list_checkpoints``           ``Get-VMSnapshot`` with each checkpoint's drives
``remove_checkpoint``          ``Remove-VMSnapshot`` (Hyper-V merges the checkpoint's AVHDX)
``convert_to_reference_point`` ``Msvm_VirtualSystemSnapshotService.ConvertToReferencePoint``:
                               the checkpoint is merged away, an RCT reference point keeps the
                               ``ResilientChangeTrackingIdentifiers`` of its disks
``list_reference_points``      ``Msvm_VirtualSystemReferencePoint``
``remove_reference_point``     ``Msvm_VirtualSystemReferencePointService.DestroyReferencePoint``
``virtual_disk_changes``       ``Msvm_ImageManagementService.GetVirtualDiskChanges``
``set_power``                  ``Start-VM``, ``Stop-VM`` (``-TurnOff``), ``Suspend-VM``,
                               ``Resume-VM``
``connect_nic``                ``Connect-VMNetworkAdapter`` / ``Disconnect-VMNetworkAdapter``
``new_differencing_disk``      ``New-VHD -Differencing``
``new_vm`` / ``remove_vm``     ``New-VM``, ``Set-VM``, ``Add-VMHardDiskDrive``,
                               ``Add-VMNetworkAdapter`` / ``Remove-VM``
=============================  ===========================================================

The implementation is in two modules: :mod:`agent.hosts.hyperv_powershell` builds and runs
the PowerShell scripts, :mod:`agent.hosts.hyperv_json` reads what they print.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from agent.hosts import base
from sitepair.errors import FailedPrecondition, InvalidArgument

#: Power actions :meth:`HyperVApi.set_power` knows.
POWER_ACTIONS = ("start", "stop", "turn-off", "suspend", "resume")

_SLOT_RE = re.compile(r"^(scsi|ide)(\d{1,2})-(\d{1,2})$")


class RctUnavailable(FailedPrecondition):
    """Hyper-V cannot say what changed since an RCT id (unknown, expired or reset tracking)."""


class QuiesceFailed(base.QuiesceFailed):
    """An application-consistent checkpoint failed (the guest could not be quiesced)."""


# -- what the API returns ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HvDrive:
    """A virtual hard disk drive of a VM or of a checkpoint."""

    #: Controller and location, e.g. ``scsi0-1`` (SCSI controller 0, location 1), ``ide0-0``.
    slot: str
    #: The file the drive uses: for a VM its active layer, for a checkpoint the frozen layer.
    path: str


@dataclasses.dataclass(frozen=True)
class HvNic:
    name: str
    #: Virtual switch it is connected to; "" = not connected.
    switch: str = ""
    #: ``00:15:5d:...``, lower case; "" while Hyper-V has not assigned one.
    mac: str = ""


@dataclasses.dataclass(frozen=True)
class HvVm:
    #: Hyper-V's VM id (a GUID, lower case).
    id: str
    name: str
    generation: int
    cpu_count: int
    memory_mb: int
    #: Hyper-V's VMState name: Running, Off, Paused, Saved, Starting, ...
    state: str
    #: The VM's configuration folder.
    path: str
    notes: str = ""
    drives: tuple[HvDrive, ...] = ()
    nics: tuple[HvNic, ...] = ()


@dataclasses.dataclass(frozen=True)
class HvVhd:
    path: str
    #: "vhdx" or "vhd".
    format: str
    #: "fixed", "dynamic" or "differencing".
    type: str
    virtual_size: int
    file_size: int
    #: The parent of a differencing disk, else "".
    parent_path: str = ""


@dataclasses.dataclass(frozen=True)
class HvCheckpoint:
    id: str
    name: str
    vm_id: str
    #: Hyper-V's SnapshotType name: Recovery, Standard, ...
    type: str
    drives: tuple[HvDrive, ...] = ()


@dataclasses.dataclass(frozen=True)
class HvReferencePoint:
    id: str
    vm_id: str
    #: (slot, RCT id) of each disk when the reference point was made.
    rct_ids: tuple[tuple[str, str], ...] = ()

    def rct(self) -> dict[str, str]:
        return dict(self.rct_ids)


@dataclasses.dataclass(frozen=True)
class HvChanges:
    """One answer of GetVirtualDiskChanges: the region it covered and what changed in it."""

    #: Bytes of the asked region that were processed (may be less than asked: ask again).
    processed: int
    ranges: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class NewVm:
    """What :meth:`HyperVApi.new_vm` creates."""

    name: str
    #: Folder for the VM's configuration (``New-VM -Path``).
    folder: str
    generation: int
    cpu_count: int
    memory_mb: int
    notes: str = ""
    #: (slot, VHD/VHDX path), the first one the boot disk.
    drives: tuple[tuple[str, str], ...] = ()
    #: (NIC name, switch or "").
    nics: tuple[tuple[str, str], ...] = ()


class HyperVApi(Protocol):
    """The Hyper-V calls the backend makes; ``vm_id`` is always Hyper-V's VM id."""

    def list_vms(self) -> list[HvVm]: ...

    def get_vm(self, vm_id: str) -> HvVm: ...

    def list_switches(self) -> list[str]: ...

    def vhd_info(self, paths: Sequence[str]) -> list[HvVhd]: ...

    def vhd_chain(self, path: str) -> list[HvVhd]: ...

    def create_recovery_checkpoint(
        self, vm_id: str, name: str, *, app_consistent: bool
    ) -> HvCheckpoint: ...

    def list_checkpoints(self, vm_id: str) -> list[HvCheckpoint]: ...

    def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None: ...

    def convert_to_reference_point(self, vm_id: str, checkpoint_id: str) -> HvReferencePoint: ...

    def list_reference_points(self, vm_id: str) -> list[HvReferencePoint]: ...

    def remove_reference_point(self, vm_id: str, reference_point_id: str) -> None: ...

    def virtual_disk_changes(
        self, path: str, limit_id: str, offset: int, length: int
    ) -> HvChanges: ...

    def set_power(self, vm_id: str, action: str) -> None: ...

    def connect_nic(self, vm_id: str, nic: str, switch: str) -> None: ...

    def new_differencing_disk(self, path: str, parent: str) -> None: ...

    def new_vm(self, spec: NewVm) -> HvVm: ...

    def remove_vm(self, vm_id: str) -> None: ...


# -- slots, GUIDs, quoting ---------------------------------------------------------------------
def slot_name(controller_type: str, number: int, location: int) -> str:
    """``SCSI``, 0, 1 -> ``scsi0-1``."""
    return f"{controller_type.lower()}{number}-{location}"


def parse_slot(slot: str) -> tuple[str, int, int] | None:
    """``scsi0-1`` -> (``SCSI``, 0, 1); ``None`` if ``slot`` names no controller location."""
    m = _SLOT_RE.match(slot)
    if m is None:
        return None
    return m.group(1).upper(), int(m.group(2)), int(m.group(3))


def check_guid(value: str, what: str) -> str:
    """A GUID in canonical lower-case form (the only thing allowed into a WQL filter)."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidArgument(f"{what} {value!r} is not a GUID") from exc


def notes_fields(notes: str) -> Mapping[str, str]:
    """``sitepair-<key>: value`` lines of a VM's Notes (where sitepair keeps what it must know
    of a VM it registered, so it travels with the VM)."""
    out: dict[str, str] = {}
    for line in notes.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().startswith("sitepair-"):
            out[key.strip()[len("sitepair-") :]] = value.strip()
    return out
