"""Two brokers of one vault on a real PostgreSQL store: a dashboard session that one broker
started is accepted by the other, and ending it on one ends it on both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broker.config import StoreConfig
from broker.home import BrokerHome
from broker.web import SESSION_COOKIE
from tests.store_pg import conftest as pg
from tests.support import dashboard as support
from tests.support.brokers import make_home
from tests.support.dashboard import fetch

pg_cluster = pg.pg_cluster
pg_dsn = pg.pg_dsn


def test_a_session_made_by_one_broker_is_accepted_by_another(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_home = make_home(
        tmp_path / "b1", vault="bluevault", store=StoreConfig(backend="postgresql", dsn=pg_dsn)
    )
    # Another broker of the vault is a copy of the home (same CA and ticket key, same store).
    shutil.copytree(first_home.root, tmp_path / "b2", ignore=shutil.ignore_patterns("run"))
    second_home = BrokerHome(tmp_path / "b2")
    first = support.start_dashboard(first_home, monkeypatch)
    try:
        second = support.start_dashboard(second_home, monkeypatch)
        try:
            session = first.sign_in()
            on_second = fetch(f"{second.url}/whoami", second.anonymous(), cookie=session)
            assert on_second.status == 200 and on_second.json()["operator"] == "local-admin"
            # A form rendered by the first broker posts to the second: the CSRF token is the
            # vault's, not one broker's.
            csrf = fetch(f"{first.url}/whoami", first.anonymous(), cookie=session).json()["csrf"]
            assert on_second.json()["csrf"] == csrf
            out = fetch(
                f"{second.url}/logout", second.anonymous(), method="POST", data={"csrf": csrf},
                cookie=session,
            )  # fmt: skip
            assert out.status == 303 and SESSION_COOKIE in out.set_cookies[0]
            assert fetch(f"{first.url}/whoami", first.anonymous(), cookie=session).status == 401
            # A login token is single use across the brokers too.
            token = first.login_token()
            assert fetch(f"{second.url}/login?token={token}", second.anonymous()).status == 303
            assert fetch(f"{first.url}/login?token={token}", first.anonymous()).status == 401
        finally:
            second.stop()
    finally:
        first.stop()
