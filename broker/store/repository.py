"""The repository: every query the broker makes, written once for every backend.

:class:`Tx` runs inside one transaction of a :class:`~broker.store.base.Store` and speaks only
through a :class:`~broker.store.session.Session`, which adapts placeholders, unique-constraint
errors and row counts to the backend. Everything it runs is the common subset of SQLite's and
PostgreSQL's SQL (``ON CONFLICT ... DO UPDATE``, ``coalesce``, ``CASE``, ``LIMIT``), so both
backends return the same dataclasses and raise the same errors for the same situations.

The queries live with their aggregate, one module each under :mod:`broker.store.repo`; ``Tx``
inherits them all, so a transaction reads ``tx.get_server(...)`` whatever the table.

The admin API's lists read through the ``*_page`` queries: keyset paging (``after`` is the sort
key of the last row of the previous page; rows come in a total order, so a walk neither repeats
nor skips a row that exists throughout it), and values an agent controls that are over the
broker's caps (:mod:`broker.bounds`, stored by a broker older than those caps) are left out by
the query itself, so a page never even loads them; the row says which in ``withheld``.
"""

from __future__ import annotations

from broker.store.repo.access import AccessQueries
from broker.store.repo.brokers import BrokerQueries
from broker.store.repo.clouds import CloudQueries
from broker.store.repo.commands import CommandQueries
from broker.store.repo.dashboard import DashboardQueries
from broker.store.repo.drills import DrillQueries
from broker.store.repo.inventory import InventoryQueries
from broker.store.repo.jobs import JobQueries
from broker.store.repo.meta import MetaQueries
from broker.store.repo.plans import PlanQueries
from broker.store.repo.relationships import RelationshipChanges, RelationshipQueries
from broker.store.repo.servers import ServerQueries

__all__ = ["RelationshipChanges", "Tx"]


class Tx(
    MetaQueries,
    BrokerQueries,
    AccessQueries,
    ServerQueries,
    InventoryQueries,
    JobQueries,
    CommandQueries,
    CloudQueries,
    RelationshipQueries,
    PlanQueries,
    DrillQueries,
    DashboardQueries,
):
    """The repository: every query the broker makes, inside one transaction."""
