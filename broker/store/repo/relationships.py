"""Relationships: one protected VM each, its two hosts, its state, epoch and status documents.

:meth:`RelationshipQueries.update_relationship` changes the columns it is given, each typed by
:class:`RelationshipChanges`, and stamps ``updated_at``.
"""

from __future__ import annotations

import enum
from typing import Any, TypedDict, Unpack

from broker import bounds
from broker.store.models import Relationship, RelationshipState
from broker.store.repo.core import Queries
from broker.store.session import Conflict
from sitepair.errors import AlreadyExists, FailedPrecondition, NotFound

_REL_COLS = (
    "id, vm_id, vm_name, primary_cloud, recovery_cloud, primary_server, replica_server, state, "
    "epoch, policy_json, replica_folder, replica_vm_json, primary_status_json, "
    "replica_status_json, health, health_reasons_json, paused, created_at, updated_at, "
    "disabled_at, failover_json, verify_json"
)


class RelationshipChanges(TypedDict, total=False):
    """The columns of a relationship :meth:`~RelationshipQueries.update_relationship` may change
    (every one but the id and the two timestamps), with their types: the fields of
    :class:`~broker.store.models.Relationship` of the same names."""

    vm_id: str
    vm_name: str
    primary_cloud: str
    recovery_cloud: str
    primary_server: str
    replica_server: str
    state: RelationshipState
    epoch: int
    policy_json: str
    replica_folder: str
    replica_vm_json: str
    primary_status_json: str
    replica_status_json: str
    health: str
    health_reasons_json: str
    paused: bool
    disabled_at: float | None
    failover_json: str
    verify_json: str


#: Checked at run time too: a caller unpacking an untyped dict gets no help from mypy.
_CHANGEABLE = frozenset(_REL_COLS.replace(" ", "").split(",")) - {
    "id",
    "created_at",
    "updated_at",
}


def _relationship(row: tuple[Any, ...]) -> Relationship:
    values = list(row)
    values[7] = RelationshipState(values[7])
    values[16] = bool(values[16])
    return Relationship(*values)


class RelationshipQueries(Queries):
    def insert_relationship(self, r: Relationship) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    f"INSERT INTO relationships ({_REL_COLS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.id,
                        r.vm_id,
                        r.vm_name,
                        r.primary_cloud,
                        r.recovery_cloud,
                        r.primary_server,
                        r.replica_server,
                        r.state.value,
                        r.epoch,
                        r.policy_json,
                        r.replica_folder,
                        r.replica_vm_json,
                        r.primary_status_json,
                        r.replica_status_json,
                        r.health,
                        r.health_reasons_json,
                        int(r.paused),
                        r.created_at,
                        r.updated_at,
                        r.disabled_at,
                        r.failover_json,
                        r.verify_json,
                    ),
                )
        except Conflict as exc:
            raise AlreadyExists(f"VM {r.vm_name} is already protected") from exc

    def get_relationship(self, rel_id: str) -> Relationship | None:
        row = self._one(f"SELECT {_REL_COLS} FROM relationships WHERE id = ?", (rel_id,))
        return None if row is None else _relationship(row)

    def find_relationship(self, ref: str) -> Relationship:
        """By id, or the active relationship of a VM (id or name)."""
        r = self.get_relationship(ref)
        if r is not None:
            return r
        rows = self._all(
            f"SELECT {_REL_COLS} FROM relationships WHERE (vm_id = ? OR vm_name = ?) "
            "AND disabled_at IS NULL",
            (ref, ref),
        )
        if not rows:
            raise NotFound(f"no protected VM or relationship {ref!r}", hint="see `vms list`")
        if len(rows) > 1:
            raise FailedPrecondition(
                f"{ref!r} names several protected VMs; use the relationship id"
            )
        return _relationship(rows[0])

    def list_relationships(self, *, include_disabled: bool = False) -> list[Relationship]:
        sql = f"SELECT {_REL_COLS} FROM relationships"
        if not include_disabled:
            sql += " WHERE disabled_at IS NULL"
        return [_relationship(r) for r in self._all(sql + " ORDER BY vm_name, id")]

    def relationship_page(
        self, *, include_disabled: bool = False, after: tuple[str, str] | None, limit: int
    ) -> list[Relationship]:
        """Relationships by (vm_name, id) after ``after``; one whose VM name is over
        :data:`~broker.bounds.MAX_STORED_KEY` is not listed (GetProtected by id still shows it)."""
        sql = f"SELECT {_REL_COLS} FROM relationships WHERE length(vm_name) <= ?"
        args: list[Any] = [bounds.MAX_STORED_KEY]
        if not include_disabled:
            sql += " AND disabled_at IS NULL"
        if after is not None:
            sql += " AND (vm_name, id) > (?, ?)"
            args += list(after)
        args.append(limit)
        return [_relationship(r) for r in self._all(sql + " ORDER BY vm_name, id LIMIT ?", args)]

    def update_relationship(
        self, rel_id: str, now: float, **changes: Unpack[RelationshipChanges]
    ) -> None:
        """Set the columns named in ``changes`` and ``updated_at = now``."""
        sets = []
        args: list[Any] = []
        for key, value in changes.items():
            if key not in _CHANGEABLE:
                raise ValueError(f"not a relationship column: {key}")
            sets.append(f"{key} = ?")
            if isinstance(value, enum.Enum):
                args.append(value.value)
            elif isinstance(value, bool):
                args.append(int(value))
            else:
                args.append(value)
        sets.append("updated_at = ?")
        args += [now, rel_id]
        self._db.execute(f"UPDATE relationships SET {', '.join(sets)} WHERE id = ?", args)

    def relationships_of_server(self, server_id: str) -> list[Relationship]:
        rows = self._all(
            f"SELECT {_REL_COLS} FROM relationships WHERE disabled_at IS NULL "
            "AND (primary_server = ? OR replica_server = ?)",
            (server_id, server_id),
        )
        return [_relationship(r) for r in rows]
