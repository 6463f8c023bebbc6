"""Where a protected VM runs now, and which host's copy of it is only its replica.

After a failover the same VM (same id, same name) exists on two hosts: the one it runs on and
the one holding its replica (after reverse replication the old primary's VM is kept as the
replica; after a failover without reverse the old primary's VM stays, powered off). Both
hosts report it in their inventory. The admin API shows a VM once, where it runs, and a VM
reference names the copy where it runs; this module says which copy that is.

A relationship names its primary and replica hosts as replication runs; a failover in place
and not reversed yet (failed over, or committed without ``--reverse``) means the VM runs on the
failover's new primary (:func:`hosts_now`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from broker.failover_record import FailoverRecord
from broker.store.base import StoreError
from broker.store.models import InventoryVm, Relationship, RelationshipState, Server
from sitepair.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from broker.store.repository import Tx

#: States in which the VM runs on the failover's new primary, until replication is reversed.
_RUNS_ON_NEW_PRIMARY = (
    RelationshipState.FAILED_OVER_PLANNED,
    RelationshipState.FAILED_OVER_UNPLANNED,
    RelationshipState.COMMITTED,
)


def hosts_now(rel: Relationship) -> tuple[str, str]:
    """The server ids (where the VM runs, where its other copy is) as they are now."""
    if rel.state in _RUNS_ON_NEW_PRIMARY:
        try:
            record = FailoverRecord.decode(rel.failover_json)
        except StoreError:
            record = FailoverRecord()
        if record.new_primary and not record.reversed:
            return record.new_primary, record.old_primary
    return rel.primary_server, rel.replica_server


def latest_relationships(rels: Iterable[Relationship]) -> dict[str, Relationship]:
    """Per VM id, its active relationship, or else the newest disabled one."""
    out: dict[str, Relationship] = {}
    for r in rels:
        seen = out.get(r.vm_id)
        newer = (
            seen is not None
            and seen.disabled_at is not None
            and (r.disabled_at is None or r.created_at > seen.created_at)
        )
        if seen is None or newer:
            out[r.vm_id] = r
    return out


def is_other_copy(vm: InventoryVm, rel: Relationship | None) -> bool:
    """Whether ``vm`` is the copy of a protected (or once protected) VM on the host that is not
    where it runs: its replica, or the old primary's copy after a failover."""
    if rel is None or rel.vm_id != vm.vm_id:
        return False
    running, other = hosts_now(rel)
    return vm.server_id == other and vm.server_id != running


def where_it_runs(vms: Sequence[InventoryVm], rels: dict[str, Relationship]) -> list[InventoryVm]:
    """``vms`` (the inventory rows a reference matched) without the other copies of a VM that
    is also listed where it runs; a copy alone is kept (it is all there is)."""
    kept = [v for v in vms if not is_other_copy(v, rels.get(v.vm_id))]
    ids = {v.vm_id for v in kept}
    return kept + [v for v in vms if v.vm_id not in ids]


def find_vm(tx: Tx, ref: str, server_ref: str = "") -> tuple[InventoryVm, Server]:
    """The inventory VM ``ref`` (id or name) names, on ``server_ref`` when given; a VM that
    exists on two hosts after a failover is the copy where it runs (:func:`where_it_runs`)."""
    vms = tx.find_vms(ref)
    where = ""
    if server_ref:
        host = tx.find_server(server_ref)
        vms = [v for v in vms if v.server_id == host.id]
        where = f" on {host.name}"
    if not vms:
        raise NotFound(
            f"no VM {ref!r} in the inventory{where}",
            hint="see `vms list`; refresh a host with `servers refresh`",
        )
    if len(vms) > 1:
        rels = latest_relationships(tx.list_relationships(include_disabled=True))
        vms = where_it_runs(vms, rels)
    if len(vms) > 1:
        names = tx.server_names(sorted({v.server_id for v in vms}))
        hosts = ", ".join(names.get(v.server_id, v.server_id) for v in vms)
        raise FailedPrecondition(
            f"{ref!r} names VMs on several hosts ({hosts})",
            hint="say which with --server HOST (see `vms list`)",
        )
    vm = vms[0]
    server = tx.get_server(vm.server_id)
    if server is None or server.removed_at is not None:
        raise FailedPrecondition(f"VM {vm.name} is on a host that was removed")
    return vm, server
