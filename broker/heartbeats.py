"""Heartbeats into the store, in batches, and the monitor that notices silent servers.

Thousands of agents heartbeat every few seconds; writing each one in its own transaction would
spend the broker's time in fsync. :class:`HeartbeatWriter` keeps the latest heartbeat per server
and writes all of them in one transaction every ``flush_interval`` (50 ms by default), so the
cost per heartbeat falls as load rises while the heartbeat-to-store latency stays bounded.
:class:`LivenessMonitor` marks a server disconnected, and closes its stream, after it has missed
``missed`` heartbeats in a row; when brokers share a store, only the leader sweeps (it also
catches the servers of a broker that died).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.leadership import Leader
from broker.store.models import HeartbeatRecord
from broker.store.sqlite import Tx
from sitepair.clock import Clock

log = logging.getLogger("sitepair.broker.heartbeats")


class HeartbeatWriter:
    def __init__(self, store: Store, *, flush_interval: float = 0.05) -> None:
        self._store = store
        self._interval = flush_interval
        self._pending: dict[str, HeartbeatRecord] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self.batches = 0
        self.written = 0

    def submit(self, record: HeartbeatRecord) -> None:
        self._pending[record.server_id] = record
        self._wakeup.set()

    async def flush(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = list(self._pending.values()), {}

        def write(tx: Tx) -> None:
            tx.record_heartbeats(batch)

        await self._store.writing(write)
        self.batches += 1
        self.written += len(batch)
        return len(batch)

    async def run(self) -> None:
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Gather what arrives during the window into the same transaction.
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:
                log.exception("writing heartbeats failed")
        await self.flush()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()


class LivenessMonitor:
    def __init__(
        self,
        store: Store,
        sessions: SessionRegistry,
        clock: Clock,
        *,
        interval: float,
        missed: int,
        leader: Leader | None = None,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._interval = interval
        self._missed = missed
        self._leader = leader
        self._stop = asyncio.Event()
        #: Sweeps done (a broker that is not the leader does none).
        self.sweeps = 0

    async def check(self) -> list[str]:
        """Disconnect servers silent for longer than ``missed`` intervals; returns their ids."""
        now = self._clock.now()
        cutoff = now - self._interval * self._missed

        def sweep(tx: Tx) -> list[str]:
            silent = tx.connected_servers_silent_since(cutoff)
            tx.set_servers_disconnected(silent, now)
            return silent

        silent = await self._store.writing(sweep)
        for server_id in silent:
            log.warning(
                "server missed its heartbeats; marked disconnected",
                extra={"fields": {"server": server_id, "missed": self._missed}},
            )
            self._sessions.close(server_id)
        return silent

    async def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval / 2)
            if self._stop.is_set():
                return
            if self._leader is not None and not self._leader.is_leader:
                continue
            try:
                self.sweeps += 1
                await self.check()
            except Exception:
                log.exception("liveness check failed")

    async def shutdown(self) -> None:
        self._stop.set()
