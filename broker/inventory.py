"""Inventory sync: what hosts report becomes queryable tables (VMs, networks, storage).

Every Inventory message replaces the host's rows in one transaction, so a VM added, removed or
given a new disk on a host shows in the broker within one heartbeat of the agent noticing. A
host that names a cloud in its own configuration joins it (the cloud is created at the host's
site if it does not exist yet); a host already placed in a cloud by an operator stays there.
"""

from __future__ import annotations

import json
import logging

from broker.store.models import Cloud, HostStorage, InventoryVm, Server
from broker.store.sqlite import Tx
from sitepair.v1 import common_pb2

log = logging.getLogger("sitepair.broker.inventory")


def sync_inventory(tx: Tx, server: Server, inv: common_pb2.Inventory, now: float) -> None:
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
