"""The ``hyperv`` host backend: Hyper-V's checkpoints and Resilient Change Tracking (RCT).

**Exercised on Windows only, and not yet on a real Hyper-V host.** Every call to Hyper-V goes
through the narrow :class:`agent.hosts.hyperv_api.HyperVApi`; on a Windows host that is
:class:`~agent.hosts.hyperv_powershell.PowerShellHyperVApi`. The logic here is tested on Linux
against ``FakeHyperVApi`` (``tests/hosts/fake_hyperv.py``), a simulation over real VHDX/VHD files;
``docs/hyperv-backend.md`` says what that proves and what it cannot.

The contract of :class:`agent.hosts.base.HostBackend` in Hyper-V's terms:

- **cut** (:meth:`HyperVBackend.take_cut`) = a *recovery checkpoint* named
  ``sitepair-<cut id>`` (application consistent through the guest's VSS when asked; if the guest
  cannot quiesce, a crash-consistent one and ``app_consistent`` false). The VM writes a new
  AVHDX from then on; the checkpoint's drives name the frozen layers, and each disk's chain
  (frozen layer and its parents, from ``Get-VHD``) is what a cycle reads with
  :mod:`sitepair.vdisk`.
- **changed** = ``GetVirtualDiskChanges`` of the frozen layer since the RCT id of the disk in
  the *baseline*: the reference point of the last released cut. Hyper-V's ranges are widened to
  64 KiB blocks (the change-log block of the contract), clipped to the disk and coalesced.
- **release** = the older outstanding checkpoints are removed (Hyper-V merges them), then the
  cut's checkpoint is converted to an RCT *reference point* (Hyper-V merges it too); its
  ``ResilientChangeTrackingIdentifiers`` become the new baseline and sitepair's older reference
  points are destroyed. Reference points sitepair did not make are never touched.
- **untrusted**: no baseline RCT id for a disk (the VM's first cut, a disk added since), or
  Hyper-V refusing an RCT id (a VM moved or imported, a disk edited or merged outside Hyper-V,
  reset tracking): the reason is kept as a *taint* until :meth:`HyperVBackend.reset_tracking`
  names a cut at or after it, exactly as the directory backend does.
- **failover** (:meth:`HyperVBackend.register_vm`, :meth:`HyperVBackend.unregister_vm`) = a new
  VM over a new differencing child of each replica chain; on a failback the fenced old VM is
  removed and its ``Get-VM`` definition kept (JSON) so that an undo makes it again with
  ``New-VM`` over the same files. Like everything here, tested on Linux only, against the fake.

What sitepair keeps per VM lives in ``<vm root>/.sitepair-tracking/<Hyper-V VM id>/cuts.json``
(cuts, baseline, taints, journals of an interrupted cut or release), under the VM's operations
lock (:mod:`agent.hosts.vmlock`). A VM that sitepair registered (a failover of a replica)
carries sitepair's VM id and its disk names in its Notes (``sitepair-vm-id: ...``,
``sitepair-disks: scsi0-0=os;...``), so they travel with the VM; other VMs are known by
Hyper-V's id and their disks by controller location (``scsi0-1``).

The modules: this one finds VMs, reports the inventory, powers VMs and connects NICs;
:mod:`agent.hosts.hyperv_cuts` takes and releases cuts; :mod:`agent.hosts.hyperv_register`
makes and removes the VMs of failovers; :mod:`agent.hosts.hyperv_vm` reads a Hyper-V VM in
sitepair's terms; :mod:`agent.hosts.hyperv_api` is the boundary to Hyper-V.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.config import NetworkConfig
from agent.hosts.base import (
    Cut,
    DiskRecord,
    GuestProgramResult,
    HostBackend,
    HostInventory,
    NetworkRecord,
    RegisteredVm,
    StorageRecord,
    VmRecord,
    VmWriter,
)
from agent.hosts.hyperv_api import HvVhd, HvVm, HyperVApi, check_guid
from agent.hosts.hyperv_cuts import TRACKING_DIR, RctCuts
from agent.hosts.hyperv_register import VmRegistrar
from agent.hosts.hyperv_vm import chain_of, disk_names, nics_of, sitepair_id, state_name
from agent.hosts.vmspec import VM_STATES, DiskSpec, VmSpec
from sitepair import pki
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound

#: (current, wanted) -> the power actions that get there.
_POWER_PLAN: dict[tuple[str, str], tuple[str, ...]] = {
    ("off", "running"): ("start",),
    ("saved", "running"): ("start",),
    ("running", "paused"): ("suspend",),
    ("paused", "running"): ("resume",),
    ("running", "off"): ("stop",),
    # A paused guest cannot shut down, and a saved one is not running: both are turned off.
    ("paused", "off"): ("turn-off",),
    ("saved", "off"): ("turn-off",),
}


class HyperVBackend(HostBackend):
    """Hyper-V through ``api``; see the module docstring.

    ``vm_root`` holds sitepair's tracking state and the folders of the VMs it registers
    (:meth:`vm_dir`); ``storage`` and ``networks`` come from the agent's configuration."""

    kind = "hyperv"

    def __init__(
        self,
        vm_root: Path,
        api: HyperVApi,
        *,
        storage: tuple[tuple[str, Path], ...] = (),
        networks: tuple[NetworkConfig, ...] = (),
        extra_volumes: tuple[Path, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vm_root = Path(vm_root)
        self.api = api
        self.storage = storage
        self.networks = networks
        self._extra_volumes = extra_volumes
        self._cuts = RctCuts(api, self.vm_root / TRACKING_DIR, clock)
        self._registrar = VmRegistrar(
            api, vm_dir=self.vm_dir, cuts=self._cuts, set_vm_state=self.set_vm_state
        )

    # -- finding VMs ------------------------------------------------------------------------
    def vm_dir(self, name: str) -> Path:
        """The folder sitepair gives a VM it registers (configuration and new disk layers)."""
        return self.vm_root / pki.check_identifier(name, "VM name")

    def _resolve(self, ref: str) -> HvVm:
        """A VM by sitepair's id, Hyper-V's id or name (a name must be unique)."""
        with contextlib.suppress(NotFound, InvalidArgument):
            return self.api.get_vm(check_guid(ref, "VM id"))  # the common case: Hyper-V's id
        vms = self.api.list_vms()
        low = ref.lower()
        for vm in vms:
            if low in (vm.id, sitepair_id(vm).lower()):
                return vm
        named = [vm for vm in vms if vm.name == ref]
        if len(named) > 1:
            raise InvalidArgument(
                f"{len(named)} Hyper-V VMs are named {ref!r} on this host",
                hint="refer to the VM by its id: " + ", ".join(v.id for v in named),
            )
        if named:
            return named[0]
        raise NotFound(
            f"no VM {ref!r} on this Hyper-V host",
            hint="list the VMs with Get-VM; a VM is known by its Hyper-V id, its name, or the "
            "sitepair id in its Notes",
        )

    def find_vm(self, ref: str) -> tuple[Path, VmSpec]:
        """A VM by id or name: its configuration folder and its description (disk chains base
        first, absolute paths)."""
        vm = self._resolve(ref)
        names = disk_names(vm)
        disks = tuple(
            DiskSpec(id=names.get(d.slot, d.slot), chain=tuple(str(p) for p in self._chain(d.path)))
            for d in vm.drives
        )
        spec = VmSpec(
            id=sitepair_id(vm),
            name=vm.name,
            generation=vm.generation,
            cpu=vm.cpu_count,
            memory_mb=vm.memory_mb,
            state=state_name(vm.state),
            nics=nics_of(vm),
            disks=disks,
        )
        return Path(vm.path), spec

    def disk_chains(self, vm_ref: str) -> dict[str, list[Path]]:
        """Each disk's chain as absolute paths, base first."""
        _folder, spec = self.find_vm(vm_ref)
        return {d.id: [Path(p) for p in d.chain] for d in spec.disks}

    def _chain(self, path: str) -> list[Path]:
        return chain_of(self.api, path)

    # -- inventory --------------------------------------------------------------------------
    def _storage_class(self, path: Path) -> str:
        for name, folder in self.storage:
            try:
                path.relative_to(folder)
                return name
            except ValueError:
                continue
        return ""

    def _record(self, vm: HvVm, vhds: dict[str, HvVhd] | None = None) -> VmRecord:
        if vhds is None:
            vhds = {v.path.lower(): v for v in self.api.vhd_info([d.path for d in vm.drives])}
        names = disk_names(vm)
        disks = []
        for d in vm.drives:
            info = vhds.get(d.path.lower())
            disks.append(
                DiskRecord(
                    id=names.get(d.slot, d.slot),
                    path=Path(d.path),
                    format=info.format if info else Path(d.path).suffix.lstrip(".").lower(),
                    virtual_size=info.virtual_size if info else 0,
                    file_size=info.file_size if info else 0,
                    storage_class=self._storage_class(Path(d.path)),
                )
            )
        return VmRecord(
            id=sitepair_id(vm),
            name=vm.name,
            generation=vm.generation,
            cpu_count=vm.cpu_count,
            memory_mb=vm.memory_mb,
            state=state_name(vm.state),
            disks=tuple(disks),
            nics=nics_of(vm),
        )

    def inventory(self) -> HostInventory:
        vms = self.api.list_vms()
        paths = [d.path for vm in vms for d in vm.drives]
        vhds = {v.path.lower(): v for v in self.api.vhd_info(paths)} if paths else {}
        subnets = {n.name: n.subnets for n in self.networks}
        networks = tuple(
            NetworkRecord(name, subnets.get(name, ())) for name in self.api.list_switches()
        )
        storage = []
        for name, path in self.storage:
            total = free = 0
            with contextlib.suppress(OSError):
                usage = psutil.disk_usage(str(path))
                total, free = usage.total, usage.free
            storage.append(StorageRecord(name=name, path=path, total_bytes=total, free_bytes=free))
        return HostInventory(
            vms=tuple(self._record(vm, vhds) for vm in vms),
            networks=networks,
            storage=tuple(storage),
        )

    def volumes(self) -> list[Path]:
        return [self.vm_root, *(p for _, p in self.storage), *self._extra_volumes]

    # -- power and NICs ---------------------------------------------------------------------
    def set_vm_state(self, vm_ref: str, state: str) -> VmRecord:
        """Start (``Start-VM``), pause (``Suspend-VM``), resume, shut down (``Stop-VM``: the
        guest shuts down through its integration service) or, for a paused or saved VM, turn
        off."""
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r}; use one of {', '.join(VM_STATES)}")
        vm = self._resolve(vm_ref)
        current = state_name(vm.state)
        if current != state:
            plan = _POWER_PLAN.get((current, state))
            if plan is None:
                raise FailedPrecondition(
                    f"VM {vm.name} is {current} in Hyper-V; it cannot become {state}",
                    hint="start it first"
                    if state == "paused"
                    else "wait until Get-VM shows it Running, Off, Paused or Saved, then retry",
                )
            for action in plan:
                self.api.set_power(vm.id, action)
            vm = self.api.get_vm(vm.id)
        return self._record(vm)

    def connect_nic(self, vm_ref: str, nic: str, network: str) -> VmRecord:
        """Connect a NIC to a virtual switch (the VM network); "" disconnects it."""
        vm = self._resolve(vm_ref)
        names = [n.name for n in vm.nics]
        if nic not in names:
            raise NotFound(f"VM {vm.name} has no NIC {nic!r} (NICs: {', '.join(names) or 'none'})")
        if network:
            switches = self.api.list_switches()
            if network not in switches:
                raise InvalidArgument(
                    f"VM {vm.name}: this host has no virtual switch {network!r} "
                    f"(it offers: {', '.join(switches) or 'none'})",
                    hint="map the VM network to one of these switches, or create it with "
                    "New-VMSwitch",
                )
        self.api.connect_nic(vm.id, nic, network)
        return self._record(self.api.get_vm(vm.id))

    def open_writer(self, vm_ref: str) -> VmWriter:
        """Refused: on Hyper-V the guest writes its disks, and nothing else may."""
        vm = self._resolve(vm_ref)
        raise FailedPrecondition(
            f"VM {vm.name} runs on Hyper-V: its guest writes its disks and sitepair cannot "
            "write into them",
            hint="run the workload inside the guest; simulated workloads need the directory "
            "backend",
        )

    def guest_run(
        self, vm_ref: str, program: str, args: list[str], timeout: float
    ) -> GuestProgramResult:
        """Not yet: the way will be PowerShell Direct (``Invoke-Command -VMName``), which needs
        credentials of an account in the guest, something sitepair does not hold yet."""
        vm = self._resolve(vm_ref)
        raise FailedPrecondition(
            f"VM {vm.name} runs on Hyper-V: running programs in its guest is not implemented yet "
            "(it will use PowerShell Direct, Invoke-Command -VMName, with credentials of an "
            "account in the guest)",
            hint="check the test VM from a script on the host (a recovery plan's script action)",
        )

    # -- registering VMs (failover): agent.hosts.hyperv_register -----------------------------
    def vm_id_of(self, name: str) -> str | None:
        """Sitepair's id of the VM called ``name`` (one ``Get-VM``; the generic version would
        also ask ``Get-VHD`` about every disk of the host)."""
        return next((sitepair_id(vm) for vm in self.api.list_vms() if vm.name == name), None)

    def vm_state(self, vm_ref: str) -> str:
        """The VM's state by sitepair's id, Hyper-V's id or name, from Hyper-V itself."""
        return state_name(self._resolve(vm_ref).state)

    def register_vm(
        self,
        name: str,
        *,
        vm_id: str,
        disks: list[tuple[str, list[Path]]],
        cpu: int,
        memory_mb: int,
        generation: int = 2,
        nics: list[tuple[str, str]] | None = None,
        state: str = "off",
        replace: bool = False,
    ) -> RegisteredVm:
        """Make a Hyper-V VM over existing disk chains (:meth:`VmRegistrar.register`)."""
        return self._registrar.register(
            name,
            vm_id=vm_id,
            disks=disks,
            cpu=cpu,
            memory_mb=memory_mb,
            generation=generation,
            nics=nics,
            state=state,
            replace=replace,
        )

    def unregister_vm(self, registered: RegisteredVm) -> None:
        """Undo :meth:`register_vm` exactly (:meth:`VmRegistrar.unregister`)."""
        self._registrar.unregister(registered)

    def remove_vm(self, vm_ref: str) -> Path:
        """Remove a VM sitepair registered (:meth:`VmRegistrar.remove`)."""
        return self._registrar.remove(self._resolve(vm_ref))

    # -- cuts: agent.hosts.hyperv_cuts ------------------------------------------------------
    def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Cut:
        return self._cuts.take_cut(self._resolve(vm_ref), app_consistent=app_consistent)

    def outstanding_cut(self, vm_ref: str) -> Cut | None:
        return self._cuts.outstanding_cut(self._resolve(vm_ref))

    def release_cut(self, vm_ref: str, cut_id: str) -> None:
        self._cuts.release_cut(self._resolve(vm_ref), cut_id)

    def reset_tracking(self, vm_ref: str, cut_id: str) -> None:
        """Trust tracking again from ``cut_id`` (:meth:`RctCuts.reset_tracking`)."""
        self._cuts.reset_tracking(self._resolve(vm_ref), cut_id)
