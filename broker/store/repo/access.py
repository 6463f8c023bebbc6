"""Who may join and who may administer: registration keys and operators."""

from __future__ import annotations

import dataclasses
from typing import Any

from broker.store.models import Operator, RegistrationKey
from broker.store.repo.core import Queries
from sitepair.errors import FailedPrecondition, NotFound


def _key(row: tuple[Any, ...]) -> RegistrationKey:
    return RegistrationKey(*row)


class AccessQueries(Queries):
    # -- registration keys -----------------------------------------------------------------
    def insert_key(self, key: RegistrationKey) -> None:
        self._db.execute(
            "INSERT INTO registration_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.id,
                key.site,
                key.secret_hash,
                key.created_at,
                key.expires_at,
                key.uses_total,
                key.uses_remaining,
                key.revoked_at,
                key.created_by,
            ),
        )

    def get_key(self, key_id: str) -> RegistrationKey | None:
        row = self._one("SELECT * FROM registration_keys WHERE id = ?", (key_id,))
        return None if row is None else _key(row)

    def key_page(self, *, after: tuple[float, str] | None, limit: int) -> list[RegistrationKey]:
        """Keys oldest first, by (created_at, id), after the key ``after``."""
        sql = "SELECT * FROM registration_keys"
        args: list[Any] = []
        if after is not None:
            sql += " WHERE (created_at, id) > (?, ?)"
            args += list(after)
        args.append(limit)
        return [_key(r) for r in self._all(sql + " ORDER BY created_at, id LIMIT ?", args)]

    def consume_key_use(self, key_id: str) -> bool:
        """Take one use of a key atomically; False if none was left or it was revoked."""
        changed = self._db.execute(
            "UPDATE registration_keys SET uses_remaining = uses_remaining - 1 "
            "WHERE id = ? AND uses_remaining > 0 AND revoked_at IS NULL",
            (key_id,),
        )
        return changed == 1

    def revoke_key(self, key_id: str, now: float) -> RegistrationKey:
        changed = self._db.execute(
            "UPDATE registration_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now, key_id),
        )
        key = self.get_key(key_id)
        if key is None:
            raise NotFound(f"no registration key {key_id!r}")
        if changed == 0:
            raise FailedPrecondition(f"registration key {key_id} was already revoked")
        return key

    # -- sites -----------------------------------------------------------------------------
    def known_sites(self) -> list[str]:
        """The sites a registration key, a server (a removed one too) or a cloud names."""
        rows = self._all(
            "SELECT site FROM registration_keys UNION SELECT site FROM servers "
            "UNION SELECT site FROM clouds ORDER BY 1"
        )
        return [str(r[0]) for r in rows]

    # -- operators -------------------------------------------------------------------------
    def insert_operator(self, op: Operator) -> None:
        self._db.execute(
            "INSERT INTO operators VALUES (?, ?, ?, ?, ?, ?)",
            (op.id, op.name, op.created_at, op.cert_serial, op.cert_not_after, op.removed_at),
        )

    def list_operators(self) -> list[Operator]:
        return [Operator(*r) for r in self._all("SELECT * FROM operators ORDER BY created_at")]

    def revoke_operator(self, op: Operator, now: float) -> Operator:
        """Mark ``op`` revoked (recorded first if the store has no row for it: the home's local
        operator); returns it as stored."""
        changed = self._db.execute(
            "UPDATE operators SET removed_at = ? WHERE id = ? AND removed_at IS NULL", (now, op.id)
        )
        if changed == 0:
            row = self._one("SELECT * FROM operators WHERE id = ?", (op.id,))
            if row is not None:
                raise FailedPrecondition(f"operator {op.name} ({op.id}) was already revoked")
            self.insert_operator(dataclasses.replace(op, removed_at=now))
        return dataclasses.replace(op, removed_at=now)

    def revoked_operator_ids(self) -> set[str]:
        rows = self._all("SELECT id FROM operators WHERE removed_at IS NOT NULL")
        return {str(r[0]) for r in rows}
