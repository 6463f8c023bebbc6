"""The notify protocol against a real datagram socket: paths, abstract addresses, no-op."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest

from sitepair.service.notify import Notifier
from sitepair.service.runtime import ServiceRuntime
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


def test_a_stuck_event_loop_stops_the_watchdog_pings() -> None:
    """The pings come from the event loop itself: while the loop is blocked, none arrive."""
    sock = NotifySocket()
    loop = asyncio.new_event_loop()
    blocked, release = threading.Event(), threading.Event()
    runtime = ServiceRuntime(
        stop=lambda: None,
        notifier=Notifier(sock.address, watchdog_usec=100_000),  # a ping every 0.05 s
    )
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(_ready(runtime), loop).result(10)
        sock.wait_for(lambda m: m.get("READY") == "1", timeout=10)
        sock.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=10)

        def stuck() -> None:  # a synchronous call that holds the loop
            blocked.set()
            release.wait(30)

        loop.call_soon_threadsafe(stuck)
        assert blocked.wait(10)
        # Every ping sent before the loop got stuck is in the socket already (sends are
        # synchronous); drain them, then listen while the loop stays blocked.
        sock.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.sock.recv(4096)
        sock.sock.setblocking(True)
        with pytest.raises(TimeoutError):
            sock.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=1.0)
        release.set()
        sock.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=10)  # the loop is back
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(runtime.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        sock.close()


async def _ready(runtime: ServiceRuntime) -> None:
    runtime.ready("serving")
