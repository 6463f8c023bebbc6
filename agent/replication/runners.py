"""The primary side of the replication service: one runner per protected VM.

Each source relationship (this host replicates a VM to a replica host) has a
:class:`~agent.replication.engine.SourceRelationship` and an asyncio task, its runner, that
starts a cycle every copy-frequency interval (counting the intervals a slow cycle overran as
missed), retries after a failure, goes crash-consistent for a cycle when the guest cannot be
quiesced, and stops for good when the replica reports a higher epoch (this host was failed over
from: fenced). The cycles themselves run in threads; so does every call to the state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

from agent.hosts.base import HostBackend, QuiesceFailed
from agent.identity import AgentIdentity
from agent.replication.engine import SourceRelationship
from agent.replication.offline import export_cut
from agent.replication.state import PendingCycle, ReplicationState, SenderState, SourceConfig
from agent.replication.stats import NO_OBSERVER, CycleObserver
from agent.replication.throttle import TokenBucket
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, SitepairError, StaleEpoch
from sitepair.v1 import control_pb2, replication_pb2

log = logging.getLogger("sitepair.agent.replication")

#: After a failed cycle, retry after this long (capped by the copy frequency).
RETRY_AFTER = 10.0


class SourceRunners:
    """The runners of this host's source relationships, by relationship id. ``tickets`` gives
    a fresh broker ticket for a relationship (ticket authentication); ``host_bucket`` limits
    the bandwidth of all of them together."""

    def __init__(
        self,
        *,
        state: ReplicationState,
        backend: HostBackend,
        identity: Callable[[], AgentIdentity],
        clock: Clock,
        work_dir: Path,
        tickets: Callable[[str], str],
        adaptive_compression: bool,
    ) -> None:
        self.state = state
        self.backend = backend
        self.identity = identity
        self.clock = clock
        self.work_dir = work_dir
        self.tickets = tickets
        self.adaptive_compression = adaptive_compression
        self.host_bucket = TokenBucket(0)
        #: Told of every relationship's cycles (the agent's metrics, :mod:`agent.exporter`).
        self.observer: CycleObserver = NO_OBSERVER
        self.sources: dict[str, SourceRelationship] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._stop = asyncio.Event()

    def retire(self, rel: str) -> None:
        """Make the running :class:`SourceRelationship` of ``rel`` refuse further work (a new
        configuration takes over); its task goes on until :meth:`stop`."""
        current = self.sources.get(rel)
        if current is not None:
            current.retire()

    async def stop(self, rel: str, *, retire: bool = False) -> bool:
        """Cancel the runner of ``rel`` and forget its relationship (retired too with
        ``retire``); the configuration stays in the state store. True if one was running."""
        task = self._tasks.pop(rel, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        current = self.sources.pop(rel, None)
        if current is not None:
            if retire:
                current.retire()
            current.stop()
        return current is not None

    async def shutdown(self) -> None:
        """Cancel every runner and wait for them (a cycle in a thread ends on its own)."""
        self._stop.set()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        for rel in self.sources.values():
            rel.stop()

    def set_paused(self, rel: str, paused: bool) -> None:
        """Pause or resume ``rel`` (blocking: SQLite); the runner skips its cycles while paused."""
        self.state.update_sender(rel, lambda s: dataclasses.replace(s, paused=paused))

    async def start(self, source: SourceConfig, sender: SenderState) -> None:
        """Start replicating ``source`` (not to a host removed from the vault)."""
        if await asyncio.to_thread(self.state.is_revoked, source.replica_host):
            log.warning(
                "not replicating to a host removed from the vault",
                extra={
                    "fields": {"relationship": source.relationship, "replica": source.replica_host}
                },
            )
            return
        rel = SourceRelationship(
            source,
            backend=self.backend,
            state=self.state,
            identity=self.identity,
            clock=self.clock,
            work_dir=self.work_dir,
            ticket_provider=self._ticket_provider(source) if source.auth == "ticket" else None,
            host_bucket=self.host_bucket,
            tracker=sender.tracker,
            adaptive_compression=self.adaptive_compression,
        )
        rel.observer = self.observer
        self.sources[source.relationship] = rel
        self._wake[source.relationship] = asyncio.Event()
        self._tasks[source.relationship] = asyncio.create_task(
            self._run(rel), name=f"replicate-{source.relationship}"
        )

    def _ticket_provider(self, source: SourceConfig) -> Callable[[], str]:
        def provide() -> str:
            return self.tickets(source.relationship)

        return provide

    async def _run(self, rel: SourceRelationship) -> None:
        cfg = rel.config
        wake = self._wake[cfg.relationship]
        sender = await asyncio.to_thread(self.state.sender, cfg.relationship)
        next_at = self.clock.now()
        if sender.initial_method == "SCHEDULED" and sender.initial_at:
            next_at = max(next_at, sender.initial_at)
        last_app = 0.0
        while not self._stop.is_set():
            delay = max(0.0, next_at - self.clock.now())
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
            sender = await asyncio.to_thread(self.state.sender, cfg.relationship)
            if sender.paused:
                rel.stats.state = control_pb2.STATE_PAUSED
                next_at = self.clock.now() + cfg.copy_frequency
                continue
            started = self.clock.now()
            app = (
                bool(cfg.app_consistent_interval)
                and started - last_app >= cfg.app_consistent_interval
            )
            try:
                if sender.initial_method == "OFFLINE" and not sender.exported:
                    await asyncio.to_thread(self._export, rel, sender)
                result = await asyncio.to_thread(rel.run_cycle, app_consistent=app)
                if app and result is not None:
                    last_app = started
                    rel.stats.last_app_consistent_error = ""
            except QuiesceFailed as exc:
                # An application-consistent point is not worth a stalled replica: this cycle
                # goes on crash-consistent at once, the next application-consistent attempt
                # comes after the interval, and the operator sees why in the log.
                log.warning(
                    "application-consistent cut failed; this cycle is crash-consistent",
                    extra={"fields": {"relationship": cfg.relationship, "error": str(exc)}},
                )
                rel.stats.app_consistent_failures += 1
                rel.stats.last_app_consistent_error = str(exc)
                last_app = started
                next_at = self.clock.now()
                continue
            except StaleEpoch as exc:
                log.error(
                    "relationship fenced; replication stopped on this host",
                    extra={"fields": {"relationship": cfg.relationship, "error": str(exc)}},
                )
                return
            except SitepairError as exc:
                log.warning(
                    "cycle will be retried",
                    extra={"fields": {"relationship": cfg.relationship, "error": str(exc)}},
                )
                next_at = self.clock.now() + min(RETRY_AFTER, cfg.copy_frequency)
                continue
            elapsed = self.clock.now() - started
            overran = math.floor(elapsed / cfg.copy_frequency) if cfg.copy_frequency > 0 else 0
            rel.stats.cycles_missed += overran
            next_at = started + cfg.copy_frequency * (overran + 1)

    def _export(self, rel: SourceRelationship, sender: SenderState) -> None:
        cfg = rel.config
        path = sender.export_path
        if not path:
            raise FailedPrecondition("offline initial replication needs an export path")
        cut = self.backend.take_cut(cfg.vm_id)
        export_cut(cut, Path(path), relationship=cfg.relationship, vm_id=cfg.vm_id, epoch=cfg.epoch)
        pending = PendingCycle(sequence=1, cut_id=cut.cut_id, kind=replication_pb2.INITIAL)
        self.state.update_sender(
            cfg.relationship, lambda s: dataclasses.replace(s, exported=True, cycle=pending)
        )
        rel.stats.state = control_pb2.STATE_WAITING_FOR_IMPORT
        log.info(
            "initial copy exported",
            extra={"fields": {"relationship": cfg.relationship, "path": path}},
        )

    def wake(self, relationship: str) -> None:
        """Run ``relationship``'s next cycle now (after a resume)."""
        event = self._wake.get(relationship)
        if event is not None:
            event.set()
