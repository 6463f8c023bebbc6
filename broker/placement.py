"""Placement: which host of the recovery cloud holds a VM's replica, and in which folder.

A replica goes to a host of the pair's recovery cloud with the storage classification that the
VM's disks' storage is mapped to (or, with no mapping, the volume with the most room), room for
the disks plus a margin, and memory for the replica VM; among those, the host with the fewest
replicas, then the most free space. The folder is made from the VM's name and the relationship
id, proved to lie directly inside the storage path (:func:`replica_folder`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from broker.documents import ProtectedVm, decode_facts, decode_metrics
from broker.orchestration import StepFailed
from broker.store.models import Relationship, Server
from broker.store.sqlite import Tx
from sitepair import paths
from sitepair.errors import InvalidArgument

#: Space kept free on a replica volume beyond the disks' allocated size.
PLACEMENT_MARGIN = 1 << 30


@dataclasses.dataclass(frozen=True)
class Placement:
    server: Server
    folder: str
    reason: str


def replica_folder(storage_path: str, vm_name: str, rel_id: str) -> str:
    """``<storage path>/<slug of the VM name>-<relationship id>`` on the replica host.

    The VM name comes from the primary host's inventory, so it never becomes a path as it is:
    :func:`sitepair.paths.slug` makes one safe component of it, the relationship id (ours) makes
    it unique, and the result is proved to lie directly inside the storage path. The storage
    path is the replica host's own (POSIX, or Windows with a drive letter); it must be absolute.
    """
    name = paths.check_component(f"{paths.slug(vm_name)}-{rel_id}", "replica folder name")
    windows = "\\" in storage_path or PureWindowsPath(storage_path).drive != ""
    if windows:
        root = PureWindowsPath(storage_path)
        folder = root / name
        if not root.is_absolute() or ".." in root.parts or folder.parent != root:
            raise InvalidArgument(
                f"storage path {storage_path[:200]!r} is not an absolute folder",
                hint="the replica host must report its storage classifications' full paths",
            )
        return str(folder)
    if not PurePosixPath(storage_path).is_absolute():
        raise InvalidArgument(
            f"storage path {storage_path[:200]!r} is not an absolute folder",
            hint="the replica host must report its storage classifications' full paths",
        )
    root_path = Path(os.path.normpath(storage_path))
    folder_path = paths.check_inside(root_path, root_path / name, "replica folder")
    if folder_path.name != name:
        raise InvalidArgument(f"replica folder {name} would not lie in {storage_path[:200]!r}")
    return str(root_path / name)


def place(tx: Tx, rel: Relationship) -> Placement:
    """Choose the replica host: mapped storage with room, memory headroom, fewest replicas."""
    replica_vm = ProtectedVm.decode(rel.replica_vm_json)
    disks = replica_vm.disks
    need = sum(d.file_size or d.virtual_size for d in disks) + PLACEMENT_MARGIN
    storage_map = {m.source: m.target for m in tx.list_mappings("storage")}
    classes = {d.storage_class for d in disks}
    target_class = ""
    for c in classes:
        if c and c in storage_map:
            target_class = storage_map[c]
    candidates = []
    refusals = []
    for server_id in tx.cloud_hosts(rel.recovery_cloud):
        server = tx.get_server(server_id)
        if server is None or server.removed_at is not None:
            continue
        metrics = decode_metrics(server.metrics_json)
        facts = decode_facts(server.facts_json)
        if target_class:
            match = [s for s in tx.host_storage(server_id) if s.name == target_class]
            if not match:
                refusals.append(f"{server.name} has no storage classification {target_class}")
                continue
            free = match[0].free_bytes
            if not match[0].total_bytes:
                refusals.append(
                    f"host {server.name} reports no storage at {match[0].path} (the folder is "
                    "missing or unreadable there)"
                )
                continue
            try:
                folder = replica_folder(match[0].path, rel.vm_name, rel.id)
            except InvalidArgument as exc:
                refusals.append(f"{server.name}: {exc.message}")
                continue
        else:
            if not metrics.volumes:
                refusals.append(
                    f"host {server.name} reports no storage (its VM folder and storage "
                    "folders are missing or unreadable there)"
                )
                continue
            free = max((v.free_bytes for v in metrics.volumes), default=0)
            folder = ""
        if free < need:
            refusals.append(
                f"{server.name} has {free >> 20} MiB free, the disks need {need >> 20} MiB"
            )
            continue
        memory = facts.memory_total_bytes
        committed = sum(
            ProtectedVm.decode(r.replica_vm_json).memory_mb << 20
            for r in tx.relationships_of_server(server_id)
            if r.replica_server == server_id
        )
        if memory and committed + (replica_vm.memory_mb << 20) > memory:
            refusals.append(
                f"{server.name} lacks memory for another {replica_vm.memory_mb} MiB replica VM"
            )
            continue
        replicas = sum(
            1 for r in tx.relationships_of_server(server_id) if r.replica_server == server_id
        )
        candidates.append((replicas, -free, server.name, server, folder))
    if not candidates:
        detail = "; ".join(refusals) if refusals else f"cloud {rel.recovery_cloud} has no hosts"
        raise StepFailed(f"no host in {rel.recovery_cloud} can hold the replica: {detail}")
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    replicas, neg_free, _, server, folder = candidates[0]
    where = f"storage {target_class}" if target_class else "the host's default replica location"
    return Placement(
        server, folder, f"{replicas} replica(s) there, {(-neg_free) >> 30} GiB free in {where}"
    )
