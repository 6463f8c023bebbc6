"""A userspace TCP proxy that shapes and breaks the inter-site link on purpose.

This machine's kernel has no netem, so WAN latency, jitter, loss-like stalls, bursts, resets,
partitions and byte corruption are made here, between the two sites. One :class:`FaultProxy`
runs its own event loop in a thread (so synchronous tests and the harness can drive it) and
forwards any number of *routes* (listen address -> target address), all sharing one
:class:`~tests.harness.network.wan.WanProfile`, one set of armed faults and one
:class:`ProxyStats`. Listening and upstream sockets can each be created inside a network
namespace (see :func:`~tests.harness.network.netns.entered`), which is how the proxy sits in the
router namespace while the test process stays in the host's.

How a byte travels, per connection and direction ("up" = client to server, "down" = back):

1. read from the source socket (up to 64 KiB at a time);
2. armed faults: ``cut`` (forward up to the offset, then close both sides), ``corrupt`` (flip
   one byte at that offset). A fault is armed for a direction and taken by the first chunk that
   crosses the link in that direction afterwards, on whichever connection carries it (a new one,
   or one kept open across calls, as replication keeps its connections); its offset counts from
   there;
3. the profile's reset stand-in may reset the connection (RST both sides);
4. the proxy's rate limit, when it enforces one: one token bucket per *physical direction* of
   the link (from one site to the other), shared by every connection, like a real link;
5. a delivery time: now + delay ± jitter, plus a stall (loss stand-in) or a hold (burst
   stand-in) when the dice say so, and never earlier than the previous chunk's, because a TCP
   stream is delivered in order: a late chunk holds back everything behind it (head-of-line
   blocking, which is what loss and reordering look like to the application);
6. written to the destination socket at that time.

Everything a real network does to *packets* that TCP repairs below the application (reordering,
duplication, loss, corrupted checksums) reaches the application only as timing: that is what
steps 3 and 5 emulate. Corruption in step 2 is the opposite case: bytes that escaped TCP's
checksum (a faulty middlebox or NIC), which only TLS can catch. See docs/harness-network.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from tests.harness.network.netns import entered
from tests.harness.network.wan import LAN, SEGMENT_BYTES, WanProfile

Direction = Literal["up", "down"]
PartitionMode = Literal["reset", "blackhole"]

#: Largest chunk read from a socket at once.
CHUNK = 64 * 1024
#: Chunks in flight per connection and direction (read but not yet delivered): the "wire".
IN_FLIGHT_CHUNKS = 256
#: Bytes the rate limiter lets through at once before pacing (a link's burst allowance).
RATE_BURST = 64 * 1024
#: How long an upstream connect may take before the client is reset.
CONNECT_TIMEOUT = 10.0

_T = TypeVar("_T")


@dataclasses.dataclass
class ProxyStats:
    """Counters since the proxy started. Read them from any thread; the proxy's loop writes."""

    #: Connections forwarded (accepted and connected upstream).
    connections: int = 0
    #: Bytes read from clients and forwarded to servers.
    bytes_up: int = 0
    #: Bytes read from servers and forwarded to clients.
    bytes_down: int = 0
    #: Bytes flipped on demand (:meth:`FaultProxy.corrupt_next`).
    corrupted: int = 0
    #: Connections cut on demand (:meth:`FaultProxy.cut_next`).
    cut: int = 0
    #: Connections reset at accept because the link was partitioned.
    refused: int = 0
    #: Open connections reset by :meth:`FaultProxy.partition` or :meth:`FaultProxy.reset_all`.
    dropped: int = 0
    #: Connections reset by the profile's reset stand-in (``reset_per_mib``).
    resets: int = 0
    #: Chunks held back by a loss stand-in stall (``stall_probability``).
    stalls: int = 0
    #: Chunks held back to be released as a burst (``burst_probability``).
    bursts: int = 0
    #: Times the link was partitioned.
    partitions: int = 0
    #: Clients reset because the target refused or did not answer.
    upstream_failures: int = 0

    @property
    def faults_injected(self) -> int:
        """Every fault the proxy made happen: on demand and from the profile's dice."""
        return (
            self.corrupted
            + self.cut
            + self.dropped
            + self.resets
            + self.stalls
            + self.bursts
            + self.partitions
        )

    def snapshot(self) -> ProxyStats:
        return dataclasses.replace(self)


@dataclasses.dataclass(frozen=True)
class Route:
    """One forwarded address: clients connect to ``listen``, the proxy connects to ``target``."""

    listen: tuple[str, int]
    target: tuple[str, int]
    #: Namespace the listening socket lives in (None: this process' own).
    listen_netns: str | None = None
    #: Namespace upstream sockets are created in (None: this process' own).
    connect_netns: str | None = None
    #: Labels of the link's two ends, e.g. ``("a", "b")``: the up direction is shaped by the
    #: bucket for ``src -> dst``, the down direction by ``dst -> src``.
    src: str = "client"
    dst: str = "server"

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"


@dataclasses.dataclass
class _Fault:
    kind: Literal["corrupt", "cut"]
    offset: int
    direction: Direction


class _Bucket:
    """A token bucket for one physical direction: data leaves no faster than ``rate`` bytes/s.

    Tokens may go negative: a connection that takes more than there is waits until the debt is
    repaid, and so does everyone after it, which is how one link's capacity is shared.
    """

    def __init__(self) -> None:
        self.tokens = float(RATE_BURST)
        self.stamp: float | None = None

    def reserve(self, nbytes: int, rate: float, now: float) -> float:
        """Take ``nbytes``; returns the seconds to wait until they have left at ``rate``."""
        if self.stamp is not None:
            self.tokens = min(float(RATE_BURST), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= nbytes
        return max(0.0, -self.tokens / rate)


class _Conn:
    """One proxied connection: the client's and the upstream's streams."""

    def __init__(self, route: Route, client: asyncio.StreamWriter) -> None:
        self.route = route
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.aborted = False

    def abort(self) -> None:
        """Reset both sides (RST, not FIN): what a broken path or a middlebox looks like."""
        self.aborted = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()


_EOF = object()
_CUT = object()
_RESET = object()


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _new_socket(host: str, netns: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    with entered(netns):
        return socket.socket(family, socket.SOCK_STREAM)


class FaultProxy:
    """Forward TCP routes through one shaped, breakable link. See the module docstring.

    ``FaultProxy("host:port")`` is the single-route form the replication tests use; the harness
    adds routes with :meth:`add_route`. Settings change while connections are open.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        listen_host: str = "127.0.0.1",
        netns: str | None = None,
        profile: WanProfile = LAN,
        enforce_rate: bool = True,
        seed: int = 0,
        name: str = "fault-proxy",
    ) -> None:
        self.listen_host = listen_host
        self.netns = netns
        self.stats = ProxyStats()
        self.routes: list[Route] = []
        self._profile = profile
        self._enforce_rate = enforce_rate
        self._rate_override: float | None = None
        self._delay_override: float | None = None
        self._rng = random.Random(seed)  # seeded fault dice, not secrets
        self._armed: list[_Fault] = []
        self._partition: PartitionMode | None = None
        self._conns: set[_Conn] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=name)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy's event loop did not start")
        if target is not None:
            self.add_route(target)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        self._loop.run_forever()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 15) -> _T:
        if self._closed:
            coro.close()
            raise RuntimeError("the fault proxy is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _do(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._call(call())

    # -- routes -----------------------------------------------------------------------------------

    def add_route(
        self,
        target: str,
        *,
        listen_host: str | None = None,
        listen_port: int = 0,
        listen_netns: str | None = None,
        connect_netns: str | None = None,
        src: str = "client",
        dst: str = "server",
    ) -> Route:
        """Listen on ``listen_host:listen_port`` (0 = any free port) and forward to ``target``.

        Namespaces default to the proxy's ``netns``. Returns the route with its real port.
        """
        host = listen_host if listen_host is not None else self.listen_host
        lns = listen_netns if listen_netns is not None else self.netns
        cns = connect_netns if connect_netns is not None else self.netns
        target_addr = _split_address(target)

        async def start() -> Route:
            sock = _new_socket(host, lns)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, listen_port))
                sock.listen(128)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            route = Route(
                listen=(host, sock.getsockname()[1]),
                target=target_addr,
                listen_netns=lns,
                connect_netns=cns,
                src=src,
                dst=dst,
            )

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                # close() cancels handlers; end them quietly (asyncio's stream callback would
                # otherwise log the cancellation as an error).
                with contextlib.suppress(asyncio.CancelledError):
                    await self._handle(route, r, w)

            self._servers.append(await asyncio.start_server(handle, sock=sock))
            return route

        route = self._call(start())
        self.routes.append(route)
        return route

    @property
    def port(self) -> int:
        """The first route's listening port."""
        return self.routes[0].listen[1]

    @property
    def address(self) -> str:
        """The first route's listening address, ``host:port``."""
        return self.routes[0].address

    # -- settings ---------------------------------------------------------------------------------

    @property
    def profile(self) -> WanProfile:
        return self._profile

    def apply(self, profile: WanProfile, *, enforce_rate: bool | None = None) -> None:
        """Shape the link as ``profile`` from now on, for open and new connections alike.

        ``enforce_rate=False`` leaves bandwidth to someone else (``tbf`` in namespace mode).
        Overrides set through :attr:`delay` and :attr:`rate` are cleared.
        """
        self._profile = profile
        if enforce_rate is not None:
            self._enforce_rate = enforce_rate
        self._rate_override = None
        self._delay_override = None

    @property
    def delay(self) -> float:
        """One-way delay in seconds (assigning it overrides the profile's delay)."""
        if self._delay_override is not None:
            return self._delay_override
        return self._profile.delay_ms / 1000

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay_override = max(0.0, float(seconds))

    @property
    def rate(self) -> float:
        """Bytes per second per direction the proxy enforces, 0 = unlimited (assignable)."""
        if self._rate_override is not None:
            return self._rate_override
        return self._profile.rate_bytes if self._enforce_rate else 0.0

    @rate.setter
    def rate(self, bytes_per_second: float) -> None:
        self._rate_override = max(0.0, float(bytes_per_second))

    # -- faults on demand -------------------------------------------------------------------------

    def corrupt_next(self, offset: int, direction: Direction = "up") -> None:
        """Flip the byte ``offset`` bytes into what next crosses the link in ``direction`` (on a
        new connection or one already open)."""
        self._do(lambda: self._armed.append(_Fault("corrupt", offset, direction)))

    def cut_next(self, after_bytes: int, direction: Direction = "up") -> None:
        """Forward ``after_bytes`` more of what next crosses the link in ``direction``, then
        reset that connection (truncation)."""
        self._do(lambda: self._armed.append(_Fault("cut", after_bytes, direction)))

    @property
    def corrupt_at(self) -> int | None:
        """Offset armed by :meth:`corrupt_next` in the up direction (None when not armed)."""
        return next((f.offset for f in self._armed if f.kind == "corrupt"), None)

    @corrupt_at.setter
    def corrupt_at(self, offset: int | None) -> None:
        if offset is not None:
            self.corrupt_next(offset)

    @property
    def cut_after(self) -> int | None:
        """Length armed by :meth:`cut_next` in the up direction (None when not armed)."""
        return next((f.offset for f in self._armed if f.kind == "cut"), None)

    @cut_after.setter
    def cut_after(self, after_bytes: int | None) -> None:
        if after_bytes is not None:
            self.cut_next(after_bytes)

    @property
    def partitioned(self) -> bool:
        return self._partition is not None

    def partition(self, mode: PartitionMode = "reset") -> None:
        """Break the link until :meth:`heal`.

        ``reset``: every open connection is reset at once and new ones are reset at accept
        (applications see ECONNRESET: the fast, unambiguous failure). ``blackhole``: nothing
        moves and nothing is closed; open connections hang, new ones are accepted by the kernel
        but never reach the target (what a real partition does: only timeouts and keepalives
        notice it). After heal, blackholed connections carry on as if nothing happened.
        """

        def cut() -> None:
            self._partition = mode
            self.stats.partitions += 1
            if mode == "blackhole":
                self._flowing.clear()
            else:
                self._abort_all()

        self._do(cut)

    def heal(self) -> None:
        """End a partition: new connections are forwarded again, blackholed ones resume."""

        def heal() -> None:
            self._partition = None
            self._flowing.set()

        self._do(heal)

    def reset_all(self) -> int:
        """Reset every open connection now (the link stays up). Returns how many."""
        return self._do(self._abort_all)

    def _abort_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        self.stats.dropped += len(conns)
        return len(conns)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def wait_connections(self, n: int, timeout: float = 20) -> None:
        """Wait until ``n`` connections have been forwarded since the start."""
        deadline = time.monotonic() + timeout
        while self.stats.connections < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.stats.connections} connections through the proxy")
            time.sleep(0.01)

    # -- forwarding -------------------------------------------------------------------------------

    async def _handle(
        self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._partition == "reset":
            self.stats.refused += 1
            _reset(writer)
            return
        await self._flowing.wait()  # a blackholed link holds new connections here
        conn = _Conn(route, writer)
        self._conns.add(conn)
        try:
            try:
                up_reader, upstream = await asyncio.wait_for(self._connect(route), CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                self.stats.upstream_failures += 1
                conn.abort()
                return
            conn.upstream = upstream
            if conn.aborted:  # partitioned while connecting
                conn.abort()
                return
            self.stats.connections += 1
            results = await asyncio.gather(
                self._pipe(conn, reader, upstream, "up"),
                self._pipe(conn, up_reader, writer, "down"),
                return_exceptions=True,
            )
            if not all(r is True for r in results):
                conn.abort()
            else:
                for w in (writer, upstream):
                    w.close()
        finally:
            self._conns.discard(conn)

    async def _connect(self, route: Route) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = route.target
        if route.connect_netns is None:
            return await asyncio.open_connection(host, port)
        sock = _new_socket(host, route.connect_netns)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def _bucket(self, route: Route, direction: Direction) -> _Bucket:
        key = (route.src, route.dst) if direction == "up" else (route.dst, route.src)
        return self._buckets.setdefault(key, _Bucket())

    def _chance(self, probability: float, units: float) -> bool:
        """True with the probability that at least one of ``units`` independent trials hits."""
        if probability <= 0 or units <= 0:
            return False
        return self._rng.random() < 1 - math.pow(1 - min(probability, 1.0), units)

    async def _pipe(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> bool:
        """Move one direction until EOF (True) or a fault or error ended the connection."""
        line: asyncio.Queue[tuple[float, bytes | object]] = asyncio.Queue(IN_FLIGHT_CHUNKS)
        cut: int | None = None  # stream offsets of the faults this direction took
        corrupt: list[int] = []
        loop = asyncio.get_running_loop()
        last_due = 0.0

        def due_after(delay: float) -> float:
            """Delivery time of what is read now: in order, never before what came earlier."""
            nonlocal last_due
            last_due = max(last_due, loop.time() + max(0.0, delay))
            return last_due

        async def produce() -> None:
            nonlocal cut
            seen = 0
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    await line.put((last_due, _RESET))
                    return
                if not data:
                    await line.put((due_after(self.delay), _EOF))
                    return
                await self._flowing.wait()
                if conn.aborted:
                    await line.put((last_due, _RESET))
                    return
                for fault in self._take_armed(direction):
                    if fault.kind == "cut":
                        at = seen + fault.offset
                        cut = at if cut is None else min(cut, at)
                    else:
                        corrupt.append(seen + fault.offset)
                cutting = cut is not None and seen + len(data) >= cut
                if cut is not None and cutting:
                    data = data[: max(0, cut - seen)]
                for at in corrupt:
                    if seen <= at < seen + len(data):
                        buf = bytearray(data)
                        buf[at - seen] ^= 0xFF
                        data = bytes(buf)
                        self.stats.corrupted += 1
                seen += len(data)
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                profile = self._profile
                if not cutting and self._chance(profile.reset_per_mib, len(data) / (1 << 20)):
                    self.stats.resets += 1
                    await line.put((last_due, _RESET))
                    return
                if data:
                    rate = self.rate
                    if rate > 0:
                        bucket = self._bucket(conn.route, direction)
                        wait = bucket.reserve(len(data), rate, loop.time())
                        if wait > 0:
                            await asyncio.sleep(wait)
                    delay = self.delay
                    if profile.jitter_ms:
                        delay += self._rng.uniform(-profile.jitter_ms, profile.jitter_ms) / 1000
                    segments = math.ceil(len(data) / SEGMENT_BYTES)
                    if self._chance(profile.stall_probability, segments):
                        self.stats.stalls += 1
                        delay += profile.stall_ms / 1000
                    elif self._chance(profile.burst_probability, segments):
                        self.stats.bursts += 1
                        delay += profile.burst_hold_ms / 1000
                    await line.put((due_after(delay), data))
                if cutting:
                    self.stats.cut += 1
                    await line.put((last_due, _CUT))
                    return

        async def deliver() -> bool:
            while True:
                due, item = await line.get()
                pause = due - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                await self._flowing.wait()
                if conn.aborted:
                    return False
                if item is _EOF:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return True
                if item is _CUT or item is _RESET:
                    conn.abort()
                    return False
                assert isinstance(item, bytes)
                writer.write(item)
                await writer.drain()

        producer = asyncio.ensure_future(produce())
        try:
            return await deliver()
        except (OSError, RuntimeError):  # a peer went away mid-write: end both directions now
            conn.abort()
            return False
        finally:
            producer.cancel()
            await asyncio.wait([producer])
            if not producer.cancelled():
                producer.exception()  # retrieved: the connection's outcome is already decided

    def _take_armed(self, direction: Direction) -> list[_Fault]:
        """The faults armed for ``direction``, taken (the proxy's loop only)."""
        if not self._armed:
            return []
        taken = [f for f in self._armed if f.direction == direction]
        self._armed = [f for f in self._armed if f.direction != direction]
        return taken

    # -- shutting down ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop. Idempotent."""
        if self._closed:
            return

        async def stop() -> None:
            for server in self._servers:
                server.close()
            for conn in list(self._conns):
                conn.abort()
            self._flowing.set()
            tasks = [t for t in self._tasks if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(stop(), timeout=10)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
