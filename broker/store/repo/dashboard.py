"""The web dashboard's sign-ins: one-time login tokens and the sessions they become."""

from __future__ import annotations

from typing import Any

from broker.store.models import DashboardGrant
from broker.store.repo.core import Queries

_COLUMNS = "id, operator, vault, role, site, cert_serial, cert_not_after, created_at, expires_at"


def _grant(row: tuple[Any, ...]) -> DashboardGrant:
    return DashboardGrant(
        id=row[0],
        operator=row[1],
        vault=row[2],
        role=row[3],
        site=row[4],
        cert_serial=row[5],
        cert_not_after=float(row[6]),
        created_at=float(row[7]),
        expires_at=float(row[8]),
    )


def _values(g: DashboardGrant) -> tuple[Any, ...]:
    return (
        g.id,
        g.operator,
        g.vault,
        g.role,
        g.site,
        g.cert_serial,
        g.cert_not_after,
        g.created_at,
        g.expires_at,
    )


class DashboardQueries(Queries):
    def insert_dashboard_login(self, login: DashboardGrant) -> None:
        self._db.execute(
            f"INSERT INTO dashboard_logins ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _values(login),
        )

    def use_dashboard_login(self, login_id: str, now: float) -> DashboardGrant | None:
        """Mark the login token used, atomically; None if it is unknown, used or expired
        (a token signs in once, whatever broker of the store it reaches)."""
        changed = self._db.execute(
            "UPDATE dashboard_logins SET used_at = ? "
            "WHERE id = ? AND used_at IS NULL AND expires_at > ?",
            (now, login_id, now),
        )
        if changed != 1:
            return None
        row = self._one(f"SELECT {_COLUMNS} FROM dashboard_logins WHERE id = ?", (login_id,))
        return None if row is None else _grant(row)

    def insert_dashboard_session(self, session: DashboardGrant) -> None:
        self._db.execute(
            f"INSERT INTO dashboard_sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _values(session),
        )

    def get_dashboard_session(self, session_id: str, now: float) -> DashboardGrant | None:
        """The session, unless it is unknown, ended or expired."""
        row = self._one(
            f"SELECT {_COLUMNS} FROM dashboard_sessions WHERE id = ? AND expires_at > ?",
            (session_id, now),
        )
        return None if row is None else _grant(row)

    def delete_dashboard_session(self, session_id: str) -> bool:
        return self._db.execute("DELETE FROM dashboard_sessions WHERE id = ?", (session_id,)) == 1

    def purge_dashboard_grants(self, now: float) -> None:
        """Forget expired login tokens (used or not) and sessions."""
        self._db.execute("DELETE FROM dashboard_logins WHERE expires_at <= ?", (now,))
        self._db.execute("DELETE FROM dashboard_sessions WHERE expires_at <= ?", (now,))
