"""The narrow Hyper-V management API the ``hyperv`` backend needs, and its PowerShell form.

**Windows only, and never run against a real Hyper-V host.** :class:`PowerShellHyperVApi`
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

How a command is run: the script is passed as ``-EncodedCommand`` (base64 of UTF-16LE), never
on the command line as text, because the Windows command-line parser strips the double quotes
PowerShell code needs. Every value from outside (a VM name, a path, a NIC name) enters the
script as a single-quoted PowerShell literal (:func:`ps_quote`); identifiers that reach a WQL
filter must be GUIDs (:func:`check_guid`). Objects are projected with enums turned to strings
(``ConvertTo-Json`` would print them as numbers) and printed with ``ConvertTo-Json -Compress``
through ``[Console]::Out`` on UTF-8 stdout, as its last line (:func:`read_document`: warnings
before it are ignored, PowerShell 5.1's array quirks undone). A failure prints
``{"sitepairError": {message, category, errorId}}`` and exits 3; it becomes a
:mod:`sitepair.errors` exception naming the cmdlet, the VM and what to do. A command that does
not answer within its timeout is killed (DeadlineExceeded); the Hyper-V job it started may
still finish.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from agent.hosts import base
from sitepair.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SitepairError,
    Unavailable,
)

#: SnapshotType of a recovery checkpoint in ``Msvm_VirtualSystemSnapshotService.CreateSnapshot``.
RECOVERY_SNAPSHOT = 32768
#: ``Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel``.
APP_CONSISTENT, CRASH_CONSISTENT = 1, 2
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


#: The characters PowerShell accepts as a single quote (it treats the typographic ones alike).
_PS_QUOTES = ("'", "\u2018", "\u2019", "\u201a", "\u201b")


def ps_quote(value: str) -> str:
    """``value`` as a single-quoted PowerShell literal: nothing in it is interpreted."""
    if "\x00" in value:
        raise InvalidArgument(f"{value!r} contains a NUL character")
    for q in _PS_QUOTES:
        value = value.replace(q, q + q)
    return f"'{value}'"


PsValue = str | int | bool | Sequence[str] | Sequence[int]
_PLACEHOLDER = re.compile(r"<<([a-z_]+)>>")


def render(template: str, **values: PsValue) -> str:
    """Fill ``<<name>>`` placeholders with PowerShell literals; every placeholder must be given
    and every value used."""
    used: set[str] = set()

    def literal(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise KeyError(f"no value for <<{name}>>")
        used.add(name)
        return _literal(values[name])

    out = _PLACEHOLDER.sub(literal, template)
    unused = set(values) - used
    if unused:
        raise KeyError(f"unused values: {', '.join(sorted(unused))}")
    return out


def _literal(value: PsValue) -> str:
    if isinstance(value, bool):
        return "$true" if value else "$false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return ps_quote(value)
    items = [_literal(v) for v in value]
    return "@(" + ", ".join(items) + ")"


def encode_command(script: str) -> str:
    """The ``-EncodedCommand`` form of a script."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


# -- the PowerShell implementation --------------------------------------------------------------
_PRELUDE = r"""
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false
# Windows PowerShell 5.1 prints an array it sees through an extended type as
# {"value": [...], "Count": n}; without this type data it prints the array.
Remove-TypeData System.Array -ErrorAction SilentlyContinue
$ns = 'root/virtualization/v2'
function Get-SpCim([string]$class, [string]$filter) {
  if ($filter) { Get-CimInstance -Namespace $ns -ClassName $class -Filter $filter }
  else { Get-CimInstance -Namespace $ns -ClassName $class }
}
function New-SpNotFound([string]$message) {
  [System.Management.Automation.ItemNotFoundException]::new($message)
}
function Wait-SpCimJob($job) {
  $job = Get-CimInstance -InputObject $job
  while ($job.JobState -eq 3 -or $job.JobState -eq 4) {
    Start-Sleep -Milliseconds 250
    $job = Get-CimInstance -InputObject $job
  }
  $job
}
function Wait-SpJob($r, [string]$what) {
  if ($r.ReturnValue -eq 0) { return $null }
  if ($r.ReturnValue -ne 4096) { throw "$what returned $($r.ReturnValue)" }
  $job = Wait-SpCimJob $r.Job
  if ($job.JobState -ne 7) {
    throw "$what failed: $($job.ErrorDescription) (Hyper-V error $($job.ErrorCode))"
  }
  $job
}
function Wait-SpMerge([string]$id) {
  while ((Get-VM -Id $id).Status -match 'Merg') { Start-Sleep -Milliseconds 500 }
}
function ConvertTo-SpDrive($d) {
  [pscustomobject]@{ ControllerType = $d.ControllerType.ToString();
    ControllerNumber = $d.ControllerNumber; ControllerLocation = $d.ControllerLocation;
    Path = $d.Path }
}
function ConvertTo-SpVm($vm) {
  [pscustomobject]@{ Id = $vm.Id.ToString(); Name = $vm.Name; Generation = $vm.Generation;
    ProcessorCount = $vm.ProcessorCount; MemoryStartup = $vm.MemoryStartup;
    State = $vm.State.ToString(); Path = $vm.Path; Notes = $vm.Notes;
    Drives = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object { ConvertTo-SpDrive $_ });
    Nics = @(Get-VMNetworkAdapter -VM $vm | ForEach-Object {
      [pscustomobject]@{ Name = $_.Name; SwitchName = $_.SwitchName; MacAddress = $_.MacAddress }
    }) }
}
function ConvertTo-SpVhd($v) {
  [pscustomobject]@{ Path = $v.Path; VhdFormat = $v.VhdFormat.ToString();
    VhdType = $v.VhdType.ToString(); Size = $v.Size; FileSize = $v.FileSize;
    ParentPath = $v.ParentPath }
}
function ConvertTo-SpCheckpoint($s) {
  [pscustomobject]@{ Id = $s.Id.ToString(); Name = $s.Name; VMId = $s.VMId.ToString();
    SnapshotType = $s.SnapshotType.ToString();
    Drives = @(Get-VMHardDiskDrive -VMSnapshot $s | ForEach-Object { ConvertTo-SpDrive $_ }) }
}
function ConvertTo-SpReferencePoint($rp) {
  $all = @(Get-SpCim Msvm_StorageAllocationSettingData)
  $paths = @(foreach ($id in @($rp.VirtualDiskIdentifiers)) {
    $d = $all | Where-Object { $_.InstanceID -eq $id } | Select-Object -First 1
    if ($d) { [string]$d.HostResource[0] } else { '' } })
  [pscustomobject]@{ InstanceID = $rp.InstanceID;
    VirtualSystemIdentifier = $rp.VirtualSystemIdentifier;
    ResilientChangeTrackingIdentifiers = @($rp.ResilientChangeTrackingIdentifiers);
    DiskPaths = $paths }
}
function Get-SpNic($vm, [string]$name) {
  $nic = Get-VMNetworkAdapter -VM $vm | Where-Object { $_.Name -eq $name } |
    Select-Object -First 1
  if (-not $nic) { throw (New-SpNotFound "VM $($vm.Name) has no network adapter '$name'") }
  $nic
}
"""

_WRAP = r"""
try {
  $result = @(& {
<<BODY>>
  })
  $json = ConvertTo-Json -InputObject $result -Depth 8 -Compress
  [Console]::Out.WriteLine($json)
} catch {
  $e = $_
  $doc = [pscustomobject]@{ sitepairError = [pscustomobject]@{ message = $e.Exception.Message;
    category = $e.CategoryInfo.Category.ToString(); errorId = $e.FullyQualifiedErrorId } }
  [Console]::Out.WriteLine((ConvertTo-Json -InputObject $doc -Compress))
  exit 3
}
"""

# Bodies. Rules: a <<value>> is always a single-quoted literal (render), never inside a
# double-quoted string (where PowerShell would expand "$..." in it); WQL filters take GUIDs only.
_LIST_VMS = "Get-VM | ForEach-Object { ConvertTo-SpVm $_ }"
_GET_VM = "ConvertTo-SpVm (Get-VM -Id <<vm>>)"
_LIST_SWITCHES = "Get-VMSwitch | ForEach-Object { $_.Name }"
_VHD_INFO = (
    "Get-VHD -Path <<paths>> -ErrorAction SilentlyContinue | ForEach-Object { ConvertTo-SpVhd $_ }"
)
_VHD_CHAIN = r"""
$start = <<path>>
$p = $start
$n = 0
while ($p) {
  $v = Get-VHD -Path $p
  ConvertTo-SpVhd $v
  $p = $v.ParentPath
  $n++
  if ($n -gt 256) { throw ('the chain of {0} has more than 256 layers (a loop?)' -f $start) }
}
"""
_CREATE_CHECKPOINT = r"""
$vm = Get-SpCim Msvm_ComputerSystem ("Name='{0}'" -f <<vm>>)
if (-not $vm) { throw (New-SpNotFound ('no VM with id ' + <<vm>>)) }
$svc = Get-SpCim Msvm_VirtualSystemSnapshotService
$set = ([wmiclass]'root\virtualization\v2:Msvm_VirtualSystemSnapshotSettingData').CreateInstance()
$set.ConsistencyLevel = <<consistency>>
$set.IgnoreNonSnapshottableDisks = $false
if (<<app>>) { $set.GuestBackupType = 2 }
$r = Invoke-CimMethod -InputObject $svc -MethodName CreateSnapshot -Arguments @{
  AffectedSystem = $vm; SnapshotSettings = $set.GetText(2); SnapshotType = [uint16]<<type>> }
$job = Wait-SpJob $r 'CreateSnapshot'
if ($r.ResultingSnapshot) { $snap = Get-CimInstance -InputObject $r.ResultingSnapshot }
else { $snap = Get-CimAssociatedInstance $job -ResultClassName Msvm_VirtualSystemSettingData }
$id = ([string]$snap.InstanceID) -replace '^Microsoft:', ''
Rename-VMSnapshot -VMSnapshot (Get-VMSnapshot -Id $id) -NewName <<name>>
ConvertTo-SpCheckpoint (Get-VMSnapshot -Id $id)
"""
_LIST_CHECKPOINTS = r"""
Get-VMSnapshot -VM (Get-VM -Id <<vm>>) | ForEach-Object { ConvertTo-SpCheckpoint $_ }
"""
_REMOVE_CHECKPOINT = r"""
Remove-VMSnapshot -VMSnapshot (Get-VMSnapshot -Id <<checkpoint>>)
Wait-SpMerge <<vm>>
"""
_CONVERT = r"""
$svc = Get-SpCim Msvm_VirtualSystemSnapshotService
$snap = Get-SpCim Msvm_VirtualSystemSettingData ("InstanceID='Microsoft:{0}'" -f <<checkpoint>>)
if (-not $snap) { throw (New-SpNotFound ('no checkpoint with id ' + <<checkpoint>>)) }
$r = Invoke-CimMethod -InputObject $svc -MethodName ConvertToReferencePoint -Arguments @{
  AffectedSnapshot = $snap }
$job = Wait-SpJob $r 'ConvertToReferencePoint'
if ($r.ResultingReferencePoint) { $rp = Get-CimInstance -InputObject $r.ResultingReferencePoint }
else { $rp = Get-CimAssociatedInstance $job -ResultClassName Msvm_VirtualSystemReferencePoint }
Wait-SpMerge <<vm>>
ConvertTo-SpReferencePoint $rp
"""
_LIST_REFERENCE_POINTS = r"""
Get-SpCim Msvm_VirtualSystemReferencePoint ("VirtualSystemIdentifier='{0}'" -f <<vm>>) |
  ForEach-Object { ConvertTo-SpReferencePoint $_ }
"""
_REMOVE_REFERENCE_POINT = r"""
$svc = Get-SpCim Msvm_VirtualSystemReferencePointService
$rp = Get-SpCim Msvm_VirtualSystemReferencePoint ("VirtualSystemIdentifier='{0}'" -f <<vm>>) |
  Where-Object { $_.InstanceID -eq <<reference_point>> } | Select-Object -First 1
if ($rp) {
  $r = Invoke-CimMethod -InputObject $svc -MethodName DestroyReferencePoint -Arguments @{
    AffectedReferencePoint = $rp }
  $null = Wait-SpJob $r 'DestroyReferencePoint'
}
"""
_DISK_CHANGES = r"""
$ims = Get-SpCim Msvm_ImageManagementService
$r = Invoke-CimMethod -InputObject $ims -MethodName GetVirtualDiskChanges -Arguments @{
  Path = <<path>>; LimitId = <<limit>>; TargetSnapshotId = '';
  ByteOffset = [uint64]<<offset>>; ByteLength = [uint64]<<length>> }
$jobState = 0; $jobError = ''
if ($r.ReturnValue -eq 4096) {
  $job = Wait-SpCimJob $r.Job
  $jobState = $job.JobState
  $jobError = '{0} (Hyper-V error {1})' -f $job.ErrorDescription, $job.ErrorCode
}
[pscustomobject]@{ ReturnValue = $r.ReturnValue; JobState = $jobState; JobError = $jobError;
  ProcessedByteLength = $r.ProcessedByteLength; ChangedByteOffsets = @($r.ChangedByteOffsets);
  ChangedByteLengths = @($r.ChangedByteLengths) }
"""
_POWER = {
    "start": "Start-VM -VM (Get-VM -Id <<vm>>)",
    "stop": "Stop-VM -VM (Get-VM -Id <<vm>>) -Force",
    "turn-off": "Stop-VM -VM (Get-VM -Id <<vm>>) -TurnOff -Force",
    "suspend": "Suspend-VM -VM (Get-VM -Id <<vm>>)",
    "resume": "Resume-VM -VM (Get-VM -Id <<vm>>)",
}
_CONNECT_NIC = r"""
$nic = Get-SpNic (Get-VM -Id <<vm>>) <<nic>>
if (<<switch>> -eq '') { Disconnect-VMNetworkAdapter -VMNetworkAdapter $nic }
else { Connect-VMNetworkAdapter -VMNetworkAdapter $nic -SwitchName <<switch>> }
"""
_NEW_DIFFERENCING = "$null = New-VHD -Path <<path>> -ParentPath <<parent>> -Differencing"
_NEW_VM = r"""
$vm = New-VM -Name <<name>> -Generation <<generation>> -MemoryStartupBytes <<memory>> `
  -Path <<folder>> -NoVHD
Set-VM -VM $vm -ProcessorCount <<cpu>> -Notes <<notes>>
Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter
$types = <<types>>; $numbers = <<numbers>>; $locations = <<locations>>; $paths = <<paths>>
for ($i = 0; $i -lt $paths.Count; $i++) {
  if ($types[$i] -eq 'SCSI') {
    while (@(Get-VMScsiController -VM $vm).Count -le $numbers[$i]) { Add-VMScsiController -VM $vm }
  }
  Add-VMHardDiskDrive -VM $vm -ControllerType $types[$i] -ControllerNumber $numbers[$i] `
    -ControllerLocation $locations[$i] -Path $paths[$i]
}
if (<<generation>> -eq 2 -and $paths.Count -gt 0) {
  Set-VMFirmware -VM $vm -FirstBootDevice (Get-VMHardDiskDrive -VM $vm | Select-Object -First 1)
}
$nicNames = <<nic_names>>; $nicSwitches = <<nic_switches>>
for ($i = 0; $i -lt $nicNames.Count; $i++) {
  if ($nicSwitches[$i]) {
    Add-VMNetworkAdapter -VM $vm -Name $nicNames[$i] -SwitchName $nicSwitches[$i]
  } else { Add-VMNetworkAdapter -VM $vm -Name $nicNames[$i] }
}
ConvertTo-SpVm (Get-VM -Id $vm.Id)
"""
_REMOVE_VM = r"""
$vm = Get-VM -Id <<vm>>
if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
Remove-VM -VM $vm -Force
"""


@dataclasses.dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], float], RunResult]


def run_process(argv: Sequence[str], timeout: float) -> RunResult:
    """Run PowerShell (no window, no stdin); raises ``subprocess.TimeoutExpired``."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    done = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        creationflags=flags,
    )
    return RunResult(
        done.returncode,
        done.stdout.decode("utf-8-sig", errors="replace"),
        done.stderr.decode("utf-8", errors="replace"),
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


class PowerShellHyperVApi:
    """:class:`HyperVApi` over ``powershell.exe`` (Windows only; see the module docstring).

    ``runner`` runs one process (tests pass one that answers with recorded output);
    ``timeout`` bounds ordinary calls, ``long_timeout`` the ones that merge disks or wait for a
    guest (checkpoints, their removal, reference points, shutdown)."""

    def __init__(
        self,
        *,
        powershell: str = "powershell.exe",
        runner: Runner = run_process,
        timeout: float = 120.0,
        long_timeout: float = 3600.0,
    ) -> None:
        self.powershell = powershell
        self._runner = runner
        self.timeout = timeout
        self.long_timeout = long_timeout

    # -- running one script ---------------------------------------------------------------
    def argv(self, body: str) -> list[str]:
        script = _PRELUDE + _WRAP.replace("<<BODY>>", body)
        return [
            self.powershell,
            "-NoProfile",
            "-NonInteractive",
            "-ExecutionPolicy",
            "Bypass",
            "-EncodedCommand",
            encode_command(script),
        ]

    def _call(
        self, cmdlet: str, body: str, *, vm: str = "", hint: str, long: bool = False
    ) -> list[Any]:
        where = f" for VM {vm}" if vm else ""
        timeout = self.long_timeout if long else self.timeout
        try:
            done = self._runner(self.argv(body), timeout)
        except FileNotFoundError as exc:
            raise FailedPrecondition(
                f"{cmdlet}{where}: {self.powershell} was not found; the hyperv backend needs "
                "Windows PowerShell 5.1 with the Hyper-V module",
                hint="install it with: Install-WindowsFeature Hyper-V-PowerShell",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise DeadlineExceeded(
                f"{cmdlet}{where} did not finish within {timeout:g} s (the Hyper-V job it "
                "started may still be running)",
                hint=hint,
            ) from exc
        out = done.stdout.replace(_BOM, "").strip()
        doc = read_document(out)
        if done.returncode == 3 and isinstance(doc, dict) and "sitepairError" in doc:
            raise _error(cmdlet, where, doc["sitepairError"], hint)
        if done.returncode != 0 or doc is None:
            tail = (done.stderr.strip() or out)[-800:]
            raise FailedPrecondition(
                f"{cmdlet}{where}: PowerShell exited with code {done.returncode}"
                + (f": {tail}" if tail else ""),
                hint=hint,
            )
        if isinstance(doc, dict):
            return [doc]  # defensive: a lone object where an array was asked for
        if not isinstance(doc, list):
            raise FailedPrecondition(f"{cmdlet}{where}: unexpected output {out[:200]!r}")
        return [d for d in doc if d is not None]

    # -- inventory ------------------------------------------------------------------------
    def list_vms(self) -> list[HvVm]:
        docs = self._call("Get-VM", _LIST_VMS, hint="check that the Hyper-V role is installed")
        return [parse_vm(d, "Get-VM") for d in docs]

    def get_vm(self, vm_id: str) -> HvVm:
        vm_id = check_guid(vm_id, "VM id")
        docs = self._call(
            "Get-VM", render(_GET_VM, vm=vm_id), vm=vm_id, hint="check the VM with Get-VM"
        )
        if not docs:
            raise NotFound(f"Get-VM: no VM with id {vm_id} on this host")
        return parse_vm(docs[0], "Get-VM")

    def list_switches(self) -> list[str]:
        docs = self._call("Get-VMSwitch", _LIST_SWITCHES, hint="check Get-VMSwitch")
        return [str(d) for d in docs]

    def vhd_info(self, paths: Sequence[str]) -> list[HvVhd]:
        """The disks of ``paths`` that exist (the others are left out)."""
        if not paths:
            return []
        docs = self._call(
            "Get-VHD", render(_VHD_INFO, paths=list(paths)), hint="check the disks with Get-VHD"
        )
        return [parse_vhd(d, "Get-VHD") for d in docs]

    def vhd_chain(self, path: str) -> list[HvVhd]:
        """``path`` and its parents, ``path`` first."""
        docs = self._call(
            "Get-VHD",
            render(_VHD_CHAIN, path=path),
            hint=f"check that {path} and its parents exist and the agent's account may read them",
        )
        if not docs:
            raise NotFound(f"Get-VHD: no virtual disk at {path}")
        return [parse_vhd(d, "Get-VHD") for d in docs]

    # -- checkpoints and reference points -----------------------------------------------------
    def create_recovery_checkpoint(
        self, vm_id: str, name: str, *, app_consistent: bool
    ) -> HvCheckpoint:
        vm_id = check_guid(vm_id, "VM id")
        body = render(
            _CREATE_CHECKPOINT,
            vm=vm_id,
            consistency=APP_CONSISTENT if app_consistent else CRASH_CONSISTENT,
            app=app_consistent,
            type=RECOVERY_SNAPSHOT,
            name=name,
        )
        try:
            docs = self._call(
                "CreateSnapshot (recovery checkpoint)",
                body,
                vm=vm_id,
                long=True,
                hint="check the VM's checkpoint settings and free space next to its disks "
                "(Get-VM | Format-List CheckpointType)",
            )
        except FailedPrecondition as exc:
            if app_consistent and not isinstance(exc, NotFound | PermissionDenied):
                raise QuiesceFailed(
                    exc.message, hint="check the guest's Backup integration service (VSS)"
                ) from exc
            raise
        if not docs:
            raise FailedPrecondition(f"CreateSnapshot for VM {vm_id} returned no checkpoint")
        return parse_checkpoint(docs[0], "CreateSnapshot")

    def list_checkpoints(self, vm_id: str) -> list[HvCheckpoint]:
        vm_id = check_guid(vm_id, "VM id")
        docs = self._call(
            "Get-VMSnapshot",
            render(_LIST_CHECKPOINTS, vm=vm_id),
            vm=vm_id,
            hint="check the VM's checkpoints in Hyper-V Manager",
        )
        return [parse_checkpoint(d, "Get-VMSnapshot") for d in docs]

    def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        checkpoint_id = check_guid(checkpoint_id, "checkpoint id")
        self._call(
            "Remove-VMSnapshot",
            render(_REMOVE_CHECKPOINT, vm=vm_id, checkpoint=checkpoint_id),
            vm=vm_id,
            long=True,
            hint="the merge of the checkpoint's disk failed; check free space and the VM's "
            "status in Hyper-V Manager, then retry",
        )

    def convert_to_reference_point(self, vm_id: str, checkpoint_id: str) -> HvReferencePoint:
        vm_id = check_guid(vm_id, "VM id")
        checkpoint_id = check_guid(checkpoint_id, "checkpoint id")
        docs = self._call(
            "ConvertToReferencePoint",
            render(_CONVERT, vm=vm_id, checkpoint=checkpoint_id),
            vm=vm_id,
            long=True,
            hint="the checkpoint stays; the next cycle retries (only recovery checkpoints can "
            "become reference points)",
        )
        if not docs:
            raise FailedPrecondition(f"ConvertToReferencePoint for VM {vm_id} returned nothing")
        return parse_reference_point(docs[0], self.get_vm(vm_id), "ConvertToReferencePoint")

    def list_reference_points(self, vm_id: str) -> list[HvReferencePoint]:
        vm_id = check_guid(vm_id, "VM id")
        docs = self._call(
            "Msvm_VirtualSystemReferencePoint",
            render(_LIST_REFERENCE_POINTS, vm=vm_id),
            vm=vm_id,
            hint="check the Hyper-V Virtual Machine Management service",
        )
        if not docs:
            return []
        vm = self.get_vm(vm_id)
        return [parse_reference_point(d, vm, "Msvm_VirtualSystemReferencePoint") for d in docs]

    def remove_reference_point(self, vm_id: str, reference_point_id: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        self._call(
            "DestroyReferencePoint",
            render(_REMOVE_REFERENCE_POINT, vm=vm_id, reference_point=reference_point_id),
            vm=vm_id,
            hint="an old reference point only costs a little RCT history; retried next release",
        )

    def virtual_disk_changes(self, path: str, limit_id: str, offset: int, length: int) -> HvChanges:
        docs = self._call(
            "GetVirtualDiskChanges",
            render(_DISK_CHANGES, path=path, limit=limit_id, offset=offset, length=length),
            hint=f"check {path}",
        )
        if not docs:
            raise FailedPrecondition(f"GetVirtualDiskChanges of {path} returned nothing")
        return parse_changes(docs[0], path, limit_id)

    # -- power, NICs, VMs ---------------------------------------------------------------------
    def set_power(self, vm_id: str, action: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        if action not in _POWER:
            raise InvalidArgument(f"unknown power action {action!r}")
        cmdlet = _POWER[action].split(" ", 1)[0]
        self._call(
            cmdlet,
            render(_POWER[action], vm=vm_id),
            vm=vm_id,
            long=action == "stop",
            hint="a guest without the Shutdown integration service cannot shut down on request: "
            "shut it down inside the guest, or turn it off"
            if action == "stop"
            else "check the VM's state in Hyper-V Manager",
        )

    def connect_nic(self, vm_id: str, nic: str, switch: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        self._call(
            "Disconnect-VMNetworkAdapter" if not switch else "Connect-VMNetworkAdapter",
            render(_CONNECT_NIC, vm=vm_id, nic=nic, switch=switch),
            vm=vm_id,
            hint="check the virtual switch exists on this host (Get-VMSwitch)",
        )

    def new_differencing_disk(self, path: str, parent: str) -> None:
        self._call(
            "New-VHD",
            render(_NEW_DIFFERENCING, path=path, parent=parent),
            hint=f"check that the folder of {path} exists and {parent} is readable",
        )

    def new_vm(self, spec: NewVm) -> HvVm:
        slots = []
        for slot, _path in spec.drives:
            parsed = parse_slot(slot)
            if parsed is None:
                raise InvalidArgument(f"{slot!r} names no controller location (e.g. scsi0-1)")
            slots.append(parsed)
        body = render(
            _NEW_VM,
            name=spec.name,
            generation=spec.generation,
            memory=spec.memory_mb * 1024 * 1024,
            folder=spec.folder,
            cpu=spec.cpu_count,
            notes=spec.notes,
            types=[t for t, _n, _l in slots],
            numbers=[n for _t, n, _l in slots],
            locations=[loc for _t, _n, loc in slots],
            paths=[p for _s, p in spec.drives],
            nic_names=[n for n, _s in spec.nics],
            nic_switches=[s for _n, s in spec.nics],
        )
        docs = self._call(
            "New-VM",
            body,
            vm=spec.name,
            long=True,
            hint="a half-made VM may be left: remove it with Remove-VM (its disks stay)",
        )
        if not docs:
            raise FailedPrecondition(f"New-VM {spec.name} returned no VM")
        return parse_vm(docs[0], "New-VM")

    def remove_vm(self, vm_id: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        self._call(
            "Remove-VM",
            render(_REMOVE_VM, vm=vm_id),
            vm=vm_id,
            long=True,
            hint="remove it in Hyper-V Manager (its disk files are never deleted by Remove-VM)",
        )


# -- parsing -----------------------------------------------------------------------------------
_BOM = "\ufeff"


def read_document(stdout: str) -> Any:
    """The JSON document a script printed, or ``None`` if there is none.

    The script prints its document last, on one line (``ConvertTo-Json -Compress`` escapes
    line breaks inside strings), through ``[Console]::Out`` so no formatting or wrapping
    applies. Anything before it (a ``WARNING:`` a cmdlet printed, a byte order mark) is not
    part of it: the last non-empty line is the document."""
    lines = [line.strip() for line in stdout.replace(_BOM, "").splitlines()]
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


def _error(cmdlet: str, where: str, err: Any, hint: str) -> SitepairError:
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


def notes_fields(notes: str) -> Mapping[str, str]:
    """``sitepair-<key>: value`` lines of a VM's Notes (where sitepair keeps what it must know
    of a VM it registered, so it travels with the VM)."""
    out: dict[str, str] = {}
    for line in notes.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().startswith("sitepair-"):
            out[key.strip()[len("sitepair-") :]] = value.strip()
    return out
