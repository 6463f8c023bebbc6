"""The PowerShell form of :class:`agent.hosts.hyperv_api.HyperVApi`: running its scripts.

**Windows only, and never run against a real Hyper-V host** (see :mod:`agent.hosts.hyperv_api`
for the calls and the cmdlets and CIM methods behind each; ``tests/hosts/test_hyperv_api.py``
for what is tested). The scripts are in :mod:`agent.hosts.hyperv_scripts`; what they print is
read by :mod:`agent.hosts.hyperv_json`.

How a command is run: the script is passed as ``-EncodedCommand`` (base64 of UTF-16LE), never
on the command line as text, because the Windows command-line parser strips the double quotes
PowerShell code needs. Every value from outside (a VM name, a path, a NIC name) enters the
script as a single-quoted PowerShell literal (:func:`~agent.hosts.hyperv_scripts.ps_quote`);
identifiers that reach a WQL filter must be GUIDs (:func:`~agent.hosts.hyperv_api.check_guid`).
Objects are projected with enums turned to strings (``ConvertTo-Json`` would print them as
numbers) and printed with ``ConvertTo-Json -Compress`` through ``[Console]::Out`` on UTF-8
stdout, as its last line (:func:`~agent.hosts.hyperv_json.read_document`: warnings before it
are ignored, PowerShell 5.1's array quirks undone). A failure prints
``{"sitepairError": {message, category, errorId}}`` and exits 3; it becomes a
:mod:`sitepair.errors` exception naming the cmdlet, the VM and what to do. A command that does
not answer within its timeout is killed (DeadlineExceeded); the Hyper-V job it started may
still finish.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agent.hosts import hyperv_scripts as scripts
from agent.hosts.hyperv_api import (
    HvChanges,
    HvCheckpoint,
    HvReferencePoint,
    HvVhd,
    HvVm,
    NewVm,
    QuiesceFailed,
    check_guid,
    parse_slot,
)
from agent.hosts.hyperv_json import (
    BOM,
    command_error,
    parse_changes,
    parse_checkpoint,
    parse_reference_point,
    parse_vhd,
    parse_vm,
    read_document,
)
from sitepair.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)


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
        script = scripts.PRELUDE + scripts.WRAP.replace("<<BODY>>", body)
        return [
            self.powershell,
            "-NoProfile",
            "-NonInteractive",
            "-ExecutionPolicy",
            "Bypass",
            "-EncodedCommand",
            scripts.encode_command(script),
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
        out = done.stdout.replace(BOM, "").strip()
        doc = read_document(out)
        if done.returncode == 3 and isinstance(doc, dict) and "sitepairError" in doc:
            raise command_error(cmdlet, where, doc["sitepairError"], hint)
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
        docs = self._call(
            "Get-VM", scripts.LIST_VMS, hint="check that the Hyper-V role is installed"
        )
        return [parse_vm(d, "Get-VM") for d in docs]

    def get_vm(self, vm_id: str) -> HvVm:
        vm_id = check_guid(vm_id, "VM id")
        docs = self._call(
            "Get-VM",
            scripts.render(scripts.GET_VM, vm=vm_id),
            vm=vm_id,
            hint="check the VM with Get-VM",
        )
        if not docs:
            raise NotFound(f"Get-VM: no VM with id {vm_id} on this host")
        return parse_vm(docs[0], "Get-VM")

    def list_switches(self) -> list[str]:
        docs = self._call("Get-VMSwitch", scripts.LIST_SWITCHES, hint="check Get-VMSwitch")
        return [str(d) for d in docs]

    def vhd_info(self, paths: Sequence[str]) -> list[HvVhd]:
        """The disks of ``paths`` that exist (the others are left out)."""
        if not paths:
            return []
        docs = self._call(
            "Get-VHD",
            scripts.render(scripts.VHD_INFO, paths=list(paths)),
            hint="check the disks with Get-VHD",
        )
        return [parse_vhd(d, "Get-VHD") for d in docs]

    def vhd_chain(self, path: str) -> list[HvVhd]:
        """``path`` and its parents, ``path`` first."""
        docs = self._call(
            "Get-VHD",
            scripts.render(scripts.VHD_CHAIN, path=path),
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
        body = scripts.render(
            scripts.CREATE_CHECKPOINT,
            vm=vm_id,
            consistency=scripts.APP_CONSISTENT if app_consistent else scripts.CRASH_CONSISTENT,
            app=app_consistent,
            type=scripts.RECOVERY_SNAPSHOT,
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
            scripts.render(scripts.LIST_CHECKPOINTS, vm=vm_id),
            vm=vm_id,
            hint="check the VM's checkpoints in Hyper-V Manager",
        )
        return [parse_checkpoint(d, "Get-VMSnapshot") for d in docs]

    def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        checkpoint_id = check_guid(checkpoint_id, "checkpoint id")
        self._call(
            "Remove-VMSnapshot",
            scripts.render(scripts.REMOVE_CHECKPOINT, vm=vm_id, checkpoint=checkpoint_id),
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
            scripts.render(scripts.CONVERT, vm=vm_id, checkpoint=checkpoint_id),
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
            scripts.render(scripts.LIST_REFERENCE_POINTS, vm=vm_id),
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
            scripts.render(
                scripts.REMOVE_REFERENCE_POINT, vm=vm_id, reference_point=reference_point_id
            ),
            vm=vm_id,
            hint="an old reference point only costs a little RCT history; retried next release",
        )

    def virtual_disk_changes(self, path: str, limit_id: str, offset: int, length: int) -> HvChanges:
        docs = self._call(
            "GetVirtualDiskChanges",
            scripts.render(
                scripts.DISK_CHANGES, path=path, limit=limit_id, offset=offset, length=length
            ),
            hint=f"check {path}",
        )
        if not docs:
            raise FailedPrecondition(f"GetVirtualDiskChanges of {path} returned nothing")
        return parse_changes(docs[0], path, limit_id)

    # -- power, NICs, VMs ---------------------------------------------------------------------
    def set_power(self, vm_id: str, action: str) -> None:
        vm_id = check_guid(vm_id, "VM id")
        if action not in scripts.POWER:
            raise InvalidArgument(f"unknown power action {action!r}")
        cmdlet = scripts.POWER[action].split(" ", 1)[0]
        self._call(
            cmdlet,
            scripts.render(scripts.POWER[action], vm=vm_id),
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
            scripts.render(scripts.CONNECT_NIC, vm=vm_id, nic=nic, switch=switch),
            vm=vm_id,
            hint="check the virtual switch exists on this host (Get-VMSwitch)",
        )

    def new_differencing_disk(self, path: str, parent: str) -> None:
        self._call(
            "New-VHD",
            scripts.render(scripts.NEW_DIFFERENCING, path=path, parent=parent),
            hint=f"check that the folder of {path} exists and {parent} is readable",
        )

    def new_vm(self, spec: NewVm) -> HvVm:
        slots = []
        for slot, _path in spec.drives:
            parsed = parse_slot(slot)
            if parsed is None:
                raise InvalidArgument(f"{slot!r} names no controller location (e.g. scsi0-1)")
            slots.append(parsed)
        body = scripts.render(
            scripts.NEW_VM,
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
            scripts.render(scripts.REMOVE_VM, vm=vm_id),
            vm=vm_id,
            long=True,
            hint="remove it in Hyper-V Manager (its disk files are never deleted by Remove-VM)",
        )
