"""A daemon's side of being a service: readiness, the watchdog, SIGHUP reload, stopping.

Both ``sitepair-broker serve`` and ``sitepair-agent run`` create one :class:`ServiceRuntime` on
their event loop. The daemon calls :meth:`ServiceRuntime.ready` once it honestly serves (the
broker: store open and ports listening; the agent: its replication ports listening), which sends
``READY=1`` and starts the watchdog task. The watchdog pings from the event loop itself, so a
loop that is stuck (blocked by a synchronous call, or spinning) stops the pings and systemd
restarts the daemon. SIGTERM/SIGINT call ``stop`` (the daemon's own shutdown path) after
``STOPPING=1``; SIGHUP runs ``reload`` between ``RELOADING=1`` and ``READY=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from sitepair import log as sitepair_log
from sitepair.errors import SitepairError
from sitepair.service.notify import Notifier

log = logging.getLogger("sitepair.service")

#: How often a daemon's status line is looked at for a change (``systemctl status``).
REFRESH_SECONDS = 5.0


class ServiceRuntime:
    def __init__(
        self,
        *,
        stop: Callable[[], None],
        reload: Callable[[], str] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """``stop`` asks the daemon to shut down; ``reload`` re-reads what can change without
        a restart and returns what it did (a short line for ``systemctl status``)."""
        self.notifier = notifier or Notifier.from_env()
        self._stop = stop
        self._reload = reload
        self._watchdog: asyncio.Task[None] | None = None
        self._ready_status = ""
        self._refresh: Callable[[], str] | None = None
        self._stopping = False

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon; SIGHUP reloads (where the platform has it)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(self.stop))
        hup = getattr(signal, "SIGHUP", None)
        if hup is not None and self._reload is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(hup, self.reload)

    def ready(self, status: str, *, refresh: Callable[[], str] | None = None) -> None:
        """The daemon serves: tell the service manager and start the watchdog pings.

        ``refresh``, if given, is asked for the status line every :data:`REFRESH_SECONDS`
        (and at each watchdog ping); a changed line is sent as ``STATUS=``."""
        self._ready_status = status
        self._refresh = refresh
        self.notifier.ready(status)
        log.info("service ready", extra={"fields": {"status": status}})
        interval = self.notifier.watchdog_interval
        if self.notifier.enabled and self._watchdog is None and (interval > 0 or refresh):
            every = min(interval, REFRESH_SECONDS) if interval > 0 else REFRESH_SECONDS
            self._watchdog = asyncio.get_running_loop().create_task(
                self._ping(every, watchdog=interval > 0), name="watchdog"
            )

    def status(self, status: str) -> None:
        self._ready_status = status
        self.notifier.status(status)

    def stop(self) -> None:
        """``STOPPING=1``, then the daemon's own shutdown (idempotent)."""
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping()
            self._stop()

    def reload(self) -> None:
        """Re-read the reloadable configuration; a bad file keeps the running configuration."""
        if self._reload is None or self._stopping:
            return
        self.notifier.reloading()
        try:
            done = self._reload()
        except (SitepairError, OSError) as exc:
            log.error(
                "configuration not reloaded: the running configuration stays",
                extra={"fields": {"error": str(exc)}},
            )
            done = f"reload refused: {exc}"
        self.notifier.ready(f"{self._ready_status}; {done}" if self._ready_status else done)

    async def close(self) -> None:
        """Stop the watchdog; say ``STOPPING=1`` if the daemon stopped on its own."""
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    async def _ping(self, every: float, *, watchdog: bool) -> None:
        while True:
            if watchdog:
                self.notifier.watchdog()
            if self._refresh is not None and not self._stopping:
                status = self._refresh()
                if status != self._ready_status:
                    self.status(status)
            await asyncio.sleep(every)


def log_reloader(load: Callable[[], sitepair_log.LogSettings]) -> Callable[[], str]:
    """A ``reload`` that re-reads the configuration with ``load`` and applies its ``[log]``
    section: level, format and file (reopened, for logrotate). Nothing else is reloaded."""

    def reload() -> str:
        settings = load()
        sitepair_log.configure(settings)
        log.info(
            "configuration reloaded",
            extra={"fields": {"log_level": settings.level, "log_file": settings.file or "stderr"}},
        )
        return f"log level {settings.level}"

    return reload
