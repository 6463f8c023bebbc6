"""Talking to qemu-guest-agent in a QEMU guest: quiescing it for application-consistent cuts,
and running a program in it (a DR drill's check inside a test VM).

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

:func:`run_program` starts a program with ``guest-exec`` (output captured) and polls
``guest-exec-status`` until it exited or the deadline passed. The agent hands the captured
output over only once the program exited, so a program that times out has none (and may go on
running in the guest: the protocol has no way to stop it). Everything the agent sends is the
guest's word, and the guest is not trusted: replies are bounded (:data:`_MAX_LINE`) and checked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.hosts.base import GuestProgramResult, QuiesceFailed
from sitepair.errors import FailedPrecondition

log = logging.getLogger("sitepair.agent.qemu")

#: How long a guest agent has to answer guest-sync (none running: the cut goes on without it).
SYNC_TIMEOUT = 3.0
#: How long freezing may take (flushing every filesystem of the guest).
FREEZE_TIMEOUT = 60.0
THAW_TIMEOUT = 30.0
#: How long one guest-exec or guest-exec-status call may take to be answered.
EXEC_CALL_TIMEOUT = 30.0
#: The output kept of a guest program: the last this many bytes of stdout then stderr.
MAX_OUTPUT = 64 * 1024
#: The longest reply line accepted: qemu-ga captures up to 16 MiB of each stream and sends it
#: base64-encoded in one line.
_MAX_LINE = 48 << 20
_QUIESCE_HINT = (
    "install and start qemu-guest-agent in the guest for application-consistent "
    "recovery points; until then they are crash-consistent"
)


class GarbledReply(ValueError):
    """The guest agent answered something the protocol does not allow."""


class GuestAgent:
    """One connection to a guest's qemu-guest-agent."""

    def __init__(
        self, path: Path, *, vm: str, error: type[FailedPrecondition] = QuiesceFailed
    ) -> None:
        self.vm = vm
        #: What the agent's failures raise (QuiesceFailed for cuts).
        self._error = error
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = bytearray()
        try:
            self._sock.settimeout(SYNC_TIMEOUT)
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise error(f"VM {vm}: the guest agent channel {path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _readline(self, deadline: float) -> bytes:
        # A reply may be megabytes (a program's output): the buffer grows in place and only
        # what arrived since the last look is searched for the end of the line.
        scanned = 0
        while (end := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the guest agent channel closed")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise ConnectionError("the guest agent sent an over-long line")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line.strip(b"\xff \r\t")

    def call(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
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
            if not isinstance(reply, dict):
                raise GarbledReply(f"the guest agent answered {command} with {line[:200]!r}")
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise self._error(f"VM {self.vm}: the guest agent refused {command}: {desc}")
            return reply.get("return")

    def sync(self, *, hint: str = _QUIESCE_HINT) -> None:
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
            raise self._error(
                f"VM {self.vm}: no guest agent answered within {SYNC_TIMEOUT:.0f} s "
                "(qemu-guest-agent is not running in the guest)",
                hint=hint,
            ) from exc

    def freeze(self) -> int:
        try:
            frozen = self.call("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT)
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
                return int(self.call("guest-fsfreeze-thaw", None, THAW_TIMEOUT) or 0)
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


def run_program(
    path: Path, *, vm: str, program: str, args: Sequence[str], timeout: float
) -> GuestProgramResult:
    """Run ``program`` with ``args`` in the guest behind the agent channel ``path`` and wait up
    to ``timeout`` seconds for it to exit. FailedPrecondition when no agent answers, when the
    agent refuses (no such program, guest-exec disabled in its configuration) or breaks the
    protocol."""
    agent = GuestAgent(path, vm=vm, error=FailedPrecondition)
    try:
        agent.sync(hint="install and start qemu-guest-agent in the guest to run programs in it")
        try:
            return _run(agent, program, args, timeout)
        except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
            raise FailedPrecondition(
                f"VM {vm}: running {program} through the guest agent failed: {exc}"
            ) from exc
    finally:
        agent.close()


def _run(
    agent: GuestAgent, program: str, args: Sequence[str], timeout: float
) -> GuestProgramResult:
    started = agent.call(
        "guest-exec",
        {"path": program, "arg": list(args), "capture-output": True},
        EXEC_CALL_TIMEOUT,
    )
    pid = started.get("pid") if isinstance(started, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise GarbledReply(f"guest-exec answered {str(started)[:200]!r}, not a pid")
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        status = agent.call("guest-exec-status", {"pid": pid}, EXEC_CALL_TIMEOUT)
        if not isinstance(status, dict):
            raise GarbledReply(f"guest-exec-status answered {str(status)[:200]!r}")
        if status.get("exited"):
            return _finished(status)
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning(
                "a program in the guest timed out",
                extra={"fields": {"vm": agent.vm, "program": program, "timeout": timeout}},
            )
            return GuestProgramResult(exit_status=-1, output="", timed_out=True)
        time.sleep(min(pause, left))
        pause = min(pause * 2, 1.0)


def _finished(status: dict[str, Any]) -> GuestProgramResult:
    """The result of an exited program from its guest-exec-status (GarbledReply if malformed)."""
    code = status.get("exitcode")
    signal = status.get("signal")
    if isinstance(code, int) and not isinstance(code, bool):
        exit_status = code
    elif isinstance(signal, int) and not isinstance(signal, bool):
        exit_status = 128 + signal  # killed by a signal: as a POSIX shell reports it
    else:
        raise GarbledReply("guest-exec-status reported an exit without a status")
    output = b""
    for stream in ("out-data", "err-data"):
        data = status.get(stream)
        if data is None:
            continue
        if not isinstance(data, str):
            raise GarbledReply(f"guest-exec-status {stream} is not text")
        try:
            output = (output + base64.b64decode(data, validate=True))[-MAX_OUTPUT:]
        except binascii.Error as exc:
            raise GarbledReply(f"guest-exec-status {stream} is not base64: {exc}") from exc
    return GuestProgramResult(
        exit_status=exit_status, output=output.decode(errors="replace"), timed_out=False
    )
