"""Commands for agents: stored until delivered, redelivered until their outcome is recorded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.store.models import Command, CommandState
from broker.store.repo.core import Queries

_COMMAND_COLS = (
    "id, server_id, kind, payload, state, created_at, delivered_at, deliveries, completed_at, "
    "result_json, error, job_id, job_step, job_step_name"
)


def _command(row: tuple[Any, ...]) -> Command:
    values = list(row)
    values[4] = CommandState(values[4])
    return Command(*values)


class CommandQueries(Queries):
    def insert_command(self, cmd: Command) -> None:
        self._db.execute(
            f"INSERT INTO commands ({_COMMAND_COLS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cmd.id,
                cmd.server_id,
                cmd.kind,
                cmd.payload,
                cmd.state.value,
                cmd.created_at,
                cmd.delivered_at,
                cmd.deliveries,
                cmd.completed_at,
                cmd.result_json,
                cmd.error,
                cmd.job_id,
                cmd.job_step,
                cmd.job_step_name,
            ),
        )

    def get_command(self, command_id: str) -> Command | None:
        row = self._one(f"SELECT {_COMMAND_COLS} FROM commands WHERE id = ?", (command_id,))
        return None if row is None else _command(row)

    def open_commands(self, server_id: str) -> list[Command]:
        rows = self._all(
            f"SELECT {_COMMAND_COLS} FROM commands WHERE server_id = ? "
            "AND state IN ('pending', 'delivered') ORDER BY created_at, id",
            (server_id,),
        )
        return [_command(r) for r in rows]

    def mark_commands_delivered(self, command_ids: Sequence[str], now: float) -> None:
        self._db.executemany(
            "UPDATE commands SET state = 'delivered', delivered_at = ?, "
            "deliveries = deliveries + 1 WHERE id = ? AND state IN ('pending', 'delivered')",
            [(now, cid) for cid in command_ids],
        )

    def complete_command(
        self,
        command_id: str,
        *,
        server_id: str,
        state: CommandState,
        now: float,
        result_json: str = "",
        error: str = "",
    ) -> Command | None:
        """Record a command's outcome once; None if it is unknown, not this server's, or done."""
        changed = self._db.execute(
            "UPDATE commands SET state = ?, completed_at = ?, result_json = ?, error = ? "
            "WHERE id = ? AND server_id = ? AND state IN ('pending', 'delivered')",
            (state.value, now, result_json, error, command_id, server_id),
        )
        if changed != 1:
            return None
        return self.get_command(command_id)

    def cancel_open_commands(self, server_id: str, now: float, reason: str) -> list[Command]:
        cmds = self.open_commands(server_id)
        self._db.execute(
            "UPDATE commands SET state = 'cancelled', completed_at = ?, error = ? "
            "WHERE server_id = ? AND state IN ('pending', 'delivered')",
            (now, reason, server_id),
        )
        return cmds

    def commands_for_job(self, job_id: str) -> list[Command]:
        rows = self._all(
            f"SELECT {_COMMAND_COLS} FROM commands WHERE job_id = ? ORDER BY created_at, id",
            (job_id,),
        )
        return [_command(r) for r in rows]
