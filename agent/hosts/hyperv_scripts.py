"""The PowerShell scripts of :class:`agent.hosts.hyperv_powershell.PowerShellHyperVApi`, and
how values enter them.

Every value from outside (a VM name, a path, a NIC name) enters a script as a single-quoted
PowerShell literal (:func:`ps_quote`), through the ``<<name>>`` placeholders :func:`render`
fills; no placeholder sits inside a double-quoted string, where PowerShell would expand
``$(...)``. :data:`PRELUDE` defines the projections (enums as strings) the scripts print with;
:data:`WRAP` runs a script's body and prints its document or its error as the last line.
A whole script travels as ``-EncodedCommand`` (:func:`encode_command`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence

from sitepair.errors import InvalidArgument

#: SnapshotType of a recovery checkpoint in ``Msvm_VirtualSystemSnapshotService.CreateSnapshot``.
RECOVERY_SNAPSHOT = 32768
#: ``Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel``.
APP_CONSISTENT, CRASH_CONSISTENT = 1, 2

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
PRELUDE = r"""
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

WRAP = r"""
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
LIST_VMS = "Get-VM | ForEach-Object { ConvertTo-SpVm $_ }"
GET_VM = "ConvertTo-SpVm (Get-VM -Id <<vm>>)"
LIST_SWITCHES = "Get-VMSwitch | ForEach-Object { $_.Name }"
VHD_INFO = (
    "Get-VHD -Path <<paths>> -ErrorAction SilentlyContinue | ForEach-Object { ConvertTo-SpVhd $_ }"
)
VHD_CHAIN = r"""
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
CREATE_CHECKPOINT = r"""
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
LIST_CHECKPOINTS = r"""
Get-VMSnapshot -VM (Get-VM -Id <<vm>>) | ForEach-Object { ConvertTo-SpCheckpoint $_ }
"""
REMOVE_CHECKPOINT = r"""
Remove-VMSnapshot -VMSnapshot (Get-VMSnapshot -Id <<checkpoint>>)
Wait-SpMerge <<vm>>
"""
CONVERT = r"""
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
LIST_REFERENCE_POINTS = r"""
Get-SpCim Msvm_VirtualSystemReferencePoint ("VirtualSystemIdentifier='{0}'" -f <<vm>>) |
  ForEach-Object { ConvertTo-SpReferencePoint $_ }
"""
REMOVE_REFERENCE_POINT = r"""
$svc = Get-SpCim Msvm_VirtualSystemReferencePointService
$rp = Get-SpCim Msvm_VirtualSystemReferencePoint ("VirtualSystemIdentifier='{0}'" -f <<vm>>) |
  Where-Object { $_.InstanceID -eq <<reference_point>> } | Select-Object -First 1
if ($rp) {
  $r = Invoke-CimMethod -InputObject $svc -MethodName DestroyReferencePoint -Arguments @{
    AffectedReferencePoint = $rp }
  $null = Wait-SpJob $r 'DestroyReferencePoint'
}
"""
DISK_CHANGES = r"""
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
POWER = {
    "start": "Start-VM -VM (Get-VM -Id <<vm>>)",
    "stop": "Stop-VM -VM (Get-VM -Id <<vm>>) -Force",
    "turn-off": "Stop-VM -VM (Get-VM -Id <<vm>>) -TurnOff -Force",
    "suspend": "Suspend-VM -VM (Get-VM -Id <<vm>>)",
    "resume": "Resume-VM -VM (Get-VM -Id <<vm>>)",
}
CONNECT_NIC = r"""
$nic = Get-SpNic (Get-VM -Id <<vm>>) <<nic>>
if (<<switch>> -eq '') { Disconnect-VMNetworkAdapter -VMNetworkAdapter $nic }
else { Connect-VMNetworkAdapter -VMNetworkAdapter $nic -SwitchName <<switch>> }
"""
NEW_DIFFERENCING = "$null = New-VHD -Path <<path>> -ParentPath <<parent>> -Differencing"
NEW_VM = r"""
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
REMOVE_VM = r"""
$vm = Get-VM -Id <<vm>>
if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
Remove-VM -VM $vm -Force
"""
