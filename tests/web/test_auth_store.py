"""Dashboard sign-ins in the store, on SQLite and on a real PostgreSQL server: a login token is
used once, sessions expire and end, and only hashes are kept."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import dashboard_logins
from broker.store.base import Store
from broker.store.models import DashboardGrant
from broker.store.sqlite import SqliteStore
from sitepair import pki
from sitepair.clock import ManualClock
from sitepair.errors import InvalidArgument
from tests.store_pg import conftest as pg

# The PostgreSQL fixtures, shared with tests/store_pg (one server for the whole session).
pg_cluster = pg.pg_cluster
pg_dsn = pg.pg_dsn

OPERATOR = pki.Identity(
    vault="v", role=pki.Role.ADMIN, id="op-1", serial=0xABC, not_after=time.time() + 86400
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore.open(tmp_path / "b.db")
    else:
        from broker.store.postgres import PostgresStore

        opened = PostgresStore.open(request.getfixturevalue("pg_dsn"))
    try:
        yield opened
    finally:
        opened.close()


def test_a_token_starts_one_session_for_its_operator(store: Store) -> None:
    clock = ManualClock(start=time.time())

    async def scenario() -> None:
        login = await dashboard_logins.create_login(store, clock, OPERATOR)
        assert login.expires_at == clock.now() + dashboard_logins.LOGIN_LIFETIME
        session = await dashboard_logins.start_session(store, clock, login.token, lifetime=3600)
        assert session is not None
        assert dashboard_logins.identity_of(session.grant) == OPERATOR
        assert session.grant.expires_at == clock.now() + 3600
        again = await dashboard_logins.start_session(store, clock, login.token, lifetime=3600)
        assert again is None
        found = await dashboard_logins.find_session(store, clock, session.secret)
        assert found == session.grant
        assert session.grant.id == dashboard_logins.secret_hash(session.secret)
        await dashboard_logins.end_session(store, session.secret)
        assert await dashboard_logins.find_session(store, clock, session.secret) is None

    asyncio.run(scenario())


def test_tokens_and_sessions_expire_and_are_purged(store: Store) -> None:
    clock = ManualClock(start=time.time())

    async def scenario() -> None:
        late = await dashboard_logins.create_login(store, clock, OPERATOR)
        used = await dashboard_logins.create_login(store, clock, OPERATOR)
        session = await dashboard_logins.start_session(store, clock, used.token, lifetime=120)
        assert session is not None
        clock.advance(dashboard_logins.LOGIN_LIFETIME + 1)
        assert await dashboard_logins.start_session(store, clock, late.token, lifetime=120) is None
        assert await dashboard_logins.find_session(store, clock, session.secret) is not None
        clock.advance(120)
        assert await dashboard_logins.find_session(store, clock, session.secret) is None
        await dashboard_logins.create_login(store, clock, OPERATOR)  # purges the expired ones
        counts = await store.reading(
            lambda tx: (
                tx._one("SELECT count(*) FROM dashboard_logins"),
                tx._one("SELECT count(*) FROM dashboard_sessions"),
            )
        )
        assert counts == ((1,), (0,))

    asyncio.run(scenario())


def test_a_session_never_outlives_the_certificate_that_asked_for_it(store: Store) -> None:
    clock = ManualClock(start=time.time())
    short = dataclasses.replace(OPERATOR, not_after=clock.now() + 600)

    async def scenario() -> None:
        login = await dashboard_logins.create_login(store, clock, short)
        session = await dashboard_logins.start_session(store, clock, login.token, lifetime=8 * 3600)
        assert session is not None and session.grant.expires_at == short.not_after

    asyncio.run(scenario())


def test_a_stored_grant_with_a_role_that_is_not_ours_is_refused() -> None:
    grant = DashboardGrant(
        id="x", operator="op", vault="v", role="root", site="", cert_serial="1",
        cert_not_after=0.0, created_at=0.0, expires_at=0.0,
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="malformed"):
        dashboard_logins.identity_of(grant)
