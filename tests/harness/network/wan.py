"""WAN profiles for the inter-site link, and the link itself: a shaped, breakable path.

The kernel here has no netem, so a profile is carried out by two pieces:

* the :class:`~tests.harness.network.proxy.FaultProxy`, a userspace TCP proxy between the sites
  (in the router namespace, or on 127.0.0.1 in loopback mode): latency, jitter, loss-like stalls,
  bursts and resets, plus corruption, truncation and partitions on demand;
* bandwidth: ``tc qdisc ... tbf`` on the router's site-facing veths (namespace mode, in the
  kernel), or the proxy's own token bucket (loopback mode).

What each profile can and cannot emulate, honestly:

* A TCP proxy terminates TCP. Whatever a network does to *packets* (loss, reordering,
  duplication, checksum-failing corruption) is repaired by the receiving TCP stack below the
  application, so the application only ever sees an in-order byte stream with *timing* effects:
  head-of-line stalls, bursts, lower throughput, and sometimes a reset connection. The proxy
  reproduces those effects, not the packets. Kernel congestion control never sees a loss, so
  the throughput collapse real loss causes (cwnd halving) is approximated by the stalls alone.
* Loss: a lost segment costs a retransmission, typically one to a few RTTs during which nothing
  behind it is delivered. Stand-in: with ``stall_probability`` per 1448-byte segment, a chunk and
  everything behind it is held ``stall_rtt_factor`` x RTT.
* Reordering: the receiving TCP holds later segments until the missing one arrives, then
  releases them together. Stand-in: with ``burst_probability`` per segment, a chunk is held
  ``burst_hold_ms`` and whatever queued behind it is delivered in one burst. Jitter adds the
  same bunching at a smaller scale (delivery stays in order).
* Duplication: the receiver drops duplicates; the only cost is bandwidth. Stand-in: none
  beyond a lower ``rate_mbit``; the proxy cannot spend link capacity on bytes nobody sees.
* Corruption: packets whose checksum fails are dropped (= loss, above). Bytes that *pass* TCP's
  checksum corrupted (a bad middlebox or NIC) are what :meth:`WanLink.corrupt_next` makes; only
  TLS notices them, which is the point of that fault.
* A path bad enough eventually kills connections (retransmission give-up, middlebox state
  loss). Stand-in: ``reset_per_mib``, a connection reset with that probability per MiB.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tests.harness.network.netns import Topology
    from tests.harness.network.proxy import FaultProxy, ProxyStats

#: The segment size the per-segment probabilities refer to (Ethernet MTU minus IP/TCP headers
#: with timestamps).
SEGMENT_BYTES = 1448


@dataclasses.dataclass(frozen=True)
class WanProfile:
    """How the inter-site link behaves, in each direction. Zero everywhere is a plain LAN."""

    #: Profile name (``lan``, ``metro``, ``wan``, ``lossy``, or a caller's own).
    name: str
    #: One-way propagation delay added in each direction, in milliseconds.
    delay_ms: float = 0.0
    #: Uniform variation of the delay, +/- this many milliseconds per chunk; the stream stays in
    #: order, so a chunk drawn early waits behind the one before it (bunching, like a real path).
    jitter_ms: float = 0.0
    #: Bandwidth per direction in Mbit/s; 0 is unlimited. ``tbf`` in namespace mode, the proxy's
    #: token bucket in loopback mode.
    rate_mbit: float = 0.0
    #: Loss stand-in: probability, per 1448-byte segment, that the chunk carrying it stalls
    #: (with everything behind it) for ``stall_rtt_factor`` x RTT, like a retransmission.
    stall_probability: float = 0.0
    #: Length of a stall in round-trip times (RTT = 2 x ``delay_ms``).
    stall_rtt_factor: float = 3.0
    #: Reordering stand-in: probability per segment that a chunk is held ``burst_hold_ms`` and
    #: released in one burst with whatever queued behind it.
    burst_probability: float = 0.0
    #: How long a burst is held back, in milliseconds.
    burst_hold_ms: float = 0.0
    #: Probability, per MiB forwarded in one direction of a connection, that the connection is
    #: reset (RST to both ends): what a path bad enough eventually does to TCP connections.
    reset_per_mib: float = 0.0
    #: One line saying what the profile stands for, for reports.
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("delay_ms", "jitter_ms", "rate_mbit", "stall_rtt_factor", "burst_hold_ms"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.name}: {field} must not be negative")
        for field in ("stall_probability", "burst_probability", "reset_per_mib"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"{self.name}: {field} must be between 0 and 1")

    @property
    def rtt_ms(self) -> float:
        """The round-trip time the delay makes (jitter and stalls aside)."""
        return 2 * self.delay_ms

    @property
    def stall_ms(self) -> float:
        """How long one loss stand-in stall holds the stream."""
        return self.stall_rtt_factor * self.rtt_ms

    @property
    def rate_bytes(self) -> float:
        """Bandwidth in bytes per second, 0 = unlimited."""
        return self.rate_mbit * 1e6 / 8

    def replace(self, **changes: object) -> WanProfile:
        """A copy with some fields changed (``WAN.replace(rate_mbit=100)``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


LAN = WanProfile(name="lan", description="no shaping: the two sites on one switch")
METRO = WanProfile(
    name="metro",
    delay_ms=5,
    rate_mbit=120,
    description="metro area link: 5 ms one way, 120 Mbit/s",
)
WAN = WanProfile(
    name="wan",
    delay_ms=100,
    jitter_ms=20,
    rate_mbit=10,
    stall_probability=0.01,
    stall_rtt_factor=3,
    description="long haul: 100 +/- 20 ms one way, 10 Mbit/s, 1% of segments stall 3x RTT (loss)",
)
LOSSY = WanProfile(
    name="lossy",
    delay_ms=30,
    jitter_ms=20,
    rate_mbit=10,
    stall_probability=0.01,
    stall_rtt_factor=3,
    burst_probability=0.05,
    burst_hold_ms=60,
    reset_per_mib=0.005,
    description=(
        "a bad path: 30 +/- 20 ms, 10 Mbit/s, 1% of segments stall 3x RTT (loss), 5% held "
        "60 ms then released in a burst (reordering), a reset every ~200 MiB"
    ),
)

#: The named profiles the harness and its scenarios choose from.
PROFILES: dict[str, WanProfile] = {p.name: p for p in (LAN, METRO, WAN, LOSSY)}


def profile(name: str) -> WanProfile:
    """The named profile; a clear error listing the names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"no WAN profile {name!r}; known: {', '.join(PROFILES)}") from None


class WanLink:
    """The inter-site link of one run: its proxy, and in namespace mode the router's shaping.

    Built by :class:`~tests.harness.network.network.Network`; scenarios use it to change the
    profile while replication runs and to break the link on demand.
    """

    def __init__(self, proxy: FaultProxy, topology: Topology | None = None) -> None:
        self.proxy = proxy
        self.topology = topology
        self._isolated: list[str] = []
        self._blocked = False

    @property
    def profile(self) -> WanProfile:
        return self.proxy.profile

    def apply(self, wan_profile: WanProfile) -> None:
        """Shape the link as ``wan_profile`` from now on; open connections included."""
        if self.topology is not None:
            self.topology.set_rate(wan_profile.rate_mbit)
        self.proxy.apply(wan_profile, enforce_rate=self.topology is None)

    def forward(self, from_site: str, to_site: str, host: str, port: int) -> tuple[str, int]:
        """Where ``from_site`` connects to reach ``to_site``'s ``host:port`` across the link.

        Loopback mode: a proxy port on 127.0.0.1. Namespace mode: a port on the router's
        service address; the proxy connects from the router to ``host:port``.
        """
        if self.topology is None:
            route = self.proxy.add_route(f"{host}:{port}", src=from_site, dst=to_site)
        else:
            router = self.topology.router
            route = self.proxy.add_route(
                f"{host}:{port}",
                listen_host=router.address,
                listen_netns=router.name,
                connect_netns=router.name,
                src=from_site,
                dst=to_site,
            )
        return route.listen

    def partition(
        self, *, isolate: str | None = None, mode: Literal["reset", "blackhole"] = "reset"
    ) -> None:
        """Cut the sites apart until :meth:`heal`.

        The proxy resets (or, with ``mode="blackhole"``, freezes) every connection through it
        and refuses (or holds) new ones. In namespace mode the router also stops forwarding
        between the site subnets (ICMP prohibited), so nothing crosses around the proxy, while
        the broker stays reachable from both sites. ``isolate="b"`` additionally sets the
        router's veth towards site ``b`` down: that site loses everyone, broker included.
        """
        if isolate is not None:
            if self.topology is None:
                raise ValueError(
                    "isolate= needs namespace mode: loopback has no links to take down"
                )
            if isolate not in self.topology.sites:
                raise KeyError(f"no site {isolate!r} to isolate (have {self.topology.sites})")
        self.proxy.partition(mode)
        if self.topology is not None:
            if not self._blocked:
                self.topology.block_intersite(True)
                self._blocked = True
            if isolate is not None and isolate not in self._isolated:
                self.topology.set_link(isolate, up=False)
                self._isolated.append(isolate)

    def heal(self) -> None:
        """Undo :meth:`partition`: links up, forwarding back, the proxy passes traffic again."""
        if self.topology is not None:
            for site in self._isolated:
                self.topology.set_link(site, up=True)
            self._isolated.clear()
            if self._blocked:
                self.topology.block_intersite(False)
                self._blocked = False
        self.proxy.heal()

    @property
    def partitioned(self) -> bool:
        return self.proxy.partitioned

    def corrupt_next(self, offset: int, direction: Literal["up", "down"] = "up") -> None:
        """Flip the byte ``offset`` bytes into what next crosses the link in ``direction``
        (client to server: up), on a new connection or one kept open."""
        self.proxy.corrupt_next(offset, direction)

    def cut_next(self, after_bytes: int, direction: Literal["up", "down"] = "up") -> None:
        """Let ``after_bytes`` more of what next crosses the link in ``direction`` through,
        then reset that connection."""
        self.proxy.cut_next(after_bytes, direction)

    def reset_all(self) -> int:
        """Reset every connection across the link now (it stays up). Returns how many."""
        return self.proxy.reset_all()

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the link's counters (bytes each way, connections, faults)."""
        return self.proxy.stats.snapshot()

    def bytes_moved(self) -> int:
        stats = self.proxy.stats
        return stats.bytes_up + stats.bytes_down

    def close(self) -> None:
        """Stop the proxy (the topology's own teardown removes the qdiscs with the links)."""
        self.proxy.close()
