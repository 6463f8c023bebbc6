"""Checks the admin API makes of what an operator names, with errors naming the allowed values:
a site must be one the vault knows, a job state one jobs have."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.store.models import JobState
from sitepair.errors import InvalidArgument

if TYPE_CHECKING:
    # Only for annotations: imported at run time, broker.store.sqlite would load the store
    # package from the middle (sitepair-broker's first import) and meet a circular import.
    from broker.store.repository import Tx

#: The states a job can be in, as ``jobs list --state`` takes them.
JOB_STATES = tuple(state.value for state in JobState)


def check_site(tx: Tx, site: str) -> str:
    """``site`` if a registration key, a server or a cloud names it; an error naming the known
    sites otherwise (a site comes to be with the first registration key made for it)."""
    known = tx.known_sites()
    if site not in known:
        raise InvalidArgument(
            f"no site {site!r} in this vault; known: {', '.join(known) or 'none yet'}",
            hint="a site comes to be with its first registration key: keys create --site NAME",
        )
    return site


def check_job_state(state: str) -> str:
    """``state`` ("" = any) if jobs can be in it."""
    if state and state not in JOB_STATES:
        raise InvalidArgument(f"unknown job state {state!r}; use one of {', '.join(JOB_STATES)}")
    return state
