"""Inventory sync: what hosts report becomes queryable tables (VMs, networks, storage).

Every Inventory message replaces the host's rows in one transaction, so a VM added, removed or
given a new disk on a host shows in the broker within one heartbeat of the agent noticing. A
host that names a cloud in its own configuration joins it (the cloud is created at the host's
site if it does not exist yet); a host already placed in a cloud by an operator stays there.

An inventory is checked on arrival by :func:`accept_inventory` before any of it is stored, and
:func:`sync_inventory` takes only what that accepted (the caps are in :mod:`broker.bounds`):

* **refused whole** (the host's previous inventory stays; the stream goes on): serialized over
  :data:`~broker.bounds.MAX_INVENTORY_BYTES`, more than :data:`~broker.bounds.MAX_VMS` VMs,
  :data:`~broker.bounds.MAX_NETWORKS` networks or :data:`~broker.bounds.MAX_STORAGE` storage
  classifications, or a digest that is not a short token. Dropping entries past a count would
  make VMs vanish from the broker at random, so the whole message is refused instead.
* **a VM left out** (with a warning; the rest is stored): its id is not a path component
  (:func:`sitepair.paths.check_component`: no ``..``, separators, NUL, absolute paths ...), its
  name is not a display name (:func:`sitepair.paths.check_display_name`), its id repeats an
  earlier VM's, it has more than :data:`~broker.bounds.MAX_DISKS_PER_VM` disks or
  :data:`~broker.bounds.MAX_NICS_PER_VM` NICs, a disk id is not a path component or repeats,
  a disk path is not an absolute path of at most :data:`~broker.bounds.MAX_PATH` characters
  free of control characters, a disk format or storage class is not a component, its state,
  a NIC name, network or MAC breaks its rule, or a number is out of the store's range.
* **a network left out**: its name is not a display name or repeats, or it has more than
  :data:`~broker.bounds.MAX_SUBNETS` subnets or one that is not a short CIDR.
* **a storage classification left out**: its name is not a path component or repeats, its path
  is not absolute or holds control characters, or a size is out of range.

The warning names at most :data:`MAX_REASONS_LOGGED` entries (values cut short) and counts the
rest, so a hostile inventory cannot flood the log either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from broker import bounds
from broker.store.models import Cloud, HostStorage, InventoryVm, Server
from broker.store.sqlite import Tx
from sitepair import paths
from sitepair.errors import InvalidArgument
from sitepair.logsafe import shown
from sitepair.v1 import common_pb2

log = logging.getLogger("sitepair.broker.inventory")

#: Reasons for left-out entries named in one warning; the rest are only counted.
MAX_REASONS_LOGGED = 8

_DIGEST = re.compile(r"^[A-Za-z0-9:_-]*$")
_MAC = re.compile(r"^[0-9A-Fa-f:.-]*$")
_SUBNET = re.compile(r"^[0-9A-Fa-f:./]{1,64}$")


@dataclasses.dataclass(frozen=True)
class AcceptedInventory:
    """An inventory that passed :func:`accept_inventory`: only the entries that passed."""

    message: common_pb2.Inventory
    #: Why entries were left out, at most :data:`MAX_REASONS_LOGGED` (values cut short).
    reasons: tuple[str, ...] = ()
    #: How many entries (VMs, networks, storage classifications) were left out.
    left_out: int = 0


def _short(value: str, limit: int, what: str) -> str:
    if len(value) > limit or not value.isprintable():
        raise InvalidArgument(f"{what} {shown(value)!r} is not a short printable word")
    return value


def _check_vm(vm: common_pb2.VirtualMachine) -> None:
    paths.check_component(vm.id, "VM id")
    paths.check_display_name(vm.name, "VM name")
    _short(vm.state, bounds.MAX_SHORT, "VM state")
    bounds.check_count(len(vm.disks), bounds.MAX_DISKS_PER_VM, "disks")
    bounds.check_count(len(vm.nics), bounds.MAX_NICS_PER_VM, "network adapters")
    bounds.check_int(vm.memory_mb, "memory size")
    disk_ids: set[str] = set()
    for d in vm.disks:
        paths.check_component(d.id, "disk id")
        if d.id in disk_ids:
            raise InvalidArgument(f"disk id {d.id!r} repeats")
        disk_ids.add(d.id)
        bounds.check_path(d.path, f"the path of disk {d.id}")
        paths.check_component(d.format, f"the format of disk {d.id}")
        _short(d.format, bounds.MAX_SHORT, f"the format of disk {d.id}")
        if d.storage_class:
            paths.check_component(d.storage_class, f"the storage class of disk {d.id}")
        bounds.check_int(d.virtual_size, "disk size")
        bounds.check_int(d.file_size, "disk file size")
    for n in vm.nics:
        if n.name:
            paths.check_display_name(n.name, "network adapter name")
        if n.network:
            paths.check_display_name(n.network, "VM network name")
        if len(n.mac) > bounds.MAX_SHORT or not _MAC.match(n.mac):
            raise InvalidArgument(f"MAC address {shown(n.mac)!r} is not valid")


def _check_network(net: common_pb2.VmNetwork) -> None:
    paths.check_display_name(net.name, "VM network name")
    bounds.check_count(len(net.subnets), bounds.MAX_SUBNETS, "subnets")
    for subnet in net.subnets:
        if not _SUBNET.match(subnet):
            raise InvalidArgument(f"subnet {shown(subnet)!r} is not a CIDR")


def _check_storage(st: common_pb2.StorageClassification) -> None:
    paths.check_component(st.name, "storage classification")
    bounds.check_path(st.path, f"the path of storage classification {st.name}")
    bounds.check_int(st.total_bytes, "storage size")
    bounds.check_int(st.free_bytes, "storage free space")


def accept_inventory(inv: common_pb2.Inventory) -> AcceptedInventory:
    """What the broker stores of ``inv``; raises InvalidArgument when it refuses it whole (the
    module docstring says which rule does what)."""
    size = inv.ByteSize()
    if size > bounds.MAX_INVENTORY_BYTES:
        raise InvalidArgument(
            f"the inventory is {size} bytes; this broker accepts at most "
            f"{bounds.MAX_INVENTORY_BYTES}"
        )
    bounds.check_count(len(inv.vms), bounds.MAX_VMS, "VMs in the inventory")
    bounds.check_count(len(inv.networks), bounds.MAX_NETWORKS, "VM networks in the inventory")
    bounds.check_count(
        len(inv.storage), bounds.MAX_STORAGE, "storage classifications in the inventory"
    )
    if len(inv.digest) > bounds.MAX_ID or not _DIGEST.match(inv.digest):
        raise InvalidArgument("the inventory digest is not a short hex token")
    out = common_pb2.Inventory(digest=inv.digest)
    if inv.HasField("collected_at"):
        out.collected_at.CopyFrom(inv.collected_at)
    reasons: list[str] = []
    left_out = 0

    def leave_out(what: str, exc: InvalidArgument) -> None:
        nonlocal left_out
        left_out += 1
        if len(reasons) < MAX_REASONS_LOGGED:
            reasons.append(f"{what}: {shown(exc.message, 160)}")

    def keep(
        items: Iterable[Any],
        into: Any,
        *,
        check: Callable[[Any], None],
        key: Callable[[Any], str],
        repeats: Callable[[Any], str],
        label: Callable[[Any], str],
    ) -> None:
        """Copy into ``into`` each item that passes ``check`` and whose ``key`` is not taken
        yet; the others are left out with their reason."""
        seen: set[str] = set()
        for item in items:
            try:
                check(item)
                if key(item) in seen:
                    raise InvalidArgument(repeats(item))
            except InvalidArgument as exc:
                leave_out(label(item), exc)
                continue
            seen.add(key(item))
            into.add().CopyFrom(item)

    keep(
        inv.vms,
        out.vms,
        check=_check_vm,
        key=lambda vm: vm.id,
        repeats=lambda vm: f"VM id {vm.id} repeats",
        label=lambda vm: f"VM {shown(vm.name)!r}",
    )
    keep(
        inv.networks,
        out.networks,
        check=_check_network,
        key=lambda net: net.name,
        repeats=lambda net: f"VM network {net.name!r} repeats",
        label=lambda net: f"network {shown(net.name)!r}",
    )
    keep(
        inv.storage,
        out.storage,
        check=_check_storage,
        key=lambda st: st.name,
        repeats=lambda st: f"storage classification {st.name!r} repeats",
        label=lambda st: f"storage classification {shown(st.name)!r}",
    )
    out.DiscardUnknownFields()
    return AcceptedInventory(message=out, reasons=tuple(reasons), left_out=left_out)


def sync_inventory(tx: Tx, server: Server, accepted: AcceptedInventory, now: float) -> None:
    """Make the host's inventory tables what ``accepted`` holds (only checked entries: the
    type says it passed :func:`accept_inventory`)."""
    inv = accepted.message
    vms = [
        InventoryVm(
            server_id=server.id,
            vm_id=vm.id,
            name=vm.name,
            generation=vm.generation,
            cpu_count=vm.cpu_count,
            memory_mb=vm.memory_mb,
            state=vm.state,
            disks_json=json.dumps(
                [
                    {
                        "id": d.id,
                        "path": d.path,
                        "format": d.format,
                        "virtual_size": d.virtual_size,
                        "storage_class": d.storage_class,
                        "file_size": d.file_size,
                    }
                    for d in vm.disks
                ]
            ),
            nics_json=json.dumps(
                [{"name": n.name, "network": n.network, "mac": n.mac} for n in vm.nics]
            ),
            updated_at=now,
        )
        for vm in inv.vms
    ]
    networks = [(n.name, json.dumps(list(n.subnets))) for n in inv.networks]
    storage = [
        HostStorage(
            server_id=server.id,
            name=s.name,
            path=s.path,
            total_bytes=s.total_bytes,
            free_bytes=s.free_bytes,
        )
        for s in inv.storage
    ]
    tx.replace_inventory(server.id, vms, networks, storage)


def join_declared_cloud(tx: Tx, server: Server, cloud: str, now: float) -> None:
    """A host that declares its cloud joins it unless an operator already placed it."""
    if not cloud or tx.cloud_of(server.id) is not None:
        return
    existing = tx.get_cloud(cloud)
    if existing is None:
        tx.insert_cloud(
            Cloud(name=cloud, site=server.site, description="declared by its hosts", created_at=now)
        )
    elif existing.site != server.site:
        log.warning(
            "host declares a cloud of another site; not joined",
            extra={"fields": {"server": server.name, "cloud": cloud, "cloud_site": existing.site}},
        )
        return
    tx.set_host_cloud(server.id, cloud, now)
    log.info(
        "host joined the cloud it declares",
        extra={"fields": {"server": server.name, "cloud": cloud}},
    )
