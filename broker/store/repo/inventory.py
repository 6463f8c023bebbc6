"""What the hosts report they have: the last inventory as sent, and the VMs, networks and
storage classifications the broker reads out of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from broker import bounds
from broker.store.models import HostStorage, InventoryVm, StoredInventory
from broker.store.repo.core import Queries


class InventoryQueries(Queries):
    # -- the inventory as received ---------------------------------------------------------
    def put_inventory(self, inv: StoredInventory) -> None:
        self._db.execute(
            "INSERT INTO server_inventory VALUES (?, ?, ?, ?, ?) ON CONFLICT (server_id) DO UPDATE "
            "SET digest = excluded.digest, collected_at = excluded.collected_at, "
            "received_at = excluded.received_at, payload = excluded.payload",
            (inv.server_id, inv.digest, inv.collected_at, inv.received_at, inv.payload),
        )

    def get_inventory(self, server_id: str) -> StoredInventory | None:
        row = self._one("SELECT * FROM server_inventory WHERE server_id = ?", (server_id,))
        return None if row is None else StoredInventory(*row)

    # -- the tables read out of it ---------------------------------------------------------
    def replace_inventory(
        self,
        server_id: str,
        vms: Sequence[InventoryVm],
        networks: Sequence[tuple[str, str]],
        storage: Sequence[HostStorage],
    ) -> None:
        """Make the server's VMs, networks and storage classifications exactly these."""
        self._db.execute("DELETE FROM vms WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    v.server_id,
                    v.vm_id,
                    v.name,
                    v.generation,
                    v.cpu_count,
                    v.memory_mb,
                    v.state,
                    v.disks_json,
                    v.nics_json,
                    v.updated_at,
                )
                for v in vms
            ],
        )
        self._db.execute("DELETE FROM host_networks WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO host_networks VALUES (?, ?, ?)",
            [(server_id, name, subnets) for name, subnets in networks],
        )
        self._db.execute("DELETE FROM host_storage WHERE server_id = ?", (server_id,))
        self._db.executemany(
            "INSERT INTO host_storage VALUES (?, ?, ?, ?, ?)",
            [(s.server_id, s.name, s.path, s.total_bytes, s.free_bytes) for s in storage],
        )

    def list_vms(self, *, server_id: str = "") -> list[InventoryVm]:
        sql = "SELECT * FROM vms"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [InventoryVm(*r) for r in self._all(sql + " ORDER BY name, server_id", args)]

    def vm_page(
        self, *, server_id: str = "", after: tuple[str, str, str] | None, limit: int
    ) -> list[InventoryVm]:
        """VMs by (name, server_id, vm_id) after ``after``; disk and NIC lists over their cap
        are read as ``[]`` and named in ``InventoryVm.withheld``; rows whose name or id is over
        :data:`~broker.bounds.MAX_STORED_KEY` are not listed."""
        disks_over = "length(disks_json) > ?"
        nics_over = "length(nics_json) > ?"
        sql = (
            "SELECT server_id, vm_id, name, generation, cpu_count, memory_mb, state, "
            f"CASE WHEN {disks_over} THEN '[]' ELSE disks_json END, "
            f"CASE WHEN {nics_over} THEN '[]' ELSE nics_json END, updated_at, "
            f"CASE WHEN {disks_over} THEN 1 ELSE 0 END, CASE WHEN {nics_over} THEN 1 ELSE 0 END "
            "FROM vms WHERE length(name) <= ? AND length(vm_id) <= ?"
        )
        cap, key_cap = bounds.MAX_STORED_VM_JSON, bounds.MAX_STORED_KEY
        args: list[Any] = [cap, cap, cap, cap, key_cap, key_cap]
        if server_id:
            sql += " AND server_id = ?"
            args.append(server_id)
        if after is not None:
            sql += " AND (name, server_id, vm_id) > (?, ?, ?)"
            args += list(after)
        args.append(limit)
        out = []
        for row in self._all(sql + " ORDER BY name, server_id, vm_id LIMIT ?", args):
            withheld = tuple(name for name, flag in (("disks", row[-2]), ("nics", row[-1])) if flag)
            out.append(dataclasses.replace(InventoryVm(*row[:-2]), withheld=withheld))
        return out

    def find_vms(self, ref: str) -> list[InventoryVm]:
        rows = self._all(
            "SELECT * FROM vms WHERE vm_id = ? OR name = ? ORDER BY server_id", (ref, ref)
        )
        return [InventoryVm(*r) for r in rows]

    def vm_counts(self, server_ids: Sequence[str]) -> dict[str, int]:
        """How many VMs the inventory tables hold for each of ``server_ids``."""
        if not server_ids:
            return {}
        marks = ", ".join("?" for _ in server_ids)
        rows = self._all(
            f"SELECT server_id, count(*) FROM vms WHERE server_id IN ({marks}) GROUP BY server_id",
            list(server_ids),
        )
        return {r[0]: int(r[1]) for r in rows}

    def host_networks(self, server_id: str = "") -> list[tuple[str, str, str]]:
        sql = "SELECT server_id, name, subnets_json FROM host_networks"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [(r[0], r[1], r[2]) for r in self._all(sql + " ORDER BY name", args)]

    def host_storage(self, server_id: str = "") -> list[HostStorage]:
        sql = "SELECT * FROM host_storage"
        args: list[Any] = []
        if server_id:
            sql += " WHERE server_id = ?"
            args.append(server_id)
        return [HostStorage(*r) for r in self._all(sql + " ORDER BY name", args)]
