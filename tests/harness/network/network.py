"""The harness's network, in one of two modes behind one API.

``loopback``
    Works anywhere, no privileges: every site and the broker on 127.0.0.1, the inter-site link a
    :class:`~tests.harness.network.proxy.FaultProxy` on a local port that also enforces the
    profile's bandwidth.
``netns``
    Needs root and iproute2: each site, the broker and a router in their own network namespaces
    (:class:`~tests.harness.network.netns.Topology`), the proxy in the router namespace, and the
    bandwidth enforced by ``tbf`` on the router's veths.

Usage::

    with Network.create("netns", run_id="r1", profile=WAN) as net:
        broker = net.popen("broker", ["sitepair-broker", "serve", ...])
        host, port = net.link("a", "b", net.agent_host("b"), 8084)  # what site a dials for b
        ...
        net.partition()
        net.heal()
        net.apply(PROFILES["lossy"])
        print(net.stats)

Processes started through :meth:`Network.popen` are killed (by pid) at teardown if they are still
running; in namespace mode so is anything else left inside the run's namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from tests.harness.network.netns import (
    BROKER,
    NetnsUnavailable,
    Topology,
    entered,
    kill_processes,
    netns_unavailable_reason,
)
from tests.harness.network.proxy import FaultProxy, ProxyStats
from tests.harness.network.wan import LAN, WanLink, WanProfile

Mode = Literal["loopback", "netns"]
LOOPBACK = "127.0.0.1"

_run_ids = itertools.count(1)


def default_run_id() -> str:
    """A run id unique among live processes: this pid and a counter (``ip netns`` safe)."""
    return f"{os.getpid():x}n{next(_run_ids)}"


class Network:
    """Where the sites and the broker live and how the inter-site link behaves."""

    def __init__(
        self,
        mode: Mode,
        sites: Sequence[str],
        wan: WanLink,
        topology: Topology | None,
    ) -> None:
        self.mode: Mode = mode
        self.sites = tuple(sites)
        self.wan = wan
        self.topology = topology
        self._portal: FaultProxy | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    @contextlib.contextmanager
    def create(
        cls,
        mode: Mode = "loopback",
        *,
        run_id: str | None = None,
        sites: Sequence[str] = ("a", "b"),
        profile: WanProfile = LAN,
        seed: int = 0,
    ) -> Iterator[Network]:
        """Build the network, yield it, tear everything down on exit (also after an exception).

        ``netns`` raises :class:`~tests.harness.network.netns.NetnsUnavailable` with the reason
        (not root, no iproute2, ``ip netns add`` refused) when it cannot run here. ``seed``
        makes the profile's fault dice reproducible.
        """
        if mode == "loopback":
            proxy = FaultProxy(profile=profile, seed=seed, name="wan-proxy")
            net = cls(mode, sites, WanLink(proxy), None)
            try:
                yield net
            finally:
                net.close()
            return
        if mode != "netns":
            raise ValueError(f"network mode must be 'loopback' or 'netns', got {mode!r}")
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(f"namespace mode is unavailable: {reason}")
        with Topology.create(run_id or default_run_id(), sites) as topo:
            proxy = FaultProxy(
                listen_host=topo.router.address,
                netns=topo.router.name,
                profile=profile,
                enforce_rate=False,
                seed=seed,
                name="wan-proxy",
            )
            net = cls(mode, sites, WanLink(proxy, topo), topo)
            try:
                net.apply(profile)
                yield net
            finally:
                net.close()

    # -- places -----------------------------------------------------------------------------------

    def host(self, where: str) -> str:
        """The address ``where`` (a site or ``"broker"``) listens on and is reached at."""
        if where != BROKER and where not in self.sites:
            raise KeyError(f"no place {where!r}: sites {self.sites} and {BROKER!r}")
        if self.topology is None:
            return LOOPBACK
        return self.topology.address(where)

    def broker_host(self) -> str:
        return self.host(BROKER)

    def agent_host(self, site: str) -> str:
        return self.host(site)

    def free_port(self, where: str) -> int:
        """A TCP port free right now on ``where``'s address (each namespace has its own ports)."""
        host = self.host(where)
        if self.topology is None:
            sock = socket.socket()
        else:
            with entered(self.topology.ns(where).name):
                sock = socket.socket()
        with sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])

    # -- running things ---------------------------------------------------------------------------

    def command(self, argv: Sequence[str], site: str | None) -> list[str]:
        """``argv`` wrapped so it runs at ``site`` (None: where the broker is)."""
        where = site if site is not None else BROKER
        self.host(where)  # validates the name in both modes
        if self.topology is None:
            return list(argv)
        return self.topology.command(where, argv)

    def popen(self, where: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` at ``where``; killed at teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv, where), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(
        self, where: str, argv: Sequence[str], *, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` at ``where`` and wait (``subprocess.run`` keywords pass through)."""
        kwargs.setdefault("check", False)
        result: subprocess.CompletedProcess[Any] = subprocess.run(
            self.command(argv, where), timeout=timeout, **kwargs
        )
        return result

    def portal(self, where: str, port: int) -> tuple[str, int]:
        """An address on this process' loopback that reaches ``where``'s ``port`` unshaped.

        For the harness itself (admin clients, checks) in namespace mode, where the test process
        lives outside the namespaces. In loopback mode it is ``where``'s own address.
        """
        host = self.host(where)
        if self.topology is None:
            return host, port
        if self._portal is None:
            self._portal = FaultProxy(name="portal")
        route = self._portal.add_route(
            f"{host}:{port}",
            listen_host=LOOPBACK,
            connect_netns=self.topology.ns(where).name,
            src="harness",
            dst=where,
        )
        return route.listen

    # -- the inter-site link ----------------------------------------------------------------------

    def link(self, from_site: str, to_site: str, host: str, port: int) -> tuple[str, int]:
        """Where ``from_site`` dials to reach ``to_site``'s ``host:port`` across the WAN link."""
        for site in (from_site, to_site):
            if site not in self.sites:
                raise KeyError(f"no site {site!r} (have {self.sites})")
        return self.wan.forward(from_site, to_site, host, port)

    @property
    def profile(self) -> WanProfile:
        return self.wan.profile

    def apply(self, profile: WanProfile) -> None:
        """Change the link's profile now; connections already open are shaped from now on."""
        self.wan.apply(profile)

    def partition(
        self, *, isolate: str | None = None, mode: Literal["reset", "blackhole"] = "reset"
    ) -> None:
        """Cut the sites apart (see :meth:`WanLink.partition`)."""
        self.wan.partition(isolate=isolate, mode=mode)

    def heal(self) -> None:
        self.wan.heal()

    def corrupt_next(self, offset: int, direction: Literal["up", "down"] = "up") -> None:
        self.wan.corrupt_next(offset, direction)

    def cut_next(self, after_bytes: int, direction: Literal["up", "down"] = "up") -> None:
        self.wan.cut_next(after_bytes, direction)

    @property
    def stats(self) -> ProxyStats:
        return self.wan.stats

    def bytes_moved(self) -> int:
        return self.wan.bytes_moved()

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what :meth:`popen` started, stop the proxies. Idempotent.

        In namespace mode, :meth:`create`'s context then deletes the namespaces.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self._procs)
        kill_processes(procs)
        self.wan.close()
        if self._portal is not None:
            self._portal.close()
