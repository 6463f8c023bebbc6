"""The WAN proxy on loopback: shaping, faults on demand, and that TLS catches what it breaks.

Timing assertions are lower bounds only (a delay can make things slower, never faster), so a
loaded machine cannot make them fail.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time

import pytest

from tests.harness.network.echo import EchoServer, exchange, roundtrip_time, send_all, tls_client
from tests.harness.network.proxy import FaultProxy
from tests.harness.network.wan import LAN, WanProfile


def connect(proxy: FaultProxy, route: int = 0) -> socket.socket:
    sock = socket.create_connection(proxy.routes[route].listen, timeout=20)
    sock.settimeout(20)
    return sock


def test_forwards_both_ways_and_counts_bytes(echo: EchoServer) -> None:
    payload = random.Random(1).randbytes(1 << 20)
    with FaultProxy(echo.target) as proxy, connect(proxy) as sock:
        got, error = exchange(sock, payload, chunk=256 * 1024)
        assert error is None and got == payload
        assert proxy.stats.connections == 1
        assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
        assert proxy.stats.faults_injected == 0


def test_delay_applies_in_each_direction_and_changes_on_open_connections(
    echo: EchoServer,
) -> None:
    with FaultProxy(echo.target) as proxy, connect(proxy) as sock:
        roundtrip_time(sock)  # connected and flowing before shaping starts
        proxy.apply(LAN.replace(name="slow", delay_ms=150))
        assert roundtrip_time(sock) >= 0.3  # 150 ms out + 150 ms back, on the open connection
        proxy.delay = 0.05  # the old attribute still works, overriding the profile's delay
        assert roundtrip_time(sock) >= 0.1


def test_jitter_bursts_and_stalls_keep_the_stream_whole_and_in_order(echo: EchoServer) -> None:
    rough = WanProfile(
        name="rough",
        delay_ms=5,
        jitter_ms=5,
        stall_probability=0.002,
        stall_rtt_factor=3,
        burst_probability=0.01,
        burst_hold_ms=10,
    )
    payload = random.Random(2).randbytes(2 << 20)
    with FaultProxy(echo.target, profile=rough, seed=7) as proxy, connect(proxy) as sock:
        got, error = exchange(sock, payload, chunk=128 * 1024)
        assert error is None and got == payload
        assert proxy.stats.stalls + proxy.stats.bursts > 0


def test_a_stall_holds_the_stream_for_its_length(echo: EchoServer) -> None:
    always = WanProfile(name="stall", delay_ms=20, stall_probability=1.0, stall_rtt_factor=3)
    with FaultProxy(echo.target, profile=always) as proxy, connect(proxy) as sock:
        # each way: 20 ms delay + a 3 x 40 ms = 120 ms stall
        assert roundtrip_time(sock) >= 2 * (0.020 + 0.120)
        assert proxy.stats.stalls == 2


def test_rate_limit_is_shared_by_connections_in_one_direction(sink: EchoServer) -> None:
    rate = 1_000_000  # bytes per second
    each = 512 * 1024
    with FaultProxy(sink.target) as proxy:
        proxy.rate = rate
        socks = [connect(proxy), connect(proxy)]
        start = time.monotonic()
        senders = [threading.Thread(target=send_all, args=(s, each)) for s in socks]
        for t in senders:
            t.start()
        sink.wait_received(2 * each)
        elapsed = time.monotonic() - start
        for t in senders:
            t.join()
        for s in socks:
            s.close()
    # one link, one bucket: 1 MiB at 1 MB/s, less the 64 KiB burst allowance
    assert elapsed >= (2 * each - 64 * 1024) / rate * 0.95


def test_partition_resets_open_connections_and_refuses_new_ones_until_healed(
    echo: EchoServer,
) -> None:
    with FaultProxy(echo.target) as proxy:
        sock = connect(proxy)
        roundtrip_time(sock)
        proxy.partition()
        assert proxy.partitioned
        got, error = exchange(sock, b"after")
        assert got == b"" and (error is None or isinstance(error, ConnectionError))
        sock.close()
        with connect(proxy) as refused:
            got, error = exchange(refused, b"hello")
            assert got == b""
        assert proxy.stats.dropped == 1
        assert proxy.stats.refused >= 1
        proxy.heal()
        with connect(proxy) as again:
            roundtrip_time(again)
        assert proxy.stats.partitions == 1


def test_blackhole_partition_freezes_connections_which_resume_after_heal(
    echo: EchoServer,
) -> None:
    with FaultProxy(echo.target) as proxy, connect(proxy) as sock:
        roundtrip_time(sock)
        proxy.partition(mode="blackhole")
        sock.sendall(b"held")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)  # nothing crosses, nothing is closed
        proxy.heal()
        sock.settimeout(20)
        assert sock.recv(10) == b"held"
        assert proxy.stats.dropped == 0


@pytest.mark.parametrize("direction", ["up", "down"])
def test_corrupted_byte_is_caught_by_tls_and_never_delivered(
    tls_echo: EchoServer, tls: tuple[ssl.SSLContext, ssl.SSLContext], direction: str
) -> None:
    payload = random.Random(3).randbytes(256 * 1024)
    with FaultProxy(tls_echo.target) as proxy:
        proxy.corrupt_next(100_000, direction)  # type: ignore[arg-type]
        with tls_client(connect(proxy), tls[1]) as sock:
            got, error = exchange(sock, payload)
        assert proxy.stats.corrupted == 1
        assert len(got) < len(payload)  # the exchange broke off ...
        assert got == payload[: len(got)]  # ... and nothing corrupted was ever handed over
        if direction == "up":  # the server's TLS rejected the record
            assert any(isinstance(e, ssl.SSLError) for e in tls_echo.wait_errors())
        else:  # the client's TLS rejected the record
            assert isinstance(error, ssl.SSLError)
        with tls_client(connect(proxy), tls[1]) as clean:  # one fault, taken once
            assert exchange(clean, payload) == (payload, None)


def test_cut_stream_is_caught_by_tls(
    tls_echo: EchoServer, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    payload = random.Random(4).randbytes(256 * 1024)
    with FaultProxy(tls_echo.target) as proxy:
        proxy.cut_next(60_000)
        with tls_client(connect(proxy), tls[1]) as sock:
            got, error = exchange(sock, payload)
        assert proxy.stats.cut == 1
        assert proxy.stats.bytes_up == 60_000
        assert len(got) < 60_000 and got == payload[: len(got)]
        # both ends see the stream end without TLS close_notify: never mistaken for a clean end
        assert isinstance(error, (ssl.SSLError, ConnectionError))
        assert any(isinstance(e, (ssl.SSLError, ConnectionError)) for e in tls_echo.wait_errors())


def test_a_fault_armed_on_an_open_connection_hits_its_next_bytes(echo: EchoServer) -> None:
    """Replication keeps its connections across calls: a fault armed while one is open takes
    the next bytes that cross the link in its direction, counted from there."""
    first = random.Random(5).randbytes(4096)
    second = random.Random(6).randbytes(4096)
    with FaultProxy(echo.target) as proxy, connect(proxy) as sock:
        assert exchange(sock, first) == (first, None)  # open, and clean
        proxy.corrupt_next(100)
        got, error = exchange(sock, second)
        assert error is None and proxy.stats.corrupted == 1 and proxy.stats.connections == 1
        expected = bytearray(second)
        expected[100] ^= 0xFF
        assert got == bytes(expected)  # byte 100 of what crossed after arming, once
        assert exchange(sock, first) == (first, None)


def test_reset_stand_in_resets_the_connection(echo: EchoServer) -> None:
    breaking = WanProfile(name="breaking", reset_per_mib=1.0)
    with FaultProxy(echo.target, profile=breaking) as proxy, connect(proxy) as sock:
        got, error = exchange(sock, b"\0" * (1 << 20), chunk=1 << 20)
        assert len(got) < 1 << 20
        assert error is None or isinstance(error, ConnectionError)
        assert proxy.stats.resets == 1


def test_reset_all_on_demand(echo: EchoServer) -> None:
    with FaultProxy(echo.target) as proxy:
        socks = [connect(proxy) for _ in range(3)]
        for s in socks:
            roundtrip_time(s)
        assert proxy.reset_all() == 3
        for s in socks:
            assert exchange(s, b"x")[0] == b""
            s.close()
        with connect(proxy) as fresh:  # the link itself stays up
            roundtrip_time(fresh)


def test_routes_share_one_link(echo: EchoServer, sink: EchoServer) -> None:
    with FaultProxy() as proxy:
        proxy.add_route(echo.target, src="a", dst="b")
        proxy.add_route(sink.target, src="b", dst="a")
        with connect(proxy, 0) as s0, connect(proxy, 1) as s1:
            roundtrip_time(s0, b"12345")
            s1.sendall(b"abc")
            sink.wait_received(3)
            proxy.partition()
            assert exchange(s0, b"x")[0] == b""
        assert proxy.stats.connections == 2
        assert proxy.stats.bytes_up == 8 and proxy.stats.bytes_down == 5
        assert proxy.stats.dropped == 2


def armed(proxy: FaultProxy) -> tuple[int | None, int | None]:
    """The faults armed through the old attributes (a function, so mypy does not narrow them)."""
    return proxy.corrupt_at, proxy.cut_after


def test_old_import_path_and_attributes_still_work(echo: EchoServer, sink: EchoServer) -> None:
    from tests.support import proxy as old

    assert old.FaultProxy is FaultProxy
    with old.FaultProxy(echo.target) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}"
        proxy.corrupt_at = 5
        assert armed(proxy) == (5, None)
        with connect(proxy) as sock:
            got, _ = exchange(sock, b"0123456789")
        assert got == b"01234" + bytes([ord("5") ^ 0xFF]) + b"6789"
        assert proxy.stats.corrupted == 1 and armed(proxy) == (None, None)  # consumed
        proxy.rate = 1e6
        assert proxy.rate == 1e6
    proxy.close()  # idempotent
    with old.FaultProxy(sink.target) as proxy:
        proxy.cut_after = 9
        with connect(proxy) as sock:
            sock.sendall(b"0123456789abcdef")
            sink.wait_received(9)
        assert proxy.stats.cut == 1 and armed(proxy) == (None, None)
    assert sink.received == 9
