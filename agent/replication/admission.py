"""Who may hold one of the receiver's threads, and for how long.

gRPC's synchronous server gives every call a thread from a fixed pool for as long as the handler
runs, and a handler blocked reading the next message waits for ever if the peer sends nothing. So
a client that opens calls and then stays silent (no certificate needed on the ticket port) could
hold every thread, and replication to the host would stop. Two pieces prevent it:

* :class:`Watchdog` -- one thread that cancels a call when its deadline passes. A call must
  send its first message within :data:`FIRST_MESSAGE_TIMEOUT` and each next one within
  :data:`IDLE_TIMEOUT` (the handler "touches" its deadline at every message, and suspends it
  while it works on its own, e.g. applying a committed cycle). A cancelled call's blocked read
  raises, the handler returns, the thread is free.
* :class:`Admission` -- counts calls. Before a call has proved who it is (the ticket port reads
  the relationship from the first message) it counts against a per-address cap and a
  port-wide cap that leaves part of the pool to authenticated work; once authorised it counts
  against a per-source-host cap, so one compromised host cannot take every thread either. A
  call over a cap is refused at once with RESOURCE_EXHAUSTED (the sender retries later), never
  queued behind the others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sitepair.errors import ResourceExhausted

log = logging.getLogger("sitepair.agent.receiver")

#: Time from the call's start to its first message (a cycle header, a state or digests request).
FIRST_MESSAGE_TIMEOUT = 10.0
#: Longest silence between two messages of a cycle. A sender at a low bandwidth limit sends a
#: ~1 MiB batch in well under a minute even at 32 KiB/s.
IDLE_TIMEOUT = 120.0


class _Cancellable(Protocol):
    def cancel(self) -> Any: ...


class Deadline:
    """One call's deadline in a :class:`Watchdog`."""

    def __init__(self, dog: Watchdog, target: _Cancellable, timeout: float) -> None:
        self._dog = dog
        self.target: _Cancellable | None = target
        self.timeout = timeout
        self.expires_at = dog.now() + timeout
        self.active = True
        self.expired = False

    def touch(self, timeout: float | None = None) -> None:
        """Push the deadline ``timeout`` (default: the last one used) into the future."""
        if timeout is not None:
            self.timeout = timeout
        self._dog.rearm(self, self._dog.now() + self.timeout)

    def suspend(self) -> None:
        """The handler works on its own for a while (no deadline until :meth:`touch`)."""
        self._dog.rearm(self, None)

    def done(self) -> None:
        self.active = False
        self._dog.rearm(self, None)
        # The heap keeps this entry until its time passes (lazy deletion); it must not keep
        # the call: gRPC holds an ended call's HTTP/2 stream open while its context lives, and
        # a connection kept across calls would run out of streams.
        self.target = None


class Watchdog:
    """Cancels calls whose deadline passed; one daemon thread for all calls of a receiver."""

    def __init__(
        self, *, now: Callable[[], float] = time.monotonic, name: str = "watchdog"
    ) -> None:
        self.now = now
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, target: _Cancellable, timeout: float) -> Deadline:
        d = Deadline(self, target, timeout)
        self.rearm(d, d.expires_at)
        return d

    def rearm(self, d: Deadline, expires_at: float | None) -> None:
        with self._cond:
            # Lazy deletion: an entry is live only while its time equals d.expires_at.
            d.expires_at = expires_at if expires_at is not None else float("inf")
            if expires_at is not None and d.active:
                heapq.heappush(self._heap, (expires_at, next(self._counter), d))
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            due: list[Deadline] = []
            with self._cond:
                if self._closed:
                    return
                now = self.now()
                while self._heap and self._heap[0][0] <= now:
                    at, _, d = heapq.heappop(self._heap)
                    if d.active and d.expires_at == at:
                        d.active = False
                        d.expired = True
                        due.append(d)
                wait = self._heap[0][0] - now if self._heap else None
                if not due:
                    self._cond.wait(wait)
                    continue
            for d in due:
                if d.target is None:
                    continue
                self.cancelled += 1
                try:
                    d.target.cancel()
                except Exception:  # a call that already ended may refuse to be cancelled
                    log.debug("cancelling an expired call failed", exc_info=True)


class Ticket:
    """One admitted call; :meth:`authenticated` moves it from its address to its source host."""

    def __init__(self, admission: Admission, address: str) -> None:
        self._admission = admission
        self.address: str | None = address
        self.host: str | None = None

    def authenticated(self, host: str) -> None:
        self._admission._authenticated(self, host)

    def release(self) -> None:
        self._admission._release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Caps on the calls of one port (see the module docstring)."""

    def __init__(self, *, per_address: int, unauthenticated: int, per_host: int) -> None:
        self.per_address = per_address
        self.unauthenticated = unauthenticated
        self.per_host = per_host
        self._lock = threading.Lock()
        self._by_address: dict[str, int] = {}
        self._by_host: dict[str, int] = {}
        self._pending = 0
        self.refused = 0

    def enter(self, address: str, *, host: str | None = None) -> Ticket:
        """Admit a call; raise ResourceExhausted if over a cap. ``host`` is the source host when
        the transport already proved it (a verified client certificate): the call counts
        against that host at once instead of as unauthenticated."""
        if host is not None:
            ticket = Ticket(self, address)
            ticket.address = None
            ticket.authenticated(host)
            return ticket
        with self._lock:
            if self._pending >= self.unauthenticated:
                self.refused += 1
                raise ResourceExhausted(
                    "the replica host is busy with calls that have not authenticated yet",
                    hint="retry shortly",
                )
            if self._by_address.get(address, 0) >= self.per_address:
                self.refused += 1
                raise ResourceExhausted(
                    f"too many calls from {address} are waiting to authenticate",
                    hint="retry shortly",
                )
            self._pending += 1
            self._by_address[address] = self._by_address.get(address, 0) + 1
        return Ticket(self, address)

    def _drop_address(self, t: Ticket) -> None:
        if t.address is None:
            return
        n = self._by_address.get(t.address, 0) - 1
        if n > 0:
            self._by_address[t.address] = n
        else:
            self._by_address.pop(t.address, None)
        self._pending -= 1
        t.address = None

    def _authenticated(self, t: Ticket, host: str) -> None:
        with self._lock:
            if t.host is not None:
                return
            if self._by_host.get(host, 0) >= self.per_host:
                self.refused += 1
                raise ResourceExhausted(
                    f"host {host} already has {self.per_host} replication calls in progress "
                    "on this port",
                    hint="the sender retries when one of them ends",
                )
            self._drop_address(t)
            t.host = host
            self._by_host[host] = self._by_host.get(host, 0) + 1

    def _release(self, t: Ticket) -> None:
        with self._lock:
            self._drop_address(t)
            if t.host is not None:
                n = self._by_host.get(t.host, 0) - 1
                if n > 0:
                    self._by_host[t.host] = n
                else:
                    self._by_host.pop(t.host, None)
                t.host = None

    def counts(self) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self._pending, dict(self._by_host)


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:10.0.0.5:51234`` -> ``ipv4:10.0.0.5``)."""
    if peer.startswith("ipv6:["):
        return peer[: peer.find("]") + 1] if "]" in peer else peer
    head, _, tail = peer.rpartition(":")
    return head if head and tail.isdigit() else peer
