"""How the shared SQL meets a backend: the dialects, and the session the repository speaks to.

The broker's SQL is written once, in SQLite's spelling with ``?`` placeholders, and a
:class:`Dialect` says how a backend differs:

- placeholders (``?`` for SQLite, ``%s`` for psycopg);
- the column types of the migrations: SQLite's ``REAL``, ``BLOB`` and ``INTEGER`` are
  ``DOUBLE PRECISION``, ``BYTEA`` and ``BIGINT`` on PostgreSQL (PostgreSQL's own ``REAL`` would
  round timestamps to single precision and its ``INTEGER`` is 32 bits), and text compares and
  sorts byte-wise (``COLLATE "C"``) as SQLite's does, so every ``ORDER BY`` lists rows in the
  same order on both;
- how the store's own clock is read (leases are timed by the database, not by broker clocks).

A :class:`Session` is one connection inside one transaction; each backend adapts its driver to
it, and the repository (:mod:`broker.store.repository`) needs nothing else.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import re
from collections.abc import Sequence
from typing import Any


class Conflict(Exception):
    """An insert broke a uniqueness (or other integrity) constraint; the transaction goes on."""


@dataclasses.dataclass(frozen=True)
class Dialect:
    """How one backend spells what the shared SQL needs."""

    name: str
    #: The placeholder the driver wants instead of ``?``.
    placeholder: str
    #: Column types of the migrations: SQLite's name -> this backend's.
    types: tuple[tuple[str, str], ...] = ()
    #: A SQL expression: the database server's clock, in seconds since the epoch.
    now: str = "((julianday('now') - 2440587.5) * 86400.0)"

    def sql(self, text: str) -> str:
        """A shared statement in this dialect (placeholders only; the SQL has no ``?`` else)."""
        if self.placeholder == "?":
            return text
        return text.replace("%", "%%").replace("?", self.placeholder)

    def ddl(self, script: str) -> str:
        """A migration script in this dialect: comments dropped, type names translated."""
        if not self.types:
            return script
        # Migrations keep ``--`` out of string literals, so this only strips comments.
        script = re.sub(r"--[^\n]*", "", script)
        table = dict(self.types)
        pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in table) + r")\b")
        return pattern.sub(lambda m: table[m.group(1)], script)


SQLITE = Dialect(name="sqlite", placeholder="?")

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    types=(
        ("REAL", "DOUBLE PRECISION"),
        ("BLOB", "BYTEA"),
        ("INTEGER", "BIGINT"),
        ("TEXT", 'TEXT COLLATE "C"'),
    ),
    now="extract(epoch FROM clock_timestamp())::double precision",
)


class Session(abc.ABC):
    """One connection inside one transaction, as the repository (``Tx``) uses it."""

    dialect: Dialect

    @abc.abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abc.abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of arguments."""

    @abc.abstractmethod
    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""

    @abc.abstractmethod
    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""

    @abc.abstractmethod
    def guarded(self) -> contextlib.AbstractContextManager[None]:
        """Statements inside may break a constraint: :class:`Conflict` is raised and the
        transaction stays usable, as it does on SQLite (PostgreSQL needs a savepoint for that).
        """
