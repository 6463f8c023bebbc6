"""Registering VMs on Hyper-V for a failover, undoing that, and removing what sitepair made.

**Tested on Linux only, against ``FakeHyperVApi`` (``tests/hosts/fake_hyperv.py``); never run
against a real Hyper-V host.** A failover of a replica (:meth:`VmRegistrar.register`) makes a
new VM over a new differencing child of each replica chain; on a failback the fenced old VM is
removed and its ``Get-VM`` definition kept (JSON) so that an undo
(:meth:`VmRegistrar.unregister`) makes it again with ``New-VM`` over the same files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.hosts.base import RegisteredVm
from agent.hosts.hyperv_api import HvVm, HyperVApi, NewVm, notes_fields, parse_slot, slot_name
from agent.hosts.hyperv_cuts import RctCuts
from agent.hosts.hyperv_vm import (
    chain_of,
    same_drives,
    sitepair_id,
    state_name,
    vm_from_json,
    vm_to_json,
)
from agent.hosts.vmspec import VM_STATES
from sitepair import pki
from sitepair.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SitepairError,
)

log = logging.getLogger("sitepair.agent.hyperv")


class VmRegistrar:
    """Makes and removes the VMs of failovers. ``vm_dir`` gives the folder of a VM sitepair
    registers; ``set_vm_state`` powers a VM (by Hyper-V id) as the backend does; ``cuts``
    forgets the tracking state of a VM that is removed or made again."""

    def __init__(
        self,
        api: HyperVApi,
        *,
        vm_dir: Callable[[str], Path],
        cuts: RctCuts,
        set_vm_state: Callable[[str, str], object],
    ) -> None:
        self.api = api
        self.vm_dir = vm_dir
        self.cuts = cuts
        self.set_vm_state = set_vm_state

    def register(
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
        """Make a Hyper-V VM over existing disk chains (a failover of a replica, a test
        failover), as the directory backend does: each disk gets a new differencing child
        (``New-VHD -Differencing``) in ``<vm root>/<name>/disks/``, attached in its place, so the
        given layers are never written by the VM. Disks whose id names a controller location
        (``scsi0-1``) are attached there, the others in order; the VM's Notes keep sitepair's
        VM id and disk names.

        With ``replace``, a VM of that name and sitepair id (the fenced old primary, which must
        be off) is removed from Hyper-V first (``Remove-VM`` leaves its files), and its
        definition as ``Get-VM`` gave it is kept in ``previous`` (JSON) so that
        :meth:`unregister` can make it again; sitepair's tracking state of it is dropped, as
        its disks' RCT history cannot be trusted across the replace. If anything fails half-way,
        whatever was made is undone and the replaced VM is made again.

        Tested on Linux only, against ``FakeHyperVApi``; not yet run on a real Hyper-V host."""
        if state not in VM_STATES:
            raise InvalidArgument(
                f"unknown VM state {state!r}", hint=f"use one of {', '.join(VM_STATES)}"
            )
        _check_shape(
            name, vm_id, [d for d, _c in disks], cpu=cpu, memory_mb=memory_mb, generation=generation
        )
        folder = self.vm_dir(name)
        existing = [vm for vm in self.api.list_vms() if vm.name == name]
        for old in existing:
            if not replace or sitepair_id(old) != vm_id:
                raise AlreadyExists(
                    f"a VM named {name!r} already exists on this Hyper-V host",
                    hint="rename or remove that VM in Hyper-V Manager, or fail over under "
                    "another name",
                )
        if len(existing) > 1:
            raise FailedPrecondition(
                f"{len(existing)} Hyper-V VMs are named {name!r} and carry sitepair id {vm_id}; "
                "only one can be replaced and brought back",
                hint="remove the extra ones in Hyper-V Manager: "
                + ", ".join(v.id for v in existing),
            )
        for old in existing:
            if state_name(old.state) != "off":
                raise FailedPrecondition(
                    f"VM {name} ({old.id}) is {state_name(old.state)}; it must be off before a "
                    "failover replaces it (its memory state would be lost for good)",
                    hint="fence the old primary (shut it down) first, then fail over again",
                )
        slots = _assign_slots([d for d, _c in disks], generation)
        infos = []
        for disk_id, chain in disks:
            if not chain:
                raise InvalidArgument(f"disk {disk_id} of VM {name}: the chain is empty")
            top = str(Path(chain[-1]))
            found = self.api.vhd_info([top])
            if not found:
                raise NotFound(
                    f"disk {disk_id} of VM {name}: {top} is not a virtual disk Hyper-V can open",
                    hint="check that the file exists and the agent's account may read it",
                )
            infos.append(found[0])
        stamp = uuid.uuid4().hex[:8]
        children = [
            folder / "disks" / f"{disk_id}-{stamp}.{info.format}"
            for (disk_id, _c), info in zip(disks, infos, strict=True)
        ]
        registered = RegisteredVm(
            vm_id=vm_id,
            name=name,
            location=str(folder),
            created=tuple(str(c) for c in children),
            previous=vm_to_json(existing[0]) if existing else None,
        )
        renamed = {slot: disk_id for (disk_id, _c), slot in zip(disks, slots, strict=True)}
        notes = [f"sitepair-vm-id: {vm_id}"]
        if any(slot != disk_id for slot, disk_id in renamed.items()):
            notes.append("sitepair-disks: " + ";".join(f"{s}={d}" for s, d in renamed.items()))
        try:
            for old in existing:  # only once the new VM's disks are known to be usable
                self._drop(old)
            (folder / "disks").mkdir(parents=True, exist_ok=True)
            for (_d, chain), child in zip(disks, children, strict=True):
                self.api.new_differencing_disk(str(child), str(Path(chain[-1])))
            vm = self.api.new_vm(
                NewVm(
                    name=name,
                    folder=str(folder),
                    generation=generation,
                    cpu_count=cpu,
                    memory_mb=memory_mb,
                    notes="\n".join(notes),
                    drives=tuple((s, str(c)) for s, c in zip(slots, children, strict=True)),
                    nics=tuple(nics or ()),
                )
            )
            if state != "off":
                self.set_vm_state(vm.id, "running")
                if state == "paused":
                    self.set_vm_state(vm.id, "paused")
        except (SitepairError, OSError) as exc:
            # Undo whatever was made (a half-made VM Hyper-V left, the new children: sitepair's
            # own files, written by nothing yet) and bring the replaced VM back.
            try:
                self.unregister(registered)
            except (SitepairError, OSError) as undo:
                log.error(
                    "a failed registration could not be undone",
                    extra={"fields": {"vm": name, "error": str(undo)}},
                )
                exc.add_note(f"undoing the registration failed too: {undo}")
            raise
        return registered

    def unregister(self, registered: RegisteredVm) -> None:
        """Undo :meth:`register` exactly: the VM it made is turned off and removed from
        Hyper-V (``Remove-VM``) with sitepair's tracking state of it; the differencing children
        it made are deleted, with any layer Hyper-V added above them in the VM's folder (the
        AVHDX of a checkpoint taken since); folders left empty in the VM's folder go; and the VM
        it replaced, if any, is made again with ``New-VM`` from its recorded definition: same
        name, Notes (with its sitepair id, so the broker still knows it by the same id),
        generation, CPU, memory, drives at the same controller locations over the same files,
        NICs on the same switches. Its disks are never written.

        The VM made again is a new VM to Hyper-V: a new Hyper-V id, no checkpoints or RCT
        reference points, NICs with new dynamic MAC addresses, and only the settings ``Get-VM``
        reported (see ``docs/hyperv-backend.md``). sitepair's tracking state of it is dropped,
        so its next cut is untrusted and the next cycle is a checksum resync.

        Idempotent: the new VM is told from the one brought back by its drives (they use the
        children this registration made), and a VM already brought back is not made twice.
        Tested on Linux only, against ``FakeHyperVApi``; not yet run on a real Hyper-V host."""
        previous = vm_from_json(registered.previous) if registered.previous else None
        created = {c.lower() for c in registered.created}
        folder = Path(registered.location)
        extra: list[Path] = []
        for vm in self.api.list_vms():
            if vm.name != registered.name or sitepair_id(vm) != registered.vm_id:
                continue
            if previous is not None and same_drives(vm, previous):
                continue  # the replaced VM, already brought back
            above = self._layers_above(vm, created)
            if above is None:
                continue  # another VM of that name and id: not this registration's
            extra.extend(p for p in above if p.is_relative_to(folder))
            self._drop(vm)
        for path in [*map(Path, registered.created), *extra]:
            path.unlink(missing_ok=True)
        _prune_empty(folder)
        if previous is not None:
            self._restore(previous)

    def _layers_above(self, vm: HvVm, created: set[str]) -> list[Path] | None:
        """The layers of ``vm``'s disks above one of ``created`` (checkpoints' AVHDX), or
        ``None`` if none of its disks is over one of ``created``: another VM. A VM of that name
        and id with no drives at all is what a ``New-VM`` that failed half-way leaves: ours."""
        if not vm.drives:
            return []
        found = False
        above: list[Path] = []
        for drive in vm.drives:
            try:
                chain = chain_of(self.api, drive.path)
            except (SitepairError, OSError):
                chain = [Path(drive.path)]
            names = [str(p).lower() for p in chain]
            hits = [i for i, p in enumerate(names) if p in created]
            if hits:
                found = True
                above.extend(chain[hits[0] + 1 :])
        return above if found else None

    def _drop(self, vm: HvVm) -> None:
        """Remove ``vm`` from Hyper-V (turned off first; its files stay) and sitepair's tracking
        state of it (before, so that a failure leaves untrusted tracking, never stale)."""
        self.cuts.forget(vm.id)
        self.api.remove_vm(vm.id)
        self.cuts.forget(vm.id)

    def _restore(self, previous: HvVm) -> None:
        """Make the VM ``previous`` describes again, unless it is already there."""
        previous_id = sitepair_id(previous)
        for vm in self.api.list_vms():
            if (
                vm.name == previous.name
                and sitepair_id(vm) == previous_id
                and same_drives(vm, previous)
            ):
                return
        notes = previous.notes
        if "vm-id" not in notes_fields(notes):
            # Hyper-V gives the new VM a new id: the Notes keep the one the broker knows.
            notes = "\n".join(
                x for x in (notes.rstrip("\n"), f"sitepair-vm-id: {previous_id}") if x
            )
        vm = self.api.new_vm(
            NewVm(
                name=previous.name,
                folder=previous.path,
                generation=previous.generation,
                cpu_count=previous.cpu_count,
                memory_mb=previous.memory_mb,
                notes=notes,
                drives=tuple((d.slot, d.path) for d in previous.drives),
                nics=tuple((n.name, n.switch) for n in previous.nics),
            )
        )
        self.cuts.forget(vm.id)
        log.warning(
            "the VM a failover replaced was made again; its next cycle is a resync",
            extra={"fields": {"vm": vm.name, "hyperv_id": vm.id, "was": previous.id}},
        )

    def remove(self, vm: HvVm) -> Path:
        """Remove a VM sitepair registered from Hyper-V (turned off first), sitepair's tracking
        of it, and the folder sitepair gave it; disks elsewhere (a replica's layers) are left
        alone. A VM sitepair did not register is refused: nothing of it is touched."""
        if "vm-id" not in notes_fields(vm.notes):
            raise FailedPrecondition(
                f"VM {vm.name} ({vm.id}) was not registered by sitepair; sitepair removes only "
                "the VMs it made (their Notes carry sitepair-vm-id)",
                hint="remove it in Hyper-V Manager if it must go",
            )
        self.api.remove_vm(vm.id)
        self.cuts.forget(vm.id)
        try:
            folder = self.vm_dir(vm.name)
        except InvalidArgument:
            return Path(vm.path)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        return folder


def _prune_empty(folder: Path) -> None:
    """Remove the empty folders in ``folder`` and ``folder`` itself if it ends up empty."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _check_shape(
    name: str, vm_id: str, disk_ids: list[str], *, cpu: int, memory_mb: int, generation: int
) -> None:
    """What Hyper-V would refuse half-way through making the VM, refused before anything is made."""
    pki.check_identifier(name, "VM name")
    if not vm_id or vm_id != vm_id.strip() or any(c in vm_id for c in "\r\n"):
        raise InvalidArgument(
            f"VM {name}: sitepair VM id {vm_id!r} cannot be kept in the VM's Notes",
            hint="use the VM id the broker assigned",
        )
    if generation not in (1, 2):
        raise InvalidArgument(
            f"VM {name}: generation {generation} does not exist in Hyper-V", hint="use 1 or 2"
        )
    if cpu < 1:
        raise InvalidArgument(f"VM {name}: {cpu} virtual processors", hint="give it at least 1")
    if memory_mb < 32 or memory_mb % 2:
        raise InvalidArgument(
            f"VM {name}: {memory_mb} MB of memory; Hyper-V needs an even number of MB, at least 32",
            hint="round the VM's memory up to an even number of MB",
        )
    if not disk_ids:
        raise InvalidArgument(
            f"VM {name}: no disks; a failover makes a VM of a replica's disks",
            hint="check that the replica holds data",
        )
    seen = set()
    for disk_id in disk_ids:
        pki.check_identifier(disk_id, "disk id")
        if disk_id in seen:
            raise InvalidArgument(f"VM {name}: disk {disk_id} is given twice")
        seen.add(disk_id)
        slot = parse_slot(disk_id)
        if slot is not None and slot[0] == "IDE" and generation == 2:
            raise InvalidArgument(
                f"VM {name}: disk {disk_id} names an IDE location, and a generation 2 VM has "
                "no IDE controller",
                hint="fail over as a generation 1 VM, or name the disk after a SCSI location",
            )
        if slot is not None and (slot[1] > 3 or slot[2] > (1 if slot[0] == "IDE" else 63)):
            raise InvalidArgument(
                f"VM {name}: disk {disk_id} names a controller location Hyper-V does not have",
                hint="SCSI controllers 0-3 with locations 0-63; IDE 0-1 with locations 0-1",
            )


def _assign_slots(disk_ids: list[str], generation: int) -> list[str]:
    """Each disk's controller location: the one its id names, else the next free one (IDE 0
    then SCSI 0 on generation 1, SCSI 0 on generation 2; IDE 1:0 is the DVD drive)."""
    wanted = [d if parse_slot(d) else None for d in disk_ids]
    taken = {w for w in wanted if w}
    free = iter(
        s
        for s in (
            ([slot_name("IDE", 0, 0), slot_name("IDE", 0, 1)] if generation == 1 else [])
            + [slot_name("SCSI", n, loc) for n in range(4) for loc in range(64)]
        )
        if s not in taken
    )
    out = []
    for w in wanted:
        if w is not None and w not in out:
            out.append(w)
        else:
            out.append(next(free))
    return out
