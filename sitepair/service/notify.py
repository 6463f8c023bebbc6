"""systemd's notify protocol, spoken directly: one datagram to ``$NOTIFY_SOCKET`` per message.

A service started with ``Type=notify`` gets ``NOTIFY_SOCKET`` in its environment: a path of a
``SOCK_DGRAM`` Unix socket, or an abstract-namespace address written with a leading ``@``. Each
datagram holds newline-separated ``KEY=VALUE`` lines (``READY=1``, ``WATCHDOG=1``,
``STOPPING=1``, ``RELOADING=1``, ``STATUS=...``). The protocol is small and stable (see
``sd_notify(3)``), so no C library is needed. With ``WatchdogSec=`` set, systemd also passes
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``): the service must send ``WATCHDOG=1`` within that time.

Without ``NOTIFY_SOCKET`` (a daemon run by hand, or by another service manager) every call is a
no-op. A failed send is logged once and never stops the daemon: notifications are advice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("sitepair.service")


class Notifier:
    """Sends notify messages to one socket address (or nowhere, when ``address`` is None)."""

    def __init__(self, address: str | None, *, watchdog_usec: int = 0) -> None:
        self.address = address or None
        #: The watchdog period systemd asked for, in microseconds; 0 = no watchdog.
        self.watchdog_usec = watchdog_usec if self.address else 0
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment describes (a no-op one outside systemd)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for; a child that inherited the
        # environment must not ping on its parent's behalf.
        if raw.isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float:
        """Seconds between ``WATCHDOG=1`` pings: half the period, as sd_watchdog_enabled(3)
        advises; 0 when there is no watchdog."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec > 0 else 0.0

    def send(self, **fields: str) -> bool:
        """Send one message of ``KEY=VALUE`` lines; True if it was delivered."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode()
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(target)
                s.sendall(payload)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify the service manager",
                    extra={"fields": {"socket": self.address, "error": str(exc)}},
                )
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+) tell this reload from an earlier one.
        usec = str(time.monotonic_ns() // 1000)  # CLOCK_MONOTONIC on Linux
        return self.send(RELOADING="1", MONOTONIC_USEC=usec, STATUS="reloading configuration")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=status)


def _one_line(value: str) -> str:
    """A field value on one line: a newline would start a new field."""
    return " ".join(value.splitlines())
