"""A throwaway PostgreSQL server for the store tests: ``initdb`` + ``pg_ctl`` in a temp folder.

The server itself is :class:`tests.support.postgres.PostgresCluster`. It listens on a free
loopback port with password (SCRAM) authentication over TCP, so the tests exercise the broker's
real way in: a DSN without a password plus ``SITEPAIR_DB_PASSWORD``.

One server serves the whole test session; every test gets a fresh database of its own
(``pg_dsn``). When the binaries are missing the tests are skipped with the reason.
"""

from __future__ import annotations

import atexit
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.postgres import PASSWORD, PostgresCluster, bin_dir, unavailable_reason

__all__ = ["PASSWORD", "PostgresCluster", "pg_cluster", "pg_dsn", "wait_for"]

_cluster: PostgresCluster | None = None
_failure: str = ""


def shared_cluster() -> PostgresCluster:
    """The session's server, started on first use; skips the test when it cannot run here."""
    global _cluster, _failure  # noqa: PLW0603 - one server per test process, made lazily
    if _failure:
        pytest.skip(_failure)
    if _cluster is None:
        why = unavailable_reason()
        if why:
            _failure = why
            pytest.skip(_failure)
        binaries = bin_dir()
        assert binaries is not None
        cluster = PostgresCluster(binaries)
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError) as exc:
            cluster.stop()
            _failure = f"cannot start a throwaway PostgreSQL server: {exc}"
            pytest.skip(_failure)
        _cluster = cluster
        # Normally the session fixture stops it; this covers a run that ends some other way.
        atexit.register(stop_shared_cluster)
    return _cluster


def stop_shared_cluster() -> None:
    global _cluster  # noqa: PLW0603
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """The throwaway server, for the whole session; removed at the end."""
    cluster = shared_cluster()
    try:
        yield cluster
    finally:
        stop_shared_cluster()


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database for this test; the password travels as the broker expects it."""
    monkeypatch.setenv("SITEPAIR_DB_PASSWORD", PASSWORD)
    return pg_cluster.create_database()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
