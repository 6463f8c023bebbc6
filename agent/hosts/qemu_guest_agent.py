"""Quiescing a QEMU guest through qemu-guest-agent, for application-consistent cuts.

Every VM the qemu backend starts has a virtio-serial port named ``org.qemu.guest_agent.0``,
connected to ``run/qga.sock`` on the host. When the guest runs qemu-guest-agent, a cut asks it
to freeze the guest's filesystems (``guest-fsfreeze-freeze``: each is flushed and writes to it
block, as VSS does on Windows) just before the QMP snapshot transaction and to thaw them just
after, so the guest is frozen for the transaction only.

The protocol is JSON, one object per line, with no greeting (unlike QMP, so ``qemu.qmp`` does
not speak it): a client first sends ``guest-sync`` with a fresh id and discards everything until
the reply carrying that id, which also tells whether an agent is there at all. A guest without
an agent never answers: that takes :data:`SYNC_TIMEOUT` and becomes
:class:`~agent.hosts.base.QuiesceFailed`, and the replication loop takes a crash-consistent cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.hosts.base import QuiesceFailed

log = logging.getLogger("sitepair.agent.qemu")

#: How long a guest agent has to answer guest-sync (none running: the cut goes on without it).
SYNC_TIMEOUT = 3.0
#: How long freezing may take (flushing every filesystem of the guest).
FREEZE_TIMEOUT = 60.0
THAW_TIMEOUT = 30.0
_MAX_LINE = 1 << 20


class GuestAgent:
    """One connection to a guest's qemu-guest-agent."""

    def __init__(self, path: Path, *, vm: str) -> None:
        self.vm = vm
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        try:
            self._sock.settimeout(SYNC_TIMEOUT)
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise QuiesceFailed(
                f"VM {vm}: the guest agent channel {path} cannot be opened: {exc}"
            ) from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the guest agent channel closed")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise ConnectionError("the guest agent sent an over-long line")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip(b"\xff \r\t")

    def _call(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(deadline)
            if not line:
                continue
            reply = json.loads(line)
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise QuiesceFailed(f"VM {self.vm}: the guest agent refused {command}: {desc}")
            return reply.get("return")

    def sync(self) -> None:
        """Make sure an agent is there and the channel holds no stale replies."""
        token = secrets.randbelow(2**31 - 1) + 1  # not a secret: secrets is just the RNG at hand
        deadline = time.monotonic() + SYNC_TIMEOUT
        try:
            self._sock.sendall(
                json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n"
            )
            while True:
                line = self._readline(deadline)
                if not line:
                    continue
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("return") == token:
                        return
        except (TimeoutError, OSError, ConnectionError) as exc:
            raise QuiesceFailed(
                f"VM {self.vm}: no guest agent answered within {SYNC_TIMEOUT:.0f} s "
                "(qemu-guest-agent is not running in the guest)",
                hint="install and start qemu-guest-agent in the guest for application-consistent "
                "recovery points; until then they are crash-consistent",
            ) from exc

    def freeze(self) -> int:
        try:
            frozen = self._call("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT)
        except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
            with contextlib.suppress(QuiesceFailed):
                self.thaw()  # a freeze that timed out may have frozen some filesystems
            raise QuiesceFailed(
                f"VM {self.vm}: freezing the guest's filesystems failed: {exc}"
            ) from exc
        return int(frozen or 0)

    def thaw(self) -> int:
        """Thaw, retrying: a guest left frozen stops writing for good."""
        last: Exception | None = None
        for _ in range(3):
            try:
                return int(self._call("guest-fsfreeze-thaw", None, THAW_TIMEOUT) or 0)
            except (QuiesceFailed, TimeoutError, OSError, ConnectionError, ValueError) as exc:
                last = exc
        log.error(
            "the guest's filesystems may still be frozen",
            extra={"fields": {"vm": self.vm, "error": str(last)}},
        )
        raise QuiesceFailed(f"VM {self.vm}: thawing the guest's filesystems failed: {last}")


@contextlib.contextmanager
def frozen(path: Path, *, vm: str) -> Iterator[int]:
    """The guest's filesystems frozen for the block (yields how many); QuiesceFailed when no
    agent answers or the freeze fails, with nothing left frozen."""
    agent = GuestAgent(path, vm=vm)
    try:
        agent.sync()
        count = agent.freeze()
        try:
            yield count
        finally:
            agent.thaw()
    finally:
        agent.close()
