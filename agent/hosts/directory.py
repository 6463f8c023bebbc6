"""The portable ``directory`` host backend: a VM is a folder with ``vm.json`` and its disks.

::

    <vm-root>/<vm-name>/vm.json       id, name, generation, cpu, memory_mb,
                                      state (off|running|paused), nics [{name, network, mac}],
                                      disks [{id, chain: [base, ..., active]}]
    <vm-root>/<vm-name>/disks/        VHD/VHDX files; checkpoints are differencing children
                                      (<base stem>_<cut number>.avhdx / .avhd)
    <vm-root>/<vm-name>/changes/      <disk id>/<layer>.cbt: the change log of each layer
                                      (agent.hosts.changelog); cuts.json: cuts, baseline,
                                      taints, layer identities (agent.hosts.cutstate);
                                      cuts/<n>-<disk id>.bits: the changed bitmap of cut n
    <vm-root>/<vm-name>/hooks/        optional pre-checkpoint / post-checkpoint (agent.hosts.hooks)
    <vm-root>/<vm-name>/vm.lock       writers shared, checkpoints exclusive (agent.hosts.vmlock)
    <vm-root>/<vm-name>/vm.ops.lock   serialises the backend's own operations on the VM

Chain entries are paths relative to the VM folder (never leaving it) or absolute paths
(replica VMs keep their disks in storage-classification folders). Start, stop and pause are
state changes in ``vm.json``; nothing executes but the VM's own checkpoint hooks: this backend
models a Hyper-V host faithfully on disk (the same formats, checkpoints as differencing
children, a change log like RCT) so that replication and failover can be exercised anywhere. A
backend that runs real VMs is a separate piece of work. ``docs/directory-backend.md``
describes the formats and the crash-safety order.

Checkpoints, change tracking and their crash-safety order are in
:mod:`agent.hosts.checkpoints`; the write path in :mod:`agent.hosts.dirwriter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.config import NetworkConfig
from agent.hosts import changelog, hooks, vmlock, vmspec
from agent.hosts.base import (
    Cut,
    DiskRecord,
    GuestProgramResult,
    HostBackend,
    HostInventory,
    NetworkRecord,
    NicRecord,
    RegisteredVm,
    StorageRecord,
    VmRecord,
    VmWriter,
    storage_class_of,
)
from agent.hosts.checkpoints import Checkpoints
from agent.hosts.dirwriter import DEFAULT_POLL_INTERVAL, DirectoryVmWriter
from agent.hosts.vmspec import MAX_VM_JSON, VM_STATES, DiskSpec, VmSpec
from sitepair import pki, vdisk
from sitepair.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SitepairError,
)

__all__ = ["MAX_VM_JSON", "VM_STATES", "DirectoryBackend", "DiskSpec", "VmSpec"]

log = logging.getLogger("sitepair.agent.directory")

#: Allowed power-state changes (a VM that is off cannot be paused).
_TRANSITIONS = {
    "off": {"running"},
    "running": {"paused", "off"},
    "paused": {"running", "off"},
}


class DirectoryBackend(HostBackend):
    """VMs as folders; see the module docstring.

    ``boot_id``, ``clock``, ``lock_timeout``, ``hook_timeout`` and ``fault_hook`` go to
    :class:`agent.hosts.checkpoints.Checkpoints`; ``writer_poll_interval`` to the writers."""

    kind = "directory"

    def __init__(
        self,
        vm_root: Path,
        *,
        storage: tuple[tuple[str, Path], ...] = (),
        networks: tuple[NetworkConfig, ...] = (),
        extra_volumes: tuple[Path, ...] = (),
        boot_id: Callable[[], str] = changelog.boot_id,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 60.0,
        hook_timeout: float = hooks.DEFAULT_TIMEOUT,
        writer_poll_interval: float = DEFAULT_POLL_INTERVAL,
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.vm_root = Path(vm_root)
        self.storage = storage
        self.networks = networks
        self._extra_volumes = extra_volumes
        self._boot_id = boot_id
        self._writer_poll = writer_poll_interval
        self._checkpoints = Checkpoints(
            boot_id=boot_id,
            clock=clock,
            lock_timeout=lock_timeout,
            hook_timeout=hook_timeout,
            fault_hook=fault_hook,
        )

    # -- VM folders -------------------------------------------------------------------------
    def vm_dir(self, name: str) -> Path:
        return self.vm_root / pki.check_identifier(name, "VM name")

    def read_vm(self, folder: Path) -> VmSpec:
        return vmspec.read_vm(folder)

    def write_vm(self, folder: Path, spec: VmSpec) -> None:
        vmspec.write_vm(folder, spec)

    def list_vm_dirs(self) -> list[Path]:
        if not self.vm_root.is_dir():
            return []
        return sorted(p for p in self.vm_root.iterdir() if (p / "vm.json").is_file())

    def find_vm(self, ref: str) -> tuple[Path, VmSpec]:
        """A VM by id or name."""
        for folder in self.list_vm_dirs():
            try:
                spec = self.read_vm(folder)
            except SitepairError:
                continue
            if ref in (spec.id, spec.name):
                return folder, spec
        raise NotFound(f"no VM {ref!r} under {self.vm_root}")

    def create_vm(
        self,
        name: str,
        *,
        disks: list[tuple[str, str, int]],
        cpu: int = 1,
        memory_mb: int = 1024,
        nics: list[tuple[str, str]] | None = None,
        vm_id: str | None = None,
        generation: int = 2,
        block_size: int | None = None,
    ) -> VmSpec:
        """Create a VM folder with new empty disks: ``disks`` is [(disk id, format, size)].

        Change tracking starts with the disks: each gets an empty change log."""
        folder = self.vm_dir(name)
        if (folder / "vm.json").exists():
            raise AlreadyExists(f"a VM named {name!r} already exists in {self.vm_root}")
        (folder / "disks").mkdir(parents=True, exist_ok=True)
        specs = []
        for disk_id, fmt, size in disks:
            pki.check_identifier(disk_id, "disk id")
            if fmt not in ("vhd", "vhdx"):
                raise InvalidArgument(f"disk format must be vhd or vhdx, not {fmt!r}")
            rel = f"disks/{disk_id}.{fmt}"
            disk = vdisk.create_disk(
                folder / rel,
                format=vdisk.DiskFormat(fmt),
                subformat=vdisk.SubFormat.DYNAMIC,
                size=size,
                block_size=block_size,
            )
            virtual_size = disk.virtual_size
            disk.close()
            changelog.create_log(
                changelog.log_path(folder, disk_id, rel),
                disk_id=disk_id,
                layer=rel,
                virtual_size=virtual_size,
                identity=changelog.layer_identity(folder / rel),
            )
            specs.append(DiskSpec(id=disk_id, chain=(rel,)))
        spec = VmSpec(
            id=vm_id or str(uuid.uuid4()),
            name=name,
            generation=generation,
            cpu=cpu,
            memory_mb=memory_mb,
            nics=tuple(
                NicRecord(name=n, network=net, mac=_mac(name, n)) for n, net in (nics or [])
            ),
            disks=tuple(specs),
        )
        self.write_vm(folder, spec)
        return spec

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
        """Make a VM of existing disk chains (a failover of a replica, a test failover).

        Each disk gets a new differencing child inside the VM folder as its active layer, so
        the chains given (a replica's layers, absolute paths) are never written by the VM:
        deleting the VM folder returns them exactly as they were. With ``replace``, a VM of the
        same id already in that folder (the fenced old primary) is given the new chains; its
        own files stay where they are, since the chains may use them."""
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r}")
        folder = self.vm_dir(name)
        previous: str | None = None
        if (folder / "vm.json").exists():
            old = self.read_vm(folder)
            if not replace or old.id != vm_id:
                raise AlreadyExists(f"a VM named {name!r} already exists in {self.vm_root}")
            previous = old.to_json().decode()
            # The new chains replace the old VM's: its tracking state describes layers it no
            # longer runs on.
            shutil.rmtree(folder / "changes", ignore_errors=True)
        (folder / "disks").mkdir(parents=True, exist_ok=True)
        stamp = uuid.uuid4().hex[:8]
        specs = []
        for disk_id, chain in disks:
            pki.check_identifier(disk_id, "disk id")
            top = Path(chain[-1])
            fmt = vdisk.detect_format(top)
            if fmt not in (vdisk.DiskFormat.VHD, vdisk.DiskFormat.VHDX):
                raise InvalidArgument(f"{top}: not a VHD or VHDX layer")
            rel = f"disks/{disk_id}-{stamp}.{'avhdx' if fmt is vdisk.DiskFormat.VHDX else 'avhd'}"
            child = vdisk.create_disk(
                folder / rel,
                format=fmt,
                subformat=vdisk.SubFormat.DIFFERENCING,
                parent=top,
                block_size=2 * 1024 * 1024 if fmt is vdisk.DiskFormat.VHDX else None,
            )
            virtual_size = child.virtual_size
            child.close()
            changelog.create_log(
                changelog.log_path(folder, disk_id, rel),
                disk_id=disk_id,
                layer=rel,
                virtual_size=virtual_size,
                identity=changelog.layer_identity(folder / rel),
            )
            specs.append(
                DiskSpec(id=disk_id, chain=(*(str(Path(c).resolve()) for c in chain), rel))
            )
        spec = VmSpec(
            id=vm_id,
            name=name,
            generation=generation,
            cpu=cpu,
            memory_mb=memory_mb,
            state=state,
            nics=tuple(
                NicRecord(name=n, network=net, mac=_mac(name, n)) for n, net in (nics or [])
            ),
            disks=tuple(specs),
        )
        self.write_vm(folder, spec)
        return RegisteredVm(
            vm_id=vm_id,
            name=name,
            location=str(folder),
            created=tuple(str(folder / d.chain[-1]) for d in spec.disks),
            previous=previous,
        )

    def unregister_vm(self, registered: RegisteredVm) -> None:
        folder = Path(registered.location)
        if registered.previous:
            # The replaced VM's own files stayed where they were: its definition comes back.
            spec = VmSpec.from_json(registered.previous.encode(), folder / "vm.json")
            self.write_vm(folder, spec)
            for child in registered.created:
                Path(child).unlink(missing_ok=True)
        elif (folder / "vm.json").exists():
            self.remove_vm(str(folder.name))
        else:
            shutil.rmtree(folder, ignore_errors=True)

    def guest_run(
        self, vm_ref: str, program: str, args: list[str], timeout: float
    ) -> GuestProgramResult:
        """Refused: a directory VM is a folder; no guest runs, so nothing can run in it."""
        _folder, spec = self.find_vm(vm_ref)
        raise FailedPrecondition(
            f"VM {spec.name} is a directory-backend VM: it has no guest to run {program} in",
            hint="check its disks from a script on the host (a recovery plan's script action)",
        )

    def remove_vm(self, vm_ref: str) -> Path:
        """Delete a VM's folder (its own layers, logs and vm.json). Layers its chains name
        outside the folder (a replica's) are left alone."""
        folder, _ = self.find_vm(vm_ref)
        with vmlock.operations_lock(folder):
            (folder / "vm.json").unlink()
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def vm_id_of(self, name: str) -> str | None:
        folder = self.vm_dir(name)
        if not (folder / "vm.json").exists():
            return None
        return self.read_vm(folder).id

    def vm_state(self, vm_ref: str) -> str:
        return self.find_vm(vm_ref)[1].state

    def disk_chains(self, vm_ref: str) -> dict[str, list[Path]]:
        """Each disk's chain as absolute paths, base first."""
        folder, spec = self.find_vm(vm_ref)
        return {d.id: [folder / c for c in d.chain] for d in spec.disks}

    # -- inventory --------------------------------------------------------------------------
    def _disk_record(self, folder: Path, disk: DiskSpec) -> DiskRecord:
        path = folder / disk.active
        fmt = path.suffix.lstrip(".").lower().replace("avhdx", "vhdx").replace("avhd", "vhd")
        size = file_size = 0
        try:
            file_size = path.stat().st_size
            detected = vdisk.detect_format(path)
            if detected is not None:
                fmt = detected.value
            size = self._virtual_size_unlocked(folder, disk)
        except (OSError, SitepairError) as exc:
            log.warning(
                "cannot read disk", extra={"fields": {"path": str(path), "error": str(exc)}}
            )
        return DiskRecord(
            id=disk.id,
            path=path,
            format=fmt,
            virtual_size=size,
            file_size=file_size,
            storage_class=storage_class_of(self.storage, path),
        )

    def _virtual_size_unlocked(self, folder: Path, disk: DiskSpec) -> int:
        """The disk's size, from its change log header when that describes the active layer
        (no image lock needed while a writer has the layer open), else from the image."""
        with contextlib.suppress(SitepairError):
            header = changelog.read_header(changelog.log_path(folder, disk.id, disk.active))
            if header.disk_id == disk.id and header.layer == disk.active:
                return header.virtual_size
        with vdisk.open_disk(folder / disk.active, read_only=True) as d:
            return d.virtual_size

    def _vm_record(self, folder: Path, spec: VmSpec) -> VmRecord:
        return VmRecord(
            id=spec.id,
            name=spec.name,
            generation=spec.generation,
            cpu_count=spec.cpu,
            memory_mb=spec.memory_mb,
            state=spec.state,
            disks=tuple(self._disk_record(folder, d) for d in spec.disks),
            nics=spec.nics,
        )

    def inventory(self) -> HostInventory:
        vms = []
        for folder in self.list_vm_dirs():
            try:
                spec = self.read_vm(folder)
            except SitepairError as exc:
                log.warning(
                    "skipping VM folder",
                    extra={"fields": {"folder": str(folder), "error": str(exc)}},
                )
                continue
            vms.append(self._vm_record(folder, spec))
        storage = []
        for name, path in self.storage:
            total = free = 0
            try:
                usage = psutil.disk_usage(str(path))
                total, free = usage.total, usage.free
            except OSError:
                pass
            storage.append(StorageRecord(name=name, path=path, total_bytes=total, free_bytes=free))
        return HostInventory(
            vms=tuple(vms),
            networks=tuple(NetworkRecord(n.name, n.subnets) for n in self.networks),
            storage=tuple(storage),
        )

    def volumes(self) -> list[Path]:
        return [self.vm_root, *(p for _, p in self.storage), *self._extra_volumes]

    # -- VM state ---------------------------------------------------------------------------
    def set_vm_state(self, vm_ref: str, state: str) -> VmRecord:
        """Power state as a change in ``vm.json`` (nothing executes). Writers are not stopped:
        the state is what an operator and failover see."""
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r}; use one of {', '.join(VM_STATES)}")
        folder, spec = self.find_vm(vm_ref)
        with vmlock.operations_lock(folder):
            spec = self.read_vm(folder)
            if spec.state != state:
                if state not in _TRANSITIONS[spec.state]:
                    raise FailedPrecondition(
                        f"VM {spec.name} is {spec.state}; it cannot become {state} "
                        f"({folder / 'vm.json'})"
                    )
                spec = dataclasses.replace(spec, state=state)
                self.write_vm(folder, spec)
        return self._vm_record(folder, spec)

    def connect_nic(self, vm_ref: str, nic: str, network: str) -> VmRecord:
        """Connect a NIC to a VM network ("" disconnects it). When the host declares its
        networks, the network must be one of them."""
        folder, spec = self.find_vm(vm_ref)
        if network and self.networks and network not in {n.name for n in self.networks}:
            offered = ", ".join(n.name for n in self.networks)
            raise InvalidArgument(
                f"VM {spec.name}: this host has no VM network {network!r} (it offers: {offered})"
            )
        with vmlock.operations_lock(folder):
            spec = self.read_vm(folder)
            names = [n.name for n in spec.nics]
            if nic not in names:
                raise NotFound(
                    f"VM {spec.name} has no NIC {nic!r} (NICs: {', '.join(names) or 'none'}; "
                    f"{folder / 'vm.json'})"
                )
            nics = tuple(
                dataclasses.replace(n, network=network) if n.name == nic else n for n in spec.nics
            )
            spec = dataclasses.replace(spec, nics=nics)
            self.write_vm(folder, spec)
        return self._vm_record(folder, spec)

    # -- writers ----------------------------------------------------------------------------
    def open_writer(self, vm_ref: str, *, running_only: bool = False) -> VmWriter:
        """A writer for the VM's disks; see :mod:`agent.hosts.dirwriter`. It may write
        whatever the VM's power state (every write is tracked), unless ``running_only``: then,
        like a guest, it writes only while the VM runs and is refused once it is off."""
        folder, spec = self.find_vm(vm_ref)
        return DirectoryVmWriter(
            folder,
            spec.name,
            lambda: self.read_vm(folder),
            boot=changelog.boot_uuid(self._boot_id()),
            recover=lambda: self._checkpoints.recover(folder, spec),
            poll_interval=self._writer_poll,
            running_only=running_only,
        )

    # -- cuts (agent.hosts.checkpoints) -----------------------------------------------------
    def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Cut:
        return self._checkpoints.take_cut(*self.find_vm(vm_ref), app_consistent=app_consistent)

    def outstanding_cut(self, vm_ref: str) -> Cut | None:
        return self._checkpoints.outstanding_cut(*self.find_vm(vm_ref))

    def release_cut(self, vm_ref: str, cut_id: str) -> None:
        self._checkpoints.release_cut(*self.find_vm(vm_ref), cut_id)

    def reset_tracking(self, vm_ref: str, cut_id: str) -> None:
        self._checkpoints.reset_tracking(*self.find_vm(vm_ref), cut_id)

    def recover(self, vm_ref: str) -> None:
        """Finish or undo an operation a dead process left half done (every other operation,
        and a writer that finds one, does this first)."""
        self._checkpoints.recover(*self.find_vm(vm_ref))

    # -- cuts -------------------------------------------------------------------------------


def _mac(vm: str, nic: str) -> str:
    """A stable locally administered MAC for a VM's NIC."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"sitepair:{vm}:{nic}").bytes
    octets = [0x02, *digest[:5]]
    return ":".join(f"{o:02x}" for o in octets)
