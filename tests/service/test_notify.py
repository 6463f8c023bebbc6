"""The notify protocol against a real datagram socket: paths, abstract addresses, no-op."""

from __future__ import annotations

import os
from pathlib import Path

from sitepair.service.notify import Notifier
from tests.service.notifysock import NotifySocket


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("serving") is False
    assert n.watchdog_interval == 0


def test_abstract_address_receives_ready_with_status() -> None:
    sock = NotifySocket()
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": sock.address})
        assert n.ready("serving vault v1\nsecond line") is True
        msg = sock.wait_for(lambda m: "READY" in m, timeout=5)
        assert msg["READY"] == "1"
        # A newline in a status would start a new field: it is folded into one line.
        assert msg["STATUS"] == "serving vault v1 second line"
        assert msg["MAINPID"] == str(os.getpid())
    finally:
        sock.close()


def test_path_address_and_watchdog_interval(tmp_path: Path) -> None:
    sock = NotifySocket(str(tmp_path / "notify"))
    try:
        env = {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "3000000"}
        n = Notifier.from_env(env)
        assert n.watchdog_interval == 1.5
        n.watchdog()
        n.reloading()
        n.stopping()
        sock.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=5)
        reloading = sock.wait_for(lambda m: m.get("RELOADING") == "1", timeout=5)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        sock.wait_for(lambda m: m.get("STOPPING") == "1", timeout=5)
    finally:
        sock.close()


def test_watchdog_for_another_process_is_not_ours() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(env).watchdog_interval == 0


def test_a_socket_that_is_gone_does_not_stop_the_daemon(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "missing"))
    assert n.ready("serving") is False
    assert n.stopping() is False
