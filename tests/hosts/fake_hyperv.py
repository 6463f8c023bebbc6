"""``FakeHyperVApi``: a stand-in for Hyper-V in tests, because Hyper-V cannot run on Linux.

TEST ONLY. It implements :class:`agent.hosts.hyperv_api.HyperVApi` by simulating what Hyper-V
does, over real VHDX/VHD files made and read with :mod:`sitepair.vdisk`, so that the backend's
logic (``agent/hosts/hyperv.py``) runs against real disks. It is a model of Hyper-V written
from its documentation, not Hyper-V: passing against it says the backend is consistent with
that model, nothing about the real thing (see ``docs/hyperv-backend.md``).

What it simulates:

- **VMs**: id, name, generation, CPU, memory, state (Running, Off, Paused, Saved), Notes,
  drives (a slot such as ``scsi0-1`` -> a disk chain, base first, active layer last) and NICs
  connected to virtual switches. Duplicate names are allowed, as in Hyper-V.
- **The guest**: :meth:`FakeHyperVApi.guest_write` writes into a drive's active layer, only
  while the VM runs, and every write enters the disk's RCT history (tick, offset, length).
- **Checkpoints**: each drive's active layer is frozen and a new differencing
  ``<base name>_<GUID>.avhdx`` (``.avhd`` for VHD) next to it becomes the active layer.
  Removing a checkpoint merges the layer above its frozen layer into it
  (:func:`sitepair.vdisk.ops.merge`, relinking the next layer), as Hyper-V merges AVHDX files.
- **RCT**: a reference point made from a recovery checkpoint holds, per disk, the RCT id of the
  instant the checkpoint was taken (``rctX:<history>:<tick>``); ``virtual_disk_changes`` answers
  from the history: what was written after that tick and up to the instant the queried layer
  was frozen (or now, for an active layer), widened to :attr:`FakeHyperVApi.granule`, at most
  :attr:`FakeHyperVApi.process_limit` bytes of the disk per call.
- **Losing the history**: a disk whose layer was changed behind Hyper-V's back
  (:meth:`edit_offline`, noticed through the layer's identity the next time the disk is used),
  or a VM moved to new storage (:meth:`move_vm`), gets a new history: every earlier RCT id is
  unknown and ``virtual_disk_changes`` fails with Hyper-V's "invalid parameter" (32773).
- **Making and removing VMs**: ``new_vm`` runs the steps of the PowerShell script in order and
  a failing step leaves the half-made VM, as the script would; a VM made again after
  ``remove_vm`` (over the same files, with the same Notes) is a new VM to Hyper-V: new id, new
  MACs, no checkpoints or reference points (``Remove-VM`` removed those; the files stay).
- **App consistency**: a running VM whose guest cannot do VSS (``vss=False``) fails an
  application-consistent checkpoint (QuiesceFailed).

Not simulated: a running guest (nothing executes), the timing of live merges, file ACLs, VSS
inside a guest, failover clusters, Hyper-V's own RCT granularity and history limits.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from agent.hosts.changelog import layer_identity
from agent.hosts.hyperv_api import (
    HvChanges,
    HvCheckpoint,
    HvDrive,
    HvNic,
    HvReferencePoint,
    HvVhd,
    HvVm,
    NewVm,
    QuiesceFailed,
    RctUnavailable,
    parse_slot,
)
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.vdisk import ops as vdisk_ops

MiB = 1 << 20


@dataclasses.dataclass
class _History:
    """RCT of one virtual disk: a history id, a write clock and every write."""

    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    tick: int = 0
    writes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Disk:
    chain: list[Path]
    rct: _History = dataclasses.field(default_factory=_History)
    #: str(layer) -> tick at which it stopped being the active layer.
    frozen_at: dict[str, int] = dataclasses.field(default_factory=dict)
    #: str(layer) -> identity as Hyper-V last left it.
    identities: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Nic:
    name: str
    switch: str
    mac: str


@dataclasses.dataclass
class _Vm:
    id: str
    name: str
    generation: int
    cpu: int
    memory_mb: int
    path: Path
    state: str = "Off"
    notes: str = ""
    drives: dict[str, _Disk] = dataclasses.field(default_factory=dict)
    nics: list[_Nic] = dataclasses.field(default_factory=list)
    vss: bool = True


@dataclasses.dataclass
class _Checkpoint:
    id: str
    name: str
    vm_id: str
    type: str
    #: slot -> frozen layer.
    drives: dict[str, Path]
    #: slot -> (history id, tick) when the checkpoint was taken.
    marks: dict[str, tuple[str, int]]


class FakeHyperVApi:
    """A simulated Hyper-V host whose disks live under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        switches: Sequence[str] = ("prod", "dmz", "isolated"),
        granule: int = 4096,
        process_limit: int = 3 * MiB,
    ) -> None:
        self.root = Path(root)
        self.switches = list(switches)
        self.granule = granule
        self.process_limit = process_limit
        self.vms: dict[str, _Vm] = {}
        self.checkpoints: dict[str, _Checkpoint] = {}
        self.reference_points: dict[str, HvReferencePoint] = {}
        #: Every call made through the API, by name (tests count them).
        self.calls: list[str] = []
        self._lock = threading.RLock()

    # -- test-side helpers (what an operator or the guest does) ------------------------------
    def add_vm(
        self,
        name: str,
        disks: Sequence[tuple[str, str, int]],
        *,
        nics: Sequence[tuple[str, str]] = (),
        generation: int = 2,
        cpu: int = 2,
        memory_mb: int = 2048,
        block_size: int = 1 * MiB,
        vss: bool = True,
    ) -> HvVm:
        """``New-VM`` with new dynamic disks: ``disks`` is [(slot, "vhdx" | "vhd", size)]."""
        with self._lock:
            vm_id = str(uuid.uuid4())
            folder = self.root / "Virtual Hard Disks" / f"{name}-{vm_id[:8]}"
            folder.mkdir(parents=True, exist_ok=True)
            vm = _Vm(
                id=vm_id,
                name=name,
                generation=generation,
                cpu=cpu,
                memory_mb=memory_mb,
                path=self.root / "Virtual Machines" / name,
                vss=vss,
            )
            for slot, fmt, size in disks:
                path = folder / f"{name}-{slot}.{fmt}"
                vdisk.create_disk(
                    path,
                    format=fmt,
                    subformat="dynamic",
                    size=size,
                    block_size=block_size if fmt == "vhdx" else None,
                ).close()
                vm.drives[slot] = self._new_disk([path])
            vm.nics = [_Nic(n, s, _mac()) for n, s in nics]
            self.vms[vm.id] = vm
            return self._hv_vm(vm)

    def guest_write(self, vm_id: str, slot: str, offset: int, data: bytes) -> None:
        """The guest writes its disk: into the active layer, seen by RCT."""
        with self._lock:
            vm = self._vm(vm_id)
            if vm.state != "Running":
                raise FailedPrecondition(f"the guest of VM {vm.name} is not running ({vm.state})")
            disk = self._drive(vm, slot)
            self._notice(disk)
            with vdisk.open_disk(disk.chain[-1]) as d:
                d.write(offset, data)
            disk.rct.tick += 1
            disk.rct.writes.append((disk.rct.tick, offset, len(data)))
            self._remember(disk)

    def guest_read(self, vm_id: str, slot: str, offset: int, length: int) -> bytes:
        with self._lock:
            disk = self._drive(self._vm(vm_id), slot)
            with vdisk.open_disk(disk.chain[-1], read_only=True) as d:
                return d.read(offset, length)

    def edit_offline(self, path: Path, offset: int, data: bytes) -> None:
        """Something other than Hyper-V writes a layer (the VM must be off, as Hyper-V holds
        the files of a running VM open): RCT does not see it."""
        with self._lock:
            for vm in self.vms.values():
                for disk in vm.drives.values():
                    if Path(path) in disk.chain and vm.state != "Off":
                        raise FailedPrecondition(f"{path} is in use by VM {vm.name}")
            with vdisk.open_disk(path) as d:
                d.write(offset, data)

    def move_vm(self, vm_id: str, folder: Path) -> None:
        """``Move-VMStorage`` (or an export and import): every layer moves to ``folder`` and the
        disks' RCT history starts over, so earlier RCT ids are unknown."""
        with self._lock:
            vm = self._vm(vm_id)
            folder.mkdir(parents=True, exist_ok=True)
            moved: dict[Path, Path] = {}
            for disk in vm.drives.values():
                new_chain = [folder / p.name for p in disk.chain]
                for old, new in zip(disk.chain, new_chain, strict=True):
                    os.replace(old, new)
                    moved[old] = new
                for child, parent in zip(new_chain[1:], new_chain, strict=False):
                    vdisk.set_parent(child, parent)
                disk.frozen_at = {
                    str(moved.get(Path(k), Path(k))): t for k, t in disk.frozen_at.items()
                }
                disk.chain = new_chain
                disk.rct = _History()
                disk.identities = {}
                self._remember(disk)
            for cp in self.checkpoints.values():
                if cp.vm_id == vm.id:
                    cp.drives = {s: moved.get(p, p) for s, p in cp.drives.items()}
            vm.path = folder

    def save_vm(self, vm_id: str) -> None:
        """``Save-VM``: a running VM's memory goes to disk; the VM is Saved."""
        with self._lock:
            vm = self._vm(vm_id)
            if vm.state != "Running":
                raise FailedPrecondition(f"VM {vm.name} is {vm.state}; only a running VM saves")
            vm.state = "Saved"

    # -- HyperVApi: inventory -----------------------------------------------------------------
    def list_vms(self) -> list[HvVm]:
        with self._lock:
            self.calls.append("list_vms")
            return [self._hv_vm(vm) for vm in self.vms.values()]

    def get_vm(self, vm_id: str) -> HvVm:
        with self._lock:
            self.calls.append("get_vm")
            return self._hv_vm(self._vm(vm_id))

    def list_switches(self) -> list[str]:
        self.calls.append("list_switches")
        return list(self.switches)

    def vhd_info(self, paths: Sequence[str]) -> list[HvVhd]:
        with self._lock:
            self.calls.append("vhd_info")
            return [self._vhd(Path(p)) for p in paths if Path(p).is_file()]

    def vhd_chain(self, path: str) -> list[HvVhd]:
        with self._lock:
            self.calls.append("vhd_chain")
            out = [self._vhd(Path(path))]
            while out[-1].parent_path:
                out.append(self._vhd(Path(out[-1].parent_path)))
            return out

    # -- HyperVApi: checkpoints and RCT -------------------------------------------------------
    def create_recovery_checkpoint(
        self, vm_id: str, name: str, *, app_consistent: bool
    ) -> HvCheckpoint:
        with self._lock:
            self.calls.append("create_recovery_checkpoint")
            vm = self._vm(vm_id)
            if app_consistent and vm.state == "Running" and not vm.vss:
                raise QuiesceFailed(
                    f"CreateSnapshot (recovery checkpoint) for VM {vm.id} failed: CreateSnapshot "
                    "failed: the guest could not create a VSS snapshot (Hyper-V error 32768)"
                )
            drives: dict[str, Path] = {}
            marks: dict[str, tuple[str, int]] = {}
            cp_id = str(uuid.uuid4())
            for slot, disk in vm.drives.items():
                self._notice(disk)
                active = disk.chain[-1]
                fmt = vdisk.detect_format(active)
                suffix = ".avhdx" if fmt is vdisk.DiskFormat.VHDX else ".avhd"
                child = active.parent / f"{disk.chain[0].stem}_{str(uuid.uuid4()).upper()}{suffix}"
                vdisk.create_disk(
                    child,
                    format=fmt or "vhdx",
                    subformat="differencing",
                    parent=active,
                    block_size=2 * MiB if fmt is vdisk.DiskFormat.VHDX else None,
                ).close()
                disk.frozen_at[str(active)] = disk.rct.tick
                disk.chain.append(child)
                drives[slot] = active
                marks[slot] = (disk.rct.id, disk.rct.tick)
                self._remember(disk)
            cp = _Checkpoint(cp_id, name, vm.id, "Recovery", drives, marks)
            self.checkpoints[cp_id] = cp
            return self._hv_checkpoint(cp)

    def list_checkpoints(self, vm_id: str) -> list[HvCheckpoint]:
        with self._lock:
            self.calls.append("list_checkpoints")
            self._vm(vm_id)
            return [self._hv_checkpoint(c) for c in self.checkpoints.values() if c.vm_id == vm_id]

    def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        with self._lock:
            self.calls.append("remove_checkpoint")
            vm = self._vm(vm_id)
            cp = self.checkpoints.pop(checkpoint_id, None)
            if cp is None or cp.vm_id != vm.id:
                raise NotFound(
                    f"Remove-VMSnapshot for VM {vm_id} failed: no checkpoint {checkpoint_id}"
                )
            for slot, frozen in cp.drives.items():
                disk = vm.drives[slot]
                self._notice(disk)
                i = disk.chain.index(frozen)
                above = disk.chain[i + 1]
                grand = disk.chain[i + 2] if i + 2 < len(disk.chain) else None
                vdisk_ops.merge(above, relink=[grand] if grand else [])
                disk.chain.remove(above)
                mark = disk.frozen_at.pop(str(above), None)
                if mark is None:
                    disk.frozen_at.pop(str(frozen), None)  # the frozen layer is active again
                else:
                    disk.frozen_at[str(frozen)] = mark
                for other in self.checkpoints.values():
                    if other.vm_id == vm.id and other.drives.get(slot) == above:
                        other.drives[slot] = frozen
                self._remember(disk)

    def convert_to_reference_point(self, vm_id: str, checkpoint_id: str) -> HvReferencePoint:
        with self._lock:
            self.calls.append("convert_to_reference_point")
            cp = self.checkpoints.get(checkpoint_id)
            if cp is None or cp.vm_id != vm_id:
                raise NotFound(
                    f"ConvertToReferencePoint for VM {vm_id} failed: no checkpoint with id {checkpoint_id}"
                )
            if cp.type != "Recovery":
                raise FailedPrecondition("only recovery checkpoints can become reference points")
            rp = HvReferencePoint(
                id=f"Microsoft:{str(uuid.uuid4()).upper()}",
                vm_id=vm_id,
                rct_ids=tuple(sorted((slot, f"rctX:{h}:{t}") for slot, (h, t) in cp.marks.items())),
            )
            self.remove_checkpoint(vm_id, checkpoint_id)
            self.reference_points[rp.id] = rp
            return rp

    def list_reference_points(self, vm_id: str) -> list[HvReferencePoint]:
        with self._lock:
            self.calls.append("list_reference_points")
            return [rp for rp in self.reference_points.values() if rp.vm_id == vm_id]

    def remove_reference_point(self, vm_id: str, reference_point_id: str) -> None:
        with self._lock:
            self.calls.append("remove_reference_point")
            rp = self.reference_points.get(reference_point_id)
            if rp is not None and rp.vm_id == vm_id:
                del self.reference_points[reference_point_id]

    def virtual_disk_changes(self, path: str, limit_id: str, offset: int, length: int) -> HvChanges:
        with self._lock:
            self.calls.append("virtual_disk_changes")
            layer = Path(path)
            disk = next(
                (d for vm in self.vms.values() for d in vm.drives.values() if layer in d.chain),
                None,
            )
            if disk is None:
                raise RctUnavailable(
                    f"Hyper-V cannot list the changes of {path} since RCT id {limit_id} "
                    "(GetVirtualDiskChanges returned 32779)"
                )
            self._notice(disk)
            kind, _, rest = limit_id.partition(":")
            history, _, tick_text = rest.partition(":")
            end = disk.frozen_at.get(str(layer), disk.rct.tick)
            if kind != "rctX" or history != disk.rct.id or not tick_text.isdigit():
                raise RctUnavailable(
                    f"Hyper-V cannot list the changes of {path} since RCT id {limit_id} "
                    "(GetVirtualDiskChanges returned 32773)"
                )
            since = int(tick_text)
            if since > end:
                raise RctUnavailable(
                    f"Hyper-V cannot list the changes of {path} since RCT id {limit_id}: the "
                    "layer is older than the RCT id (GetVirtualDiskChanges returned 32773)"
                )
            with vdisk.open_disk(layer, read_only=True) as d:
                size = d.virtual_size
            if offset >= size or length <= 0:
                raise InvalidArgument(
                    f"GetVirtualDiskChanges: region {offset}+{length} is outside {path}"
                )
            stop = min(offset + length, offset + self.process_limit, size)
            g = self.granule
            pieces = []
            for t, off, n in disk.rct.writes:
                if since < t <= end:
                    lo, hi = max(off, offset), min(off + n, stop)
                    if lo < hi:
                        pieces.append((lo // g * g, min(-(-hi // g) * g, stop)))
            merged: list[list[int]] = []
            for lo, hi in sorted(pieces):
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            return HvChanges(
                processed=stop - offset, ranges=tuple((lo, hi - lo) for lo, hi in merged)
            )

    # -- HyperVApi: power, NICs, VMs ----------------------------------------------------------
    def set_power(self, vm_id: str, action: str) -> None:
        with self._lock:
            self.calls.append(f"set_power:{action}")
            vm = self._vm(vm_id)
            allowed = {
                "start": ({"Off", "Saved"}, "Running"),
                "stop": ({"Running"}, "Off"),
                "turn-off": ({"Running", "Paused", "Saved"}, "Off"),
                "suspend": ({"Running"}, "Paused"),
                "resume": ({"Paused"}, "Running"),
            }
            if action not in allowed:
                raise InvalidArgument(f"unknown power action {action!r}")
            sources, target = allowed[action]
            if vm.state not in sources:
                raise FailedPrecondition(
                    f"{action} of VM {vm.name} failed: the operation cannot be performed while "
                    f"the object is in its current state ({vm.state})"
                )
            vm.state = target

    def connect_nic(self, vm_id: str, nic: str, switch: str) -> None:
        with self._lock:
            self.calls.append("connect_nic")
            vm = self._vm(vm_id)
            found = next((n for n in vm.nics if n.name == nic), None)
            if found is None:
                raise NotFound(f"VM {vm.name} has no network adapter {nic!r}")
            if switch and switch not in self.switches:
                raise NotFound(f"Connect-VMNetworkAdapter: no virtual switch {switch!r}")
            found.switch = switch

    def new_differencing_disk(self, path: str, parent: str) -> None:
        with self._lock:
            self.calls.append("new_differencing_disk")
            fmt = vdisk.detect_format(parent)
            want = Path(path).suffix.lower().lstrip(".")
            if fmt is None or want != fmt.value:
                raise InvalidArgument(
                    f"New-VHD: {path} must have the format of its parent {parent}"
                )
            vdisk.create_disk(
                path,
                format=fmt,
                subformat="differencing",
                parent=parent,
                block_size=2 * MiB if fmt is vdisk.DiskFormat.VHDX else None,
            ).close()

    def new_vm(self, spec: NewVm) -> HvVm:
        """``New-VM``, ``Set-VM -Notes``, then one ``Add-VMHardDiskDrive`` per drive and one
        ``Add-VMNetworkAdapter`` per NIC, as the PowerShell script runs them: a step that fails
        leaves the VM made so far in Hyper-V (with its Notes and the drives and NICs added
        before), as the real script would. Every call makes a new VM with a new id, even with
        the name, Notes and disks of one removed earlier; its NICs get new MAC addresses."""
        with self._lock:
            self.calls.append("new_vm")
            vm = _Vm(
                id=str(uuid.uuid4()),
                name=spec.name,
                generation=spec.generation,
                cpu=spec.cpu_count,
                memory_mb=spec.memory_mb,
                path=Path(spec.folder),
                notes=spec.notes,
            )
            self.vms[vm.id] = vm
            for slot, path in spec.drives:
                parsed = parse_slot(slot)
                if parsed is None or (parsed[0] == "IDE" and spec.generation == 2):
                    raise InvalidArgument(f"Add-VMHardDiskDrive: no controller location {slot}")
                if not Path(path).is_file():
                    raise NotFound(f"Add-VMHardDiskDrive: the file {path} does not exist")
                chain = [Path(v.path) for v in reversed(self.vhd_chain(path))]
                vm.drives[slot] = self._new_disk(chain)
            for name, switch in spec.nics:
                if switch and switch not in self.switches:
                    raise NotFound(f"Add-VMNetworkAdapter: no virtual switch {switch!r}")
                vm.nics.append(_Nic(name, switch, _mac()))
            return self._hv_vm(vm)

    def remove_vm(self, vm_id: str) -> None:
        """``Remove-VM``: the VM, its checkpoints and reference points go; files stay."""
        with self._lock:
            self.calls.append("remove_vm")
            self._vm(vm_id)
            del self.vms[vm_id]
            self.checkpoints = {k: c for k, c in self.checkpoints.items() if c.vm_id != vm_id}
            self.reference_points = {
                k: r for k, r in self.reference_points.items() if r.vm_id != vm_id
            }

    # -- internals ------------------------------------------------------------------------------
    def _vm(self, vm_id: str) -> _Vm:
        vm = self.vms.get(vm_id.lower())
        if vm is None:
            raise NotFound(
                f"Get-VM failed: Hyper-V was unable to find a virtual machine with id {vm_id}"
            )
        return vm

    @staticmethod
    def _drive(vm: _Vm, slot: str) -> _Disk:
        if slot not in vm.drives:
            raise NotFound(f"VM {vm.name} has no drive at {slot}")
        return vm.drives[slot]

    def _new_disk(self, chain: list[Path]) -> _Disk:
        disk = _Disk(chain=list(chain))
        self._remember(disk)
        return disk

    @staticmethod
    def _remember(disk: _Disk) -> None:
        disk.identities = {str(p): layer_identity(p) for p in disk.chain}

    @staticmethod
    def _notice(disk: _Disk) -> None:
        """Hyper-V opens a disk and finds a layer changed behind its back: the RCT history no
        longer describes the disk, so it starts over."""
        current = {str(p): layer_identity(p) for p in disk.chain}
        if current != disk.identities:
            disk.rct = _History()
            disk.frozen_at = dict.fromkeys(disk.frozen_at, 0)
            disk.identities = current

    def _vhd(self, path: Path) -> HvVhd:
        with vdisk.open_disk(path, read_only=True) as d:
            # Get-VHD reports the parent as a normalised absolute path.
            parent = os.path.normpath(os.path.abspath(d.parent.path)) if d.parent else ""
            return HvVhd(
                path=str(path),
                format=d.format.value,
                type="differencing" if parent else "dynamic",
                virtual_size=d.virtual_size,
                file_size=path.stat().st_size,
                parent_path=parent,
            )

    @staticmethod
    def _hv_vm(vm: _Vm) -> HvVm:
        return HvVm(
            id=vm.id,
            name=vm.name,
            generation=vm.generation,
            cpu_count=vm.cpu,
            memory_mb=vm.memory_mb,
            state=vm.state,
            path=str(vm.path),
            notes=vm.notes,
            drives=tuple(HvDrive(s, str(d.chain[-1])) for s, d in vm.drives.items()),
            nics=tuple(HvNic(n.name, n.switch, n.mac) for n in vm.nics),
        )

    @staticmethod
    def _hv_checkpoint(cp: _Checkpoint) -> HvCheckpoint:
        return HvCheckpoint(
            id=cp.id,
            name=cp.name,
            vm_id=cp.vm_id,
            type=cp.type,
            drives=tuple(HvDrive(s, str(p)) for s, p in cp.drives.items()),
        )


def _mac() -> str:
    tail = uuid.uuid4().bytes[:3]
    return ":".join(f"{b:02x}" for b in (0x00, 0x15, 0x5D, *tail))
