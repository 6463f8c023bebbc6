"""PowerShellHyperVApi without PowerShell: how each command is built and how its output is read.

Nothing here runs PowerShell or Hyper-V (this is Linux). The runner below stands in for
``powershell.exe``: it decodes the ``-EncodedCommand`` script the API built, keeps it for the
test to inspect, and answers with JSON written by hand in the shape Windows PowerShell 5.1's
``ConvertTo-Json -Compress`` prints for our projections. Those answers are NOT captured from a
real Hyper-V host; they check our parsing against our reading of the documentation, no more.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from agent.hosts import hyperv_scripts
from agent.hosts.hyperv_api import (
    HvDrive,
    HvNic,
    NewVm,
    QuiesceFailed,
    RctUnavailable,
    check_guid,
    notes_fields,
    parse_slot,
    slot_name,
)
from agent.hosts.hyperv_json import format_mac
from agent.hosts.hyperv_powershell import PowerShellHyperVApi, RunResult, run_process
from agent.hosts.hyperv_scripts import ps_quote, render
from sitepair.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

VM_ID = "4764334d-e001-4176-82ee-5594ec9b530e"
CP_ID = "2b6c8a11-90f3-4c3e-a0f5-3f7d1c9e2a10"

# Get-VM projected by ConvertTo-SpVm: a running VM with a VHDX, a pass-through disk (no Path)
# and a NIC; Hyper-V ids upper-case in places, as .ToString() of a Guid is lower-case but WMI is
# not.
VMS_JSON = json.dumps(
    [
        {
            "Id": VM_ID,
            "Name": "web01",
            "Generation": 2,
            "ProcessorCount": 4,
            "MemoryStartup": 4294967296,
            "State": "Running",
            "Path": "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V",
            "Notes": "sitepair-vm-id: vm-1\r\nsitepair-disks: scsi0-0=os",
            "Drives": [
                {
                    "ControllerType": "SCSI",
                    "ControllerNumber": 0,
                    "ControllerLocation": 0,
                    "Path": "D:\\VMs\\web01\\os.vhdx",
                },
                {
                    "ControllerType": "SCSI",
                    "ControllerNumber": 0,
                    "ControllerLocation": 1,
                    "Path": None,
                },
            ],
            "Nics": [
                {"Name": "Network Adapter", "SwitchName": "prod", "MacAddress": "00155D010203"}
            ],
        },
        {
            "Id": "0b0b0b0b-0000-4000-8000-000000000001",
            "Name": "old",
            "Generation": 1,
            "ProcessorCount": 1,
            "MemoryStartup": 536870912,
            "State": "Saved",
            "Path": "C:\\VMs\\old",
            "Notes": "",
            "Drives": {
                "ControllerType": "IDE",
                "ControllerNumber": 0,
                "ControllerLocation": 0,
                "Path": "C:\\VMs\\old\\old.vhd",
            },
            "Nics": [{"Name": "nic", "SwitchName": None, "MacAddress": "000000000000"}],
        },
    ],
    separators=(",", ":"),
)


class Recorder:
    """Stands in for powershell.exe: records the decoded script, answers from a queue."""

    def __init__(self, *answers: RunResult | BaseException) -> None:
        self.answers = list(answers)
        self.scripts: list[str] = []
        self.argvs: list[list[str]] = []
        self.timeouts: list[float] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> RunResult:
        self.argvs.append(list(argv))
        self.timeouts.append(timeout)
        assert argv[-2] == "-EncodedCommand"
        self.scripts.append(base64.b64decode(argv[-1]).decode("utf-16-le"))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def script(self) -> str:
        return self.scripts[-1]


def ok(doc: Any) -> RunResult:
    return RunResult(0, json.dumps(doc, separators=(",", ":")) + "\r\n", "")


def failed(message: str, category: str, error_id: str = "x") -> RunResult:
    doc = {"sitepairError": {"message": message, "category": category, "errorId": error_id}}
    return RunResult(3, json.dumps(doc), "")


def api_with(*answers: RunResult | BaseException) -> tuple[PowerShellHyperVApi, Recorder]:
    rec = Recorder(*answers)
    return PowerShellHyperVApi(runner=rec, timeout=30, long_timeout=900), rec


# -- quoting and rendering ----------------------------------------------------------------------
def test_ps_quote_leaves_nothing_to_interpret() -> None:
    assert ps_quote("plain") == "'plain'"
    assert ps_quote("it's") == "'it''s'"
    # PowerShell treats the typographic single quotes as quotes too: they are doubled as well.
    assert ps_quote("a\u2019b\u2018c") == "'a\u2019\u2019b\u2018\u2018c'"
    # Inside single quotes $, `, ", ; and $(...) are plain text.
    assert ps_quote('$(Remove-VM *); "`n"') == "'$(Remove-VM *); \"`n\"'"
    with pytest.raises(InvalidArgument, match="NUL"):
        ps_quote("a\x00b")


def test_render_fills_every_placeholder_with_a_literal() -> None:
    out = render(
        "f <<name>> <<n>> <<flag>> <<list>> <<nums>> <<none>>",
        name="x'y",
        n=7,
        flag=False,
        list=["a", "b'c"],
        nums=[0, 1],
        none=[],
    )
    assert out == "f 'x''y' 7 $false @('a', 'b''c') @(0, 1) @()"
    # A value is inserted once and never scanned again for placeholders.
    assert render("<<a>>", a="<<b>>") == "'<<b>>'"
    with pytest.raises(KeyError, match="no value for <<b>>"):
        render("<<a>> <<b>>", a="1")
    with pytest.raises(KeyError, match="unused values: c"):
        render("<<a>>", a="1", c="2")


def test_no_template_puts_a_value_inside_a_double_quoted_string() -> None:
    """PowerShell expands $(...) inside double quotes: a value placed there could run code."""
    templates = {
        name: value
        for name, value in vars(hyperv_scripts).items()
        if name.isupper() and isinstance(value, str) and "<<" in value
    }
    templates.update({f"POWER[{k}]": v for k, v in hyperv_scripts.POWER.items()})
    assert len(templates) > 15
    for name, text in templates.items():
        for line in text.splitlines():
            for quoted in re.findall(r'"[^"]*"', line):
                assert "<<" not in quoted, f"{name}: {line.strip()}"


def test_the_command_line_carries_the_script_encoded(tmp_path: Any) -> None:
    api, rec = api_with(ok([]))
    assert api.list_vms() == []
    argv = rec.argvs[0]
    assert argv[:6] == [
        "powershell.exe",
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-EncodedCommand",
    ]
    script = rec.script
    assert "$ErrorActionPreference = 'Stop'" in script
    assert "Get-VM | ForEach-Object { ConvertTo-SpVm $_ }" in script
    assert "ConvertTo-Json -InputObject $result -Depth 8 -Compress" in script
    assert rec.timeouts == [30]


# -- parsing ------------------------------------------------------------------------------------
def test_list_vms_parses_get_vm_output() -> None:
    api, _rec = api_with(RunResult(0, "\ufeff" + VMS_JSON, ""))
    web, old = api.list_vms()
    assert (web.id, web.name, web.generation, web.cpu_count, web.memory_mb, web.state) == (
        VM_ID,
        "web01",
        2,
        4,
        4096,
        "Running",
    )
    # The pass-through disk has no file: it is not a disk sitepair can replicate.
    assert web.drives == (HvDrive("scsi0-0", "D:\\VMs\\web01\\os.vhdx"),)
    assert web.nics == (HvNic("Network Adapter", "prod", "00:15:5d:01:02:03"),)
    assert notes_fields(web.notes) == {"vm-id": "vm-1", "disks": "scsi0-0=os"}
    # A lone object where an array was expected (PowerShell unrolls one-element arrays).
    assert old.drives == (HvDrive("ide0-0", "C:\\VMs\\old\\old.vhd"),)
    assert old.nics == (HvNic("nic", "", ""),) and old.state == "Saved"


def test_ids_are_checked_before_anything_runs() -> None:
    api, rec = api_with()
    with pytest.raises(InvalidArgument, match='VM id "x\'; Remove-VM" is not a GUID'):
        api.get_vm("x'; Remove-VM")
    with pytest.raises(InvalidArgument, match="checkpoint id 'nope' is not a GUID"):
        api.remove_checkpoint(VM_ID, "nope")
    with pytest.raises(InvalidArgument, match="unknown power action 'reboot'"):
        api.set_power(VM_ID, "reboot")
    assert api.vhd_info([]) == []
    assert rec.scripts == []
    assert check_guid(VM_ID.upper(), "VM id") == VM_ID


def test_errors_name_the_cmdlet_the_vm_and_what_to_do() -> None:
    api, _ = api_with(
        failed("Hyper-V was unable to find a virtual machine with id ...", "ObjectNotFound"),
        failed("You do not have the required permission", "PermissionDenied"),
        failed(
            "The operation cannot be performed while the object is in its current state",
            "InvalidOperation",
        ),
        failed("The virtual machine management service is busy", "ResourceBusy"),
        RunResult(1, "", "Get-VM : The term 'Get-VM' is not recognized as the name of a cmdlet"),
        subprocess.TimeoutExpired(["powershell.exe"], 30),
        FileNotFoundError("powershell.exe"),
    )
    with pytest.raises(NotFound, match=f"Get-VM for VM {VM_ID} failed: Hyper-V was unable"):
        api.get_vm(VM_ID)
    with pytest.raises(PermissionDenied) as denied:
        api.list_checkpoints(VM_ID)
    assert "Hyper-V Administrators" in str(denied.value)
    with pytest.raises(FailedPrecondition) as state:
        api.set_power(VM_ID, "suspend")
    assert f"Suspend-VM for VM {VM_ID} failed: The operation cannot" in str(state.value)
    assert "check the VM's state in Hyper-V Manager" in str(state.value)
    with pytest.raises(Unavailable, match="service is busy"):
        api.list_vms()
    with pytest.raises(FailedPrecondition, match="exited with code 1: Get-VM : The term 'Get-VM'"):
        api.list_vms()
    with pytest.raises(DeadlineExceeded, match=f"Get-VM for VM {VM_ID} did not finish within 30 s"):
        api.get_vm(VM_ID)
    with pytest.raises(FailedPrecondition) as missing:
        api.list_switches()
    assert "powershell.exe was not found" in str(missing.value)
    assert "Install-WindowsFeature Hyper-V-PowerShell" in str(missing.value)


def test_recovery_checkpoint_command_and_result() -> None:
    checkpoint = {
        "Id": CP_ID,
        "Name": "sitepair-c1",
        "VMId": VM_ID,
        "SnapshotType": "Recovery",
        "Drives": [
            {
                "ControllerType": "SCSI",
                "ControllerNumber": 0,
                "ControllerLocation": 0,
                "Path": "D:\\VMs\\web01\\os.vhdx",
            }
        ],
    }
    api, rec = api_with(ok([checkpoint]), ok([checkpoint]))
    cp = api.create_recovery_checkpoint(VM_ID, "sitepair-c1", app_consistent=True)
    assert (cp.id, cp.name, cp.type) == (CP_ID, "sitepair-c1", "Recovery")
    assert cp.drives == (HvDrive("scsi0-0", "D:\\VMs\\web01\\os.vhdx"),)
    script = rec.script
    assert f"(\"Name='{{0}}'\" -f '{VM_ID}')" in script
    assert "SnapshotType = [uint16]32768" in script
    assert (
        "$set.ConsistencyLevel = 1" in script
        and "if ($true) { $set.GuestBackupType = 2 }" in script
    )
    assert "Rename-VMSnapshot -VMSnapshot (Get-VMSnapshot -Id $id) -NewName 'sitepair-c1'" in script
    assert rec.timeouts == [900]  # checkpoints wait for the guest: the long timeout
    api.create_recovery_checkpoint(VM_ID, "sitepair-c2", app_consistent=False)
    assert "$set.ConsistencyLevel = 2" in rec.script and "if ($false)" in rec.script
    # An application-consistent checkpoint that fails is reported as a quiesce failure, so the
    # backend can fall back to a crash-consistent one.
    api, _ = api_with(
        failed("CreateSnapshot failed: VSS (Hyper-V error 32768)", "OperationStopped")
    )
    with pytest.raises(QuiesceFailed, match="CreateSnapshot"):
        api.create_recovery_checkpoint(VM_ID, "sitepair-c3", app_consistent=True)


def test_reference_points_are_joined_to_drives_by_path() -> None:
    rp = {
        "InstanceID": "Microsoft:4764334D-E001-4176-82EE-5594EC9B530E\\RP1",
        "VirtualSystemIdentifier": VM_ID.upper(),
        "ResilientChangeTrackingIdentifiers": ["rctX:a:1", "rctX:b:7"],
        "DiskPaths": ["d:\\vms\\WEB01\\OS.VHDX", "E:\\elsewhere\\gone.vhdx"],
    }
    vms = json.loads(VMS_JSON)
    api, rec = api_with(ok([rp]), ok([vms[0]]))
    point = api.convert_to_reference_point(VM_ID, CP_ID)
    assert "ConvertToReferencePoint" in rec.scripts[0] and f"-f '{CP_ID}'" in rec.scripts[0]
    # Windows paths compare case-insensitively; a disk that matches no drive is left out.
    assert point.rct() == {"scsi0-0": "rctX:a:1"}
    assert point.id == rp["InstanceID"] and point.vm_id == VM_ID
    api, rec = api_with(ok([]))
    assert api.list_reference_points(VM_ID) == []
    assert len(rec.scripts) == 1  # no VM lookup when there is nothing to join


def test_virtual_disk_changes() -> None:
    path = "D:\\VMs\\web01\\os_1.avhdx"
    answer = {
        "ReturnValue": 0,
        "JobState": 0,
        "JobError": "",
        "ProcessedByteLength": 1073741824,
        "ChangedByteOffsets": [0, 1048576],
        "ChangedByteLengths": [4096, 262144],
    }
    single = dict(answer, ChangedByteOffsets=4096, ChangedByteLengths=512)
    api, rec = api_with(
        ok([answer]),
        ok([single]),
        ok([dict(answer, ReturnValue=32773)]),
        ok([dict(answer, ReturnValue=32774)]),
        ok([dict(answer, ReturnValue=32769)]),
        ok(
            [
                dict(
                    answer,
                    ReturnValue=4096,
                    JobState=10,
                    JobError="The RCT id is invalid (Hyper-V error 32773)",
                )
            ]
        ),
        ok([dict(answer, ChangedByteLengths=[1])]),
    )
    got = api.virtual_disk_changes(path, "rctX:abc:3", 0, 8 << 30)
    assert got.processed == 1 << 30 and got.ranges == ((0, 4096), (1048576, 262144))
    assert "LimitId = 'rctX:abc:3'" in rec.script and f"Path = '{path}'" in rec.script
    assert "ByteOffset = [uint64]0; ByteLength = [uint64]8589934592" in rec.script
    assert api.virtual_disk_changes(path, "r", 0, 1).ranges == ((4096, 512),)
    with pytest.raises(
        RctUnavailable, match=r"since RCT id r \(GetVirtualDiskChanges returned 32773\)"
    ):
        api.virtual_disk_changes(path, "r", 0, 1)
    with pytest.raises(Unavailable, match="system is in use"):
        api.virtual_disk_changes(path, "r", 0, 1)
    with pytest.raises(PermissionDenied, match="access denied"):
        api.virtual_disk_changes(path, "r", 0, 1)
    with pytest.raises(RctUnavailable, match="The RCT id is invalid"):
        api.virtual_disk_changes(path, "r", 0, 1)
    with pytest.raises(FailedPrecondition, match="2 offsets but 1 lengths"):
        api.virtual_disk_changes(path, "r", 0, 1)


def test_new_vm_command() -> None:
    vm_doc = json.loads(VMS_JSON)[0]
    api, rec = api_with(ok([vm_doc]))
    made = api.new_vm(
        NewVm(
            name="web01 (replica)",
            folder="D:\\Replicas\\web01",
            generation=2,
            cpu_count=4,
            memory_mb=4096,
            notes="sitepair-vm-id: vm-1",
            drives=(("scsi0-0", "D:\\r\\os-1.vhdx"), ("scsi1-3", "D:\\r\\data-1.vhdx")),
            nics=(("eth0", "dmz"), ("it's", "")),
        )
    )
    assert made.id == VM_ID
    script = rec.script
    assert "New-VM -Name 'web01 (replica)' -Generation 2 -MemoryStartupBytes 4294967296" in script
    assert "-Path 'D:\\Replicas\\web01' -NoVHD" in script
    assert "$types = @('SCSI', 'SCSI'); $numbers = @(0, 1); $locations = @(0, 3)" in script
    assert "$paths = @('D:\\r\\os-1.vhdx', 'D:\\r\\data-1.vhdx')" in script
    assert "$nicNames = @('eth0', 'it''s'); $nicSwitches = @('dmz', '')" in script
    assert "-Notes 'sitepair-vm-id: vm-1'" in script
    with pytest.raises(InvalidArgument, match="'os' names no controller location"):
        api.new_vm(NewVm("x", "D:\\x", 2, 1, 512, drives=(("os", "D:\\x.vhdx"),)))


def test_nic_and_power_commands() -> None:
    api, rec = api_with(ok([]), ok([]), ok([]))
    api.connect_nic(VM_ID, "eth0", "dmz")
    assert "Get-SpNic (Get-VM -Id '" + VM_ID + "') 'eth0'" in rec.script
    assert "-SwitchName 'dmz'" in rec.script
    api.set_power(VM_ID, "stop")
    assert f"Stop-VM -VM (Get-VM -Id '{VM_ID}') -Force" in rec.script
    api.set_power(VM_ID, "turn-off")
    assert "-TurnOff -Force" in rec.script
    assert rec.timeouts == [30, 900, 30]  # a guest shutdown may take a while


def test_small_helpers() -> None:
    assert slot_name("SCSI", 0, 1) == "scsi0-1" and parse_slot("scsi0-1") == ("SCSI", 0, 1)
    assert parse_slot("ide1-0") == ("IDE", 1, 0)
    assert parse_slot("os") is None and parse_slot("scsi0") is None
    assert format_mac("00-15-5D-0A-0B-0C") == "00:15:5d:0a:0b:0c"
    assert format_mac("") == "" and format_mac("000000000000") == ""
    assert notes_fields("free text\nsitepair-vm-id:  x \nother: y") == {"vm-id": "x"}


def test_run_process_runs_a_real_process() -> None:
    done = run_process([sys.executable, "-c", "print('h\\u00e9'); import sys; sys.exit(3)"], 30)
    assert (done.returncode, done.stdout.strip()) == (3, "hé")
    with pytest.raises(subprocess.TimeoutExpired):
        run_process([sys.executable, "-c", "import time; time.sleep(5)"], 0.2)


# -- output framing -----------------------------------------------------------------------------
def test_the_document_is_the_last_line_of_stdout() -> None:
    vm_doc = json.loads(VMS_JSON)[1]
    api, rec = api_with(
        # A cmdlet's warning printed before the document, CRLF line ends, a byte order mark.
        RunResult(0, "\ufeffWARNING: the VM is in a saved state\r\n" + json.dumps([vm_doc]), ""),
        # Windows PowerShell 5.1's {"value": [...], "Count": n} form of an array, at the top
        # and inside a property.
        ok({"value": [dict(vm_doc, Drives={"value": [vm_doc["Drives"]], "Count": 1})], "Count": 1}),
        RunResult(0, "[]\r\nnot json at all\r\n", ""),
        RunResult(0, "   \r\n", ""),
    )
    (vm,) = api.list_vms()
    assert vm.name == "old" and vm.drives == (HvDrive("ide0-0", "C:\\VMs\\old\\old.vhd"),)
    (vm,) = api.list_vms()
    assert vm.drives == (HvDrive("ide0-0", "C:\\VMs\\old\\old.vhd"),)
    with pytest.raises(FailedPrecondition) as err:
        api.list_vms()
    assert "Get-VM: PowerShell exited with code 0: " in str(err.value)
    assert "not json at all" in str(err.value)
    assert "check that the Hyper-V role is installed" in str(err.value)
    with pytest.raises(FailedPrecondition, match="Get-VM: PowerShell exited with code 0"):
        api.list_vms()
    # The script prints its document itself, unformatted, and drops the type data that makes
    # PowerShell 5.1 print arrays as objects.
    assert "[Console]::Out.WriteLine($json)" in rec.scripts[0]
    assert "Remove-TypeData System.Array" in rec.scripts[0]


EVIL = "x'; Stop-Computer -Force; '\u2019$(Remove-VM *)"


def test_values_from_outside_reach_powershell_only_as_literals() -> None:
    """Every string the backend passes (names, paths, NIC and switch names, RCT and reference
    point ids) is one single-quoted literal in the script, whatever it contains."""
    vm_doc = json.loads(VMS_JSON)[0]
    changes = {
        "ReturnValue": 0,
        "JobState": 0,
        "JobError": "",
        "ProcessedByteLength": 1,
        "ChangedByteOffsets": [],
        "ChangedByteLengths": [],
    }
    checkpoint = {"Id": CP_ID, "Name": EVIL, "VMId": VM_ID, "SnapshotType": "Recovery"}
    api, rec = api_with(
        ok([checkpoint]),
        ok([]),
        ok([]),
        ok([changes]),
        ok([]),
        ok([]),
        ok([vm_doc]),
        ok([]),
    )
    api.create_recovery_checkpoint(VM_ID, EVIL, app_consistent=False)
    api.connect_nic(VM_ID, EVIL, EVIL)
    api.new_differencing_disk(EVIL, EVIL)
    api.virtual_disk_changes(EVIL, EVIL, 0, 1)
    api.remove_reference_point(VM_ID, EVIL)
    api.vhd_info([EVIL, "D:\\ok.vhdx"])
    api.new_vm(
        NewVm(EVIL, EVIL, 2, 1, 512, notes=EVIL, drives=(("scsi0-0", EVIL),), nics=((EVIL, EVIL),))
    )
    literal = ps_quote(EVIL)
    assert literal == "'x''; Stop-Computer -Force; ''\u2019\u2019$(Remove-VM *)'"
    for script in rec.scripts:
        assert literal in script
        # Unquoted, the value would end the literal and run: it never appears that way.
        assert "x'; Stop-Computer" not in script
    with pytest.raises(NotFound, match="no virtual disk at"):
        api.vhd_chain(EVIL)
    assert literal in rec.script
