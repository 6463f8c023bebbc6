"""Namespace mode: the topology, reachability through the router, the proxy in the router, tbf,
partitions, and cleanup after a crashed run. Needs root and iproute2; skips with the reason
otherwise. Timing assertions are lower bounds only.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.network import netns as netns_mod
from tests.harness.network.echo import EchoServer, exchange, roundtrip_time, send_all, tls_client
from tests.harness.network.netns import Topology, cleanup_stale, entered, list_namespaces
from tests.harness.network.network import Network, default_run_id
from tests.harness.network.wan import LAN, WanProfile

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_netns")]

REPO = Path(__file__).resolve().parents[3]


def host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def ours(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix)]


def socket_in(ns: str) -> socket.socket:
    with entered(ns):
        sock = socket.socket()
    sock.settimeout(10)
    return sock


def server_in(ns: str, host: str, tls: ssl.SSLContext | None = None, **kw: bool) -> EchoServer:
    sock = socket_in(ns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return EchoServer(sock, tls, **kw)


def dial(ns: str, address: tuple[str, int], timeout: float = 10) -> socket.socket:
    sock = socket_in(ns)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.settimeout(10)
    return sock


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology.create(default_run_id()) as t:
        yield t


def test_topology_comes_up_and_leaves_nothing_behind() -> None:
    links_before = host_links()
    run_id = default_run_id()
    with Topology.create(run_id) as t:
        assert sorted(ours(t.prefix)) == sorted(
            f"sp-{run_id}-{r}" for r in ("a", "b", "broker", "router")
        )
        for role in ("a", "b", "broker"):
            ns = t.ns(role)
            assert ns.address.startswith(str(t.block.network_address)[:-3])
            addr = t.run(role, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"{ns.address}/24" in addr
            routes = t.run(role, ["ip", "-4", "route"]).stdout
            assert f"{t.block} via {ns.gateway} dev eth0" in routes
            assert "default" not in routes  # nowhere to go but the run's own namespaces
            assert t.run(role, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
            assert "state UNKNOWN" in t.run(role, ["ip", "link", "show", "lo"]).stdout
        assert t.run("router", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
        router_links = t.run("router", ["ip", "-o", "link"]).stdout
        assert all(f"r-{r}@" in router_links for r in ("a", "b", "broker"))
        assert host_links() == links_before  # no veth end ever lived in the host's namespace
        owner = netns_mod.OWNER_DIR / f"{t.prefix}owner.json"
        assert owner.exists()
    assert ours(f"sp-{run_id}-") == []
    assert host_links() == links_before
    assert not owner.exists()


def test_teardown_also_after_an_exception() -> None:
    run_id = default_run_id()
    with pytest.raises(RuntimeError, match="boom"), Topology.create(run_id) as t:
        proc = t.popen("a", ["sleep", "300"])
        raise RuntimeError("boom")
    assert ours(f"sp-{run_id}-") == []
    assert proc.poll() is not None  # killed, not orphaned in a deleted namespace


def test_sites_reach_each_other_and_the_broker_only_through_the_router(topo: Topology) -> None:
    servers = {role: server_in(topo.ns(role).name, topo.address(role)) for role in ("b", "broker")}
    try:
        for role, server in servers.items():
            with dial(topo.ns("a").name, server.address) as sock:
                roundtrip_time(sock, b"hello " + role.encode())
                assert sock.getsockname()[0] == topo.address("a")  # routed, not translated
        trace = topo.run("a", ["ip", "route", "get", topo.address("b")]).stdout
        assert f"via {topo.ns('a').gateway}" in trace
        with pytest.raises(OSError) as err:
            dial(topo.ns("a").name, ("192.0.2.1", 80))  # outside the run: no route at all
        assert err.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
    finally:
        for server in servers.values():
            server.close()


def test_processes_run_inside_their_namespace(topo: Topology) -> None:
    out = topo.run("b", [sys.executable, "-c", "import socket; print(socket.gethostname())"])
    assert out.returncode == 0
    proc = topo.popen(
        "broker",
        ["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
        text=True,
        stdout=subprocess.PIPE,
    )
    stdout, _ = proc.communicate(timeout=10)
    assert topo.address("broker") in stdout
    with pytest.raises(netns_mod.NetnsError, match="exit"):
        topo.run("a", ["false"])


def test_stale_namespaces_of_a_crashed_run_are_removed() -> None:
    run_id = "crash" + format(os.getpid(), "x")
    prefix = f"sp-{run_id}-"
    script = (
        "import sys, time\n"
        "from tests.harness.network.netns import Topology\n"
        f"with Topology.create({run_id!r}) as t:\n"
        "    leftover = t.popen('a', ['sleep', '300'])\n"
        "    print(leftover.pid, flush=True)\n"
        "    time.sleep(300)\n"
    )
    crashed = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert crashed.stdout is not None
        leftover = int(crashed.stdout.readline())
        crashed.kill()  # SIGKILL: no teardown runs
        crashed.wait(10)
        assert len(ours(prefix)) == 4
        assert leftover in netns_mod.namespace_pids(prefix + "a")
        removed = cleanup_stale(prefix)
        assert sorted(removed) == sorted(prefix + r for r in ("a", "b", "broker", "router"))
        assert ours(prefix) == []
        assert not alive(leftover)  # the orphaned "agent" went with them
    finally:
        if crashed.poll() is None:
            crashed.kill()
        cleanup_stale(prefix)


def test_cleanup_keeps_live_runs_and_removes_unowned_leftovers(topo: Topology) -> None:
    stray = f"sp-stray{os.getpid():x}-a"
    subprocess.run(["ip", "netns", "add", stray], check=True)
    try:
        removed = cleanup_stale("sp-")
        assert stray in removed
        assert sorted(ours(topo.prefix)) == sorted(ns.name for ns in topo.namespaces.values())
    finally:
        subprocess.run(["ip", "netns", "del", stray], capture_output=True)
    with pytest.raises(ValueError, match="refusing"):
        cleanup_stale("")


def test_wan_proxy_in_the_router_carries_tls_and_applies_delay(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    with Network.create("netns", profile=LAN) as net:
        topo = net.topology
        assert topo is not None
        server = server_in(topo.ns("b").name, net.agent_host("b"), tls[0])
        try:
            host, port = net.link("a", "b", *server.address)
            assert host == topo.router.address  # site a dials the router, not site b
            payload = random.Random(5).randbytes(128 * 1024)
            with tls_client(dial(topo.ns("a").name, (host, port)), tls[1]) as sock:
                assert exchange(sock, payload) == (payload, None)
                net.apply(LAN.replace(name="slow", delay_ms=100))
                assert roundtrip_time(sock) >= 0.2  # on the open connection
            net.apply(LAN)
            net.corrupt_next(50_000)
            with tls_client(dial(topo.ns("a").name, (host, port)), tls[1]) as sock:
                got, _ = exchange(sock, payload)
            assert len(got) < len(payload) and got == payload[: len(got)]
            assert any(isinstance(e, ssl.SSLError) for e in server.wait_errors())
            net.cut_next(20_000)
            with tls_client(dial(topo.ns("a").name, (host, port)), tls[1]) as sock:
                got, error = exchange(sock, payload)
            assert len(got) < 20_000 and error is not None
            stats = net.stats
            assert stats.connections == 3 and stats.corrupted == 1 and stats.cut == 1
        finally:
            server.close()


def test_tbf_limits_the_inter_site_rate_in_the_kernel() -> None:
    with Network.create("netns", profile=WanProfile(name="thin", rate_mbit=8)) as net:
        topo = net.topology
        assert topo is not None
        for site in ("a", "b"):
            shown = topo.qdisc(site)
            assert "tbf" in shown and "rate 8Mbit" in shown
        assert "tbf" not in topo.qdisc("broker")
        sink = server_in(topo.ns("b").name, net.agent_host("b"), sink=True)
        try:
            total = 1 << 20
            with dial(topo.ns("a").name, sink.address) as sock:  # direct, no proxy: kernel only
                start = time.monotonic()
                sender = threading.Thread(target=send_all, args=(sock, total))
                sender.start()
                sink.wait_received(total)
                elapsed = time.monotonic() - start
                sender.join()
            # 1 MiB at 1 MB/s, less the bucket's burst and the queue the latency allows
            assert elapsed >= (total - 64 * 1024 - 64 * 1024) / 1_000_000 * 0.95
        finally:
            sink.close()
        net.apply(LAN)
        assert "tbf" not in topo.qdisc("a")


def test_partition_cuts_the_sites_apart_but_not_from_the_broker() -> None:
    with Network.create("netns") as net:
        topo = net.topology
        assert topo is not None
        echo_b = server_in(topo.ns("b").name, net.agent_host("b"))
        echo_broker = server_in(topo.ns("broker").name, net.broker_host())
        try:
            via = net.link("a", "b", *echo_b.address)
            proxied = dial(topo.ns("a").name, via)
            roundtrip_time(proxied)
            net.partition()
            assert exchange(proxied, b"x")[0] == b""  # reset by the proxy
            proxied.close()
            with pytest.raises(OSError):
                dial(topo.ns("a").name, echo_b.address)  # and nothing goes around it
            with dial(topo.ns("a").name, echo_broker.address) as sock:
                roundtrip_time(sock)  # the broker is still there
            net.heal()
            with dial(topo.ns("a").name, echo_b.address) as sock:
                roundtrip_time(sock)
            with dial(topo.ns("a").name, via) as sock:
                roundtrip_time(sock)

            net.partition(isolate="b")  # site b loses its link: the broker too
            assert "state DOWN" in topo.run("router", ["ip", "link", "show", "r-b"]).stdout
            with pytest.raises(OSError):  # unreachable, or no answer at all: either is cut off
                dial(topo.ns("b").name, echo_broker.address, timeout=1)
            net.heal()
            with dial(topo.ns("b").name, echo_broker.address) as sock:
                roundtrip_time(sock)
            with dial(topo.ns("a").name, via) as sock:
                roundtrip_time(sock)
            assert net.stats.partitions == 2
        finally:
            echo_b.close()
            echo_broker.close()


def test_portal_reaches_a_namespace_from_the_test_process() -> None:
    with Network.create("netns") as net:
        topo = net.topology
        assert topo is not None
        server = server_in(topo.ns("broker").name, net.broker_host())
        try:
            host, port = net.portal("broker", server.address[1])
            assert host == "127.0.0.1"
            with socket.create_connection((host, port), timeout=10) as sock:
                roundtrip_time(sock)
            assert net.stats.connections == 0  # the portal is not the WAN link
            command = net.command(["true"], None)
            assert command[:4] == ["ip", "netns", "exec", topo.ns("broker").name]
            port_b = net.free_port("b")
            assert 0 < port_b < 65536
        finally:
            server.close()
