"""The ``qemu`` host backend: VMs are QEMU processes on a Linux host (KVM where it works, TCG
otherwise), their disks VHDX or VHD files, driven over QMP.

* VM folders, definitions and the QEMU command line: :mod:`agent.hosts.qemu_vm`.
* Cuts, change tracking and their trust: :mod:`agent.hosts.qemu_layers` (qcow2 overlays over
  the VHDX; the overlay's clusters are the change log).
* QMP through QEMU's own ``qemu.qmp`` library: :mod:`agent.hosts.qemu_monitor`.

Power: "running" starts QEMU (paused, a tracking layer put on every disk, then continued) or
continues a paused VM; "paused" stops the vCPUs; "off" presses the ACPI power button and waits
``stop_timeout`` seconds for the guest to power off, then quits QEMU (which closes the disks
cleanly, though the guest did not shut down). A VM outlives the agent; the agent finds it again
from the instance its start recorded.

VM networks map to QEMU network backends through ``networks`` (agent.toml ``[networks]``):
a network whose name is not configured, or "" (not connected), gets a NIC with no backend
(link down). Guests never get a route off the host unless the operator configured one.

Linux only; ``docs/qemu-backend.md`` describes setup, guarantees and limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.hosts import qemu_guest_agent, qemu_vm
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
from agent.hosts.qemu_layers import Layers
from agent.hosts.qemu_monitor import QmpSession, session
from agent.hosts.qemu_vm import QemuDisk, QemuVmSpec, Runtime
from sitepair import paths, vdisk
from sitepair.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SitepairError,
)
from sitepair.fsutil import atomic_write
from sitepair.vdisk import ops as vdisk_ops

log = logging.getLogger("sitepair.agent.qemu")

VM_STATES = ("off", "running", "paused")


class QemuBackend(HostBackend):
    kind = "qemu"

    def __init__(
        self,
        vm_root: Path,
        *,
        binary: str = "qemu-system-x86_64",
        accel: str = "auto",
        storage: tuple[tuple[str, Path], ...] = (),
        networks: tuple[tuple[str, str], ...] = (),
        extra_volumes: tuple[Path, ...] = (),
        stop_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vm_root = Path(vm_root)
        self.binary = binary
        self.accel_wanted = accel
        self.storage = storage
        #: VM network name -> QEMU -netdev backend ("user,restrict=on", "bridge,br=br0", ...)
        self.networks = dict(networks)
        self._extra_volumes = extra_volumes
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._locks: dict[str, threading.RLock] = {}
        self._locks_lock = threading.Lock()
        self._accel: str | None = None

    # -- folders ------------------------------------------------------------------------------
    def vm_dir(self, name: str) -> Path:
        return self.vm_root / paths.check_component(name, "VM name")

    def list_vm_dirs(self) -> list[Path]:
        if not self.vm_root.is_dir():
            return []
        return sorted(p for p in self.vm_root.iterdir() if (p / "vm.json").is_file())

    def find_vm(self, ref: str) -> tuple[Path, QemuVmSpec]:
        for folder in self.list_vm_dirs():
            try:
                spec = qemu_vm.read_vm(folder)
            except SitepairError:
                continue
            if ref in (spec.id, spec.name):
                return folder, spec
        raise NotFound(f"no VM {ref!r} under {self.vm_root}")

    @contextlib.contextmanager
    def _vm(self, ref: str) -> Iterator[tuple[Path, QemuVmSpec, Layers]]:
        """The VM, its layers, and its lock held (one operation at a time per VM)."""
        folder, spec = self.find_vm(ref)
        with self._locks_lock:
            lock = self._locks.setdefault(spec.id, threading.RLock())
        with lock:
            layers = Layers(folder, spec)
            layers.check_offline(self._instance(folder) is not None)
            yield folder, spec, layers

    def _instance(self, folder: Path) -> qemu_vm.Instance | None:
        return qemu_vm.running_instance(Runtime(folder))

    def accel(self) -> str:
        if self._accel is None:
            self._accel = qemu_vm.choose_accel(self.binary, self.accel_wanted)
        return self._accel

    # -- creating VMs -------------------------------------------------------------------------
    def create_vm(
        self,
        name: str,
        *,
        disks: list[tuple[str, str, int | Path]],
        cpu: int = 1,
        memory_mb: int = 256,
        nics: list[tuple[str, str]] | None = None,
        vm_id: str | None = None,
        firmware: str = "bios",
        machine: str = "pc",
    ) -> QemuVmSpec:
        """A VM folder with its disks: ``disks`` is [(disk id, format, size or an image to
        copy)] (the first disk boots)."""
        folder = self.vm_dir(name)
        if (folder / "vm.json").exists():
            raise AlreadyExists(f"a VM named {name!r} already exists in {self.vm_root}")
        (folder / "disks").mkdir(parents=True, exist_ok=True)
        specs = []
        for disk_id, fmt, source in disks:
            paths.check_component(disk_id, "disk id")
            if fmt not in qemu_vm.DISK_FORMATS:
                raise InvalidArgument(f"disk format must be vhd or vhdx, not {fmt!r}")
            rel = f"disks/{disk_id}.{fmt}"
            if isinstance(source, Path):
                shutil.copyfile(source, folder / rel)
            else:
                vdisk.create_disk(
                    folder / rel, format=fmt, subformat=vdisk.SubFormat.DYNAMIC, size=source
                ).close()
            specs.append(QemuDisk(id=disk_id, base=rel, format=fmt))
        spec = QemuVmSpec(
            id=vm_id or str(uuid.uuid4()),
            name=name,
            firmware=firmware,
            machine=machine,
            cpu=cpu,
            memory_mb=memory_mb,
            disks=tuple(specs),
            nics=tuple(
                NicRecord(name=n, network=net, mac=_mac(name, n)) for n, net in (nics or [])
            ),
        )
        qemu_vm.write_vm(folder, spec)
        return spec

    def register_vm(
        self,
        name: str,
        *,
        vm_id: str,
        disks: list[tuple[str, list[Path]]],
        cpu: int,
        memory_mb: int,
        generation: int = 1,
        nics: list[tuple[str, str]] | None = None,
        state: str = "off",
        replace: bool = False,
    ) -> RegisteredVm:
        """A VM of existing disk chains (a replica's recovery point): each chain is copied
        into a new VHDX or VHD in the VM folder (``sitepair.vdisk`` flattens it, copying only
        allocated data), since QEMU cannot open a differencing VHDX. The chains are never
        written, so undo is exact; the copy costs time in proportion to the disks' data.
        Generation 2 (UEFI) boots with OVMF, generation 1 with SeaBIOS."""
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r}")
        paths.check_component(vm_id, "VM id")
        folder = self.vm_dir(name)
        previous: str | None = None
        if (folder / "vm.json").exists():
            old = qemu_vm.read_vm(folder)
            if not replace or old.id != vm_id:
                raise AlreadyExists(f"a VM named {name!r} already exists in {self.vm_root}")
            inst = self._instance(folder)
            if inst is not None:
                self._stop(folder, old, inst, graceful=False)
            layers_file = folder / "layers.json"
            previous = json.dumps(
                {
                    "vm": (folder / "vm.json").read_text(),
                    "layers": layers_file.read_text() if layers_file.exists() else "",
                }
            )
            layers_file.unlink(missing_ok=True)
        (folder / "disks").mkdir(parents=True, exist_ok=True)
        stamp = uuid.uuid4().hex[:8]
        created: list[str] = []
        specs = []
        try:
            for disk_id, chain in disks:
                paths.check_component(disk_id, "disk id")
                if not chain:
                    raise InvalidArgument(f"disk {disk_id} of VM {name}: the chain is empty")
                # The image format of the chain (a qcow2 overlay on top, as in a cut of a
                # qemu VM, takes its base's).
                with vdisk.open_disk(chain[0], read_only=True) as bottom:
                    fmt = bottom.format.value
                if fmt not in qemu_vm.DISK_FORMATS:
                    raise InvalidArgument(f"{chain[-1]}: not a VHD or VHDX layer")
                rel = f"disks/{disk_id}-{stamp}.{fmt}"
                vdisk_ops.flatten(chain[-1], folder / rel, format=fmt)
                created.append(str(folder / rel))
                specs.append(QemuDisk(id=disk_id, base=rel, format=fmt))
            spec = QemuVmSpec(
                id=vm_id,
                name=name,
                firmware="uefi" if generation == 2 else "bios",
                machine="q35" if generation == 2 else "pc",
                cpu=cpu,
                memory_mb=memory_mb,
                disks=tuple(specs),
                nics=tuple(
                    NicRecord(name=n, network=net, mac=_mac(name, n)) for n, net in (nics or [])
                ),
            )
            qemu_vm.write_vm(folder, spec)
        except BaseException:
            for f in created:
                Path(f).unlink(missing_ok=True)
            raise
        registered = RegisteredVm(
            vm_id=vm_id,
            name=name,
            location=str(folder),
            created=tuple(created),
            previous=previous,
        )
        if state != "off":
            self.set_vm_state(vm_id, state)
        return registered

    def unregister_vm(self, registered: RegisteredVm) -> None:
        folder = Path(registered.location)
        if (folder / "vm.json").exists():
            spec = qemu_vm.read_vm(folder)
            inst = self._instance(folder)
            if inst is not None:
                self._stop(folder, spec, inst, graceful=False)
        if registered.previous:
            doc = json.loads(registered.previous)
            atomic_write(folder / "vm.json", str(doc["vm"]).encode())
            if doc.get("layers"):
                atomic_write(folder / "layers.json", str(doc["layers"]).encode())
            else:
                (folder / "layers.json").unlink(missing_ok=True)
            for f in registered.created:
                Path(f).unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)

    def vm_id_of(self, name: str) -> str | None:
        folder = self.vm_dir(name)
        if not (folder / "vm.json").exists():
            return None
        return qemu_vm.read_vm(folder).id

    def vm_state(self, vm_ref: str) -> str:
        folder, spec = self.find_vm(vm_ref)
        return self._state(folder, spec)

    def settle_disks(self, vm_ref: str) -> dict[str, list[Path]]:
        """Fold the VM's tracking layers into its bases (the VM is off), so that its disks are
        plain VHDX/VHD files a replica can adopt and write."""
        with self._vm(vm_ref) as (folder, spec, layers):
            if self._instance(folder) is not None:
                raise FailedPrecondition(f"VM {spec.name} is running; power it off first")
            layers.fold(None, {d.id: len(layers.state.overlays.get(d.id, [])) for d in spec.disks})
            layers.state.cut = None
            layers.state.pending = {}
            layers.distrust("the VM's disks became a replica")
            return {d.id: layers.chain(d.id) for d in spec.disks}

    def guest_run(
        self, vm_ref: str, program: str, args: list[str], timeout: float
    ) -> GuestProgramResult:
        """Through qemu-guest-agent's ``guest-exec`` on the VM's ``org.qemu.guest_agent.0``
        channel (every VM has it): :func:`qemu_guest_agent.run_program`."""
        folder, spec = self.find_vm(vm_ref)
        if self._instance(folder) is None:
            raise FailedPrecondition(
                f"VM {spec.name} is off; a program runs only in a running guest",
                hint="start the VM first",
            )
        return qemu_guest_agent.run_program(
            Runtime(folder).qga, vm=spec.name, program=program, args=args, timeout=timeout
        )

    def remove_vm(self, vm_ref: str) -> Path:
        """Power the VM off if it runs, and delete its folder."""
        with self._vm(vm_ref) as (folder, spec, _layers):
            inst = self._instance(folder)
            if inst is not None:
                self._stop(folder, spec, inst, graceful=False)
            (folder / "vm.json").unlink()
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    # -- inventory ----------------------------------------------------------------------------
    def _state(self, folder: Path, spec: QemuVmSpec) -> str:
        inst = self._instance(folder)
        if inst is None:
            return "off"
        try:
            with session(Runtime(folder).qmp, vm=spec.name, timeout=5) as qmp:
                status = qmp.execute("query-status")
        except SitepairError:
            return "running"  # alive but busy: say running rather than off
        return "paused" if status.get("status") in ("paused", "prelaunch") else "running"

    def _record(self, folder: Path, spec: QemuVmSpec) -> VmRecord:
        layers = Layers(folder, spec, locked=False)
        disks = []
        for d in spec.disks:
            top = layers.chain(d.id)[-1]
            base = layers.chain(d.id)[0]
            size = file_size = 0
            try:
                file_size = sum(p.stat().st_size for p in layers.chain(d.id) if p.exists())
                with vdisk.open_disk(base, read_only=True) as img:
                    size = img.virtual_size
            except (OSError, SitepairError) as exc:
                log.warning(
                    "cannot read disk", extra={"fields": {"path": str(top), "error": str(exc)}}
                )
            disks.append(
                DiskRecord(
                    id=d.id,
                    path=base,
                    format=d.format,
                    virtual_size=size,
                    file_size=file_size,
                    storage_class=storage_class_of(self.storage, base),
                )
            )
        return VmRecord(
            id=spec.id,
            name=spec.name,
            generation=spec.generation,
            cpu_count=spec.cpu,
            memory_mb=spec.memory_mb,
            state=self._state(folder, spec),
            disks=tuple(disks),
            nics=spec.nics,
        )

    def inventory(self) -> HostInventory:
        vms = []
        for folder in self.list_vm_dirs():
            try:
                vms.append(self._record(folder, qemu_vm.read_vm(folder)))
            except SitepairError as exc:
                log.warning(
                    "skipping a VM folder",
                    extra={"fields": {"folder": str(folder), "error": str(exc)}},
                )
        storage = []
        for name, folder in self.storage:
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(folder)
                storage.append(StorageRecord(name, folder, usage.total, usage.free))
        return HostInventory(
            vms=tuple(vms),
            networks=tuple(NetworkRecord(name=n) for n in sorted(self.networks)),
            storage=tuple(storage),
        )

    def volumes(self) -> list[Path]:
        return [self.vm_root, *(f for _, f in self.storage), *self._extra_volumes]

    def disk_chains(self, vm_ref: str) -> dict[str, list[Path]]:
        """Each disk's layers on disk, base first (the VM should be off: nothing writes)."""
        folder, spec = self.find_vm(vm_ref)
        layers = Layers(folder, spec, locked=False)
        return {d.id: layers.chain(d.id) for d in spec.disks}

    # -- power ----------------------------------------------------------------------------------
    def set_vm_state(self, vm_ref: str, state: str) -> VmRecord:
        if state not in VM_STATES:
            raise InvalidArgument(f"unknown VM state {state!r} (one of {', '.join(VM_STATES)})")
        with self._vm(vm_ref) as (folder, spec, layers):
            inst = self._instance(folder)
            if state == "running":
                if inst is None:
                    self._start(folder, spec, layers)
                else:
                    with session(Runtime(folder).qmp, vm=spec.name) as qmp:
                        qmp.execute("cont")
            elif state == "paused":
                if inst is None:
                    raise FailedPrecondition(f"VM {spec.name} is off; it cannot be paused")
                with session(Runtime(folder).qmp, vm=spec.name) as qmp:
                    qmp.execute("stop")
            elif inst is not None:
                self._stop(folder, spec, inst, graceful=True)
                layers.state.instance = None
                layers.save()
            return self._record(folder, spec)

    def _nic_backends(self, spec: QemuVmSpec) -> dict[str, str]:
        return {n.name: self.networks.get(n.network, "") for n in spec.nics if n.network}

    def _start(self, folder: Path, spec: QemuVmSpec, layers: Layers) -> None:
        rt = Runtime(folder)
        accel = self.accel()
        disks = [
            (
                layers.chain(d.id)[0],
                d.format,
                [(n, layers.overlay_path(d.id, n)) for n in layers.state.overlays.get(d.id, [])],
            )
            for d in spec.disks
        ]
        vars_file = None
        if spec.firmware == "uefi":
            vars_file = folder / "uefi-vars.fd"
            if not vars_file.exists():
                shutil.copyfile(qemu_vm.OVMF_VARS, vars_file)
        argv = qemu_vm.command_line(
            self.binary,
            spec,
            rt,
            accel=accel,
            disks=disks,
            nic_backends=self._nic_backends(spec),
            vars_file=vars_file,
        )
        inst = qemu_vm.launch(argv, rt, accel=accel)
        layers.state.instance = {"pid": inst.pid, "create_time": inst.create_time}
        layers.save()
        try:
            with session(rt.qmp, vm=spec.name) as qmp:
                # Tracking goes on before the guest runs: every write lands in a new layer.
                layers.put_overlays(qmp)
                qmp.execute("cont")
        except BaseException:
            qemu_vm.kill(inst)
            layers.state.instance = None
            layers.distrust("the VM failed to start with its tracking layer")
            raise
        layers.note_bases()
        layers.save()
        log.info(
            "VM started",
            extra={"fields": {"vm": spec.name, "pid": inst.pid, "accel": accel}},
        )

    def _stop(
        self, folder: Path, spec: QemuVmSpec, inst: qemu_vm.Instance, *, graceful: bool
    ) -> None:
        rt = Runtime(folder)
        if graceful:
            with contextlib.suppress(SitepairError), session(rt.qmp, vm=spec.name) as qmp:
                qmp.execute("system_powerdown")
            if qemu_vm.wait_gone(inst, self.stop_timeout):
                log.info("VM powered off by its guest", extra={"fields": {"vm": spec.name}})
                return
            log.warning(
                "the guest did not power off in time; quitting QEMU",
                extra={"fields": {"vm": spec.name, "timeout": self.stop_timeout}},
            )
        with contextlib.suppress(SitepairError), session(rt.qmp, vm=spec.name, timeout=10) as qmp:
            qmp.quit()
        if not qemu_vm.wait_gone(inst, 30):
            qemu_vm.kill(inst)

    def connect_nic(self, vm_ref: str, nic: str, network: str) -> VmRecord:
        with self._vm(vm_ref) as (folder, spec, _layers):
            if not any(n.name == nic for n in spec.nics):
                raise NotFound(f"VM {spec.name} has no NIC {nic!r}")
            if self._instance(folder) is not None:
                raise FailedPrecondition(
                    f"VM {spec.name} is running; its NICs are connected when it starts",
                    hint="power it off first",
                )
            nics = tuple(
                NicRecord(name=n.name, network=network if n.name == nic else n.network, mac=n.mac)
                for n in spec.nics
            )
            changed = dataclasses.replace(spec, nics=nics)
            qemu_vm.write_vm(folder, changed)
            return self._record(folder, changed)

    # -- replication ----------------------------------------------------------------------------
    def open_writer(self, vm_ref: str) -> VmWriter:
        raise FailedPrecondition(
            "a qemu VM's disks are written by its guest; sitepair does not write into them"
        )

    @contextlib.contextmanager
    def _monitor(self, folder: Path, spec: QemuVmSpec) -> Iterator[QmpSession | None]:
        if self._instance(folder) is None:
            yield None
            return
        with session(Runtime(folder).qmp, vm=spec.name) as qmp:
            yield qmp

    def take_cut(self, vm_ref: str, *, app_consistent: bool = False) -> Cut:
        with self._vm(vm_ref) as (folder, spec, layers), self._monitor(folder, spec) as qmp:
            if qmp is not None:
                layers.check_graph(qmp)
            if app_consistent:
                if qmp is None:
                    # Off: nothing runs in the guest, the disks are as consistent as they get.
                    return layers.take_cut(None, app_consistent=True, now=self._clock())
                qga = Runtime(folder).qga
                # No guest agent: QuiesceFailed at once (before any overlay is made), and the
                # replication loop takes a crash-consistent cut.
                agent = qemu_guest_agent.GuestAgent(qga, vm=spec.name)
                try:
                    agent.sync()
                finally:
                    agent.close()
                return layers.take_cut(
                    qmp,
                    app_consistent=True,
                    now=self._clock(),
                    quiesce=lambda: qemu_guest_agent.frozen(qga, vm=spec.name),
                )
            return layers.take_cut(qmp, app_consistent=False, now=self._clock())

    def outstanding_cut(self, vm_ref: str) -> Cut | None:
        with self._vm(vm_ref) as (_folder, _spec, layers):
            return layers.outstanding()

    def release_cut(self, vm_ref: str, cut_id: str) -> None:
        with self._vm(vm_ref) as (folder, spec, layers), self._monitor(folder, spec) as qmp:
            if qmp is not None:
                layers.check_graph(qmp)
            layers.release(qmp, cut_id)

    def reset_tracking(self, vm_ref: str, cut_id: str) -> None:
        with self._vm(vm_ref) as (_folder, _spec, layers):
            layers.reset_tracking(cut_id)


def _mac(vm: str, nic: str) -> str:
    """A stable, locally administered MAC address for a NIC."""
    digest = hashlib.sha256(f"{vm}/{nic}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
