"""Operators: who may use the admin API, the home's own operator among them, and revocation.

Operators made by ``operators add`` are rows of the store. The broker home's own operator
(``local-admin``, its profile in ``HOME/admin``, made by ``init``) has no row until it is
revoked; it is listed from its certificate. Revoking an operator records ``removed_at`` and
puts its id on the authorizer's deny-list (:class:`broker.auth.BrokerAuthorizer`), so every
later call with its certificate is refused with PERMISSION_DENIED, although the certificate
has not expired. Revocation is never undone: a revoked operator gets a new profile with a new
id (``operators add``). Brokers sharing one store learn of a revocation made by another one
from the store within :data:`FOLLOW_INTERVAL` (:func:`follow_revocations`), and each loads the
list when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from broker.store.models import Operator
from sitepair import pki
from sitepair.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:  # annotations only: no import order to get wrong
    from broker.auth import BrokerAuthorizer
    from broker.ca import ServerCertificate
    from broker.store.base import Store
    from broker.store.sqlite import Tx
    from sitepair.clock import Clock

log = logging.getLogger("sitepair.broker.operators")

#: The id (and name) of the broker home's own operator.
LOCAL_OPERATOR = "local-admin"
#: How often a broker reads the revoked operators other brokers of a shared store recorded.
FOLLOW_INTERVAL = 5.0


async def local_operator(server_cert: ServerCertificate) -> Operator | None:
    """The home's own operator as a row would hold it, from its certificate."""
    cert = await asyncio.to_thread(server_cert.local_operator_cert)
    if cert is None:
        return None
    return Operator(
        id=LOCAL_OPERATOR,
        name=LOCAL_OPERATOR,
        created_at=cert.not_valid_before_utc.timestamp(),
        cert_serial=format(cert.serial_number, "x"),
        cert_not_after=pki.not_after(cert),
    )


async def list_operators(store: Store, server_cert: ServerCertificate) -> list[Operator]:
    """Every operator, the home's own one first (stored once revoked, listed otherwise)."""
    stored: list[Operator] = await store.reading(lambda tx: tx.list_operators())
    if any(o.id == LOCAL_OPERATOR for o in stored):
        return sorted(stored, key=lambda o: o.id != LOCAL_OPERATOR)
    local = await local_operator(server_cert)
    return ([local] if local is not None else []) + stored


async def revoke(
    ref: str,
    *,
    by: str,
    store: Store,
    server_cert: ServerCertificate,
    authorizer: BrokerAuthorizer,
    clock: Clock,
) -> Operator:
    """Revoke the operator named ``ref`` (a name or an id); refused for the caller itself."""
    everyone = await list_operators(store, server_cert)
    found = [o for o in everyone if ref in (o.id, o.name) and o.removed_at is None]
    if not found:
        if any(ref in (o.id, o.name) for o in everyone):
            raise FailedPrecondition(f"operator {ref} was already revoked")
        raise NotFound(f"no operator {ref!r}", hint="see `operators list`")
    if len(found) > 1:
        ids = ", ".join(o.id for o in found)
        raise FailedPrecondition(
            f"{ref!r} names several operators ({ids})", hint="revoke one by its id"
        )
    op = found[0]
    if op.id == by:
        raise FailedPrecondition(
            "an operator cannot revoke itself (the vault could be left without one)",
            hint="revoke it with another operator's profile",
        )
    now = clock.now()

    def write(tx: Tx) -> Operator:
        return tx.revoke_operator(op, now)

    revoked: Operator = await store.writing(write)
    authorizer.deny_operators({op.id})
    log.warning(
        "operator revoked", extra={"fields": {"operator": op.id, "name": op.name, "by": by}}
    )
    return revoked


async def follow_revocations(
    store: Store, authorizer: BrokerAuthorizer, *, interval: float = FOLLOW_INTERVAL
) -> None:
    """Run until cancelled: put operators revoked through any broker of the store on this
    broker's deny-list."""
    while True:
        try:
            ids: set[str] = await store.reading(lambda tx: tx.revoked_operator_ids())
        except Exception:
            log.exception("reading revoked operators failed; trying again")
        else:
            authorizer.deny_operators(ids)
        await asyncio.sleep(interval)
