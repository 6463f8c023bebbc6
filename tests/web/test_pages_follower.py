"""The follower banner, with two real brokers sharing a real PostgreSQL store: the broker that
joined second does not lead, and its pages say so and name the leader; the leader's do not."""

from __future__ import annotations

from pathlib import Path

from tests.store_pg.conftest import pg_cluster, pg_dsn  # noqa: F401 - fixtures
from tests.store_pg.test_brokers import _copy, _init
from tests.support.brokers import BrokerThread
from tests.web.pages_support import PagesClient, local_operator, serve_pages


def test_a_follower_says_so_and_names_the_leader(pg_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    home1 = _init(tmp_path / "b1", pg_dsn)
    home2 = _copy(home1, tmp_path / "b2")
    leader = BrokerThread(home1)
    try:
        follower = BrokerThread(home2)
        try:
            assert not follower.broker.leadership.is_leader  # what the banner must reflect
            for broker, banner in ((follower, True), (leader, False)):
                runner, base = serve_pages(broker, local_operator(broker))
                try:
                    page = PagesClient(base).get("/vms")
                finally:
                    broker.loop.call(runner.cleanup())
                assert page.status == 200
                assert ('id="follower"' in page.body) is banner
                if banner:
                    assert "This broker is a follower" in page.body
                    # The leader's lease row names its control address.
                    assert f"control {leader.control}" in page.body
        finally:
            follower.stop()
    finally:
        leader.stop()
