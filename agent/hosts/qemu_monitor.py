"""QMP, QEMU's machine protocol, through ``qemu.qmp`` (QEMU's own client library, LGPLv2+).

The backend's methods block (the agent calls them from worker threads), and ``qemu.qmp``'s
:class:`~qemu.qmp.QMPClient` is asyncio: :class:`QmpSession` gives one connection its own
event loop, so a backend operation is a plain sequence of calls on one connection (a QMP
monitor serves one client at a time; the backend serialises operations per VM). The GPL-licensed
``qemu.qmp.legacy`` wrapper is deliberately not used.

Errors: QEMU refusing a command becomes :class:`QemuRefused` (its ``desc`` is the operator's
message); a monitor that does not answer, or a QEMU that went away, becomes
:class:`~sitepair.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from sitepair.errors import DeadlineExceeded, FailedPrecondition, Unavailable

log = logging.getLogger("sitepair.agent.qemu")

#: How long one QMP command may take (block jobs are waited for separately).
COMMAND_TIMEOUT = 30.0


class QemuRefused(FailedPrecondition):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, desc: str, *, vm: str) -> None:
        super().__init__(f"QEMU of VM {vm} refused {command}: {desc}")
        self.command = command
        self.desc = desc


class QmpSession:
    """One QMP connection, used synchronously from one thread."""

    def __init__(self, socket: Path, *, vm: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.socket = socket
        self.vm = vm
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"sitepair-{vm}")
        try:
            self._run(self._client.connect(str(socket)), "connect")
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Any, what: str, timeout: float | None = None) -> Any:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"QEMU of VM {self.vm} did not answer {what} within {timeout or self.timeout:.0f} s"
            ) from exc
        except ExecuteError as exc:
            raise QemuRefused(what, str(exc), vm=self.vm) from exc
        except (ConnectError, QMPError, EOFError, OSError) as exc:
            raise Unavailable(
                f"the QEMU monitor of VM {self.vm} ({self.socket}) does not answer: {exc}",
                hint="is the VM running? see its log in the VM folder's run/ directory",
            ) from exc

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self._run(self._client.execute(command, arguments), command)

    def quit(self) -> None:
        """Ask QEMU to exit now (it closes its disks cleanly); the connection ends with it."""
        with contextlib.suppress(Unavailable, DeadlineExceeded):
            self._run(self._client.execute("quit"), "quit")

    def run_job(self, command: str, arguments: dict[str, Any], *, timeout: float) -> None:
        """Start a block job (``arguments`` must carry ``job-id``), wait for it to conclude,
        dismiss it, and raise if it failed."""
        job_id = str(arguments["job-id"])
        # blockdev-create jobs are never dismissed automatically (and take no such argument).
        extra = {} if command == "blockdev-create" else {"auto-dismiss": False}
        self.execute(command, {**arguments, **extra})
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            jobs = self.execute("query-jobs")
            job = next((j for j in jobs if j.get("id") == job_id), None)
            if job is None:
                raise FailedPrecondition(f"QEMU of VM {self.vm} lost block job {job_id}")
            if job["status"] == "concluded":
                self.execute("job-dismiss", {"id": job_id})
                if job.get("error"):
                    raise QemuRefused(command, str(job["error"]), vm=self.vm)
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(QemuRefused):
                    self.execute("job-cancel", {"id": job_id})
                raise DeadlineExceeded(
                    f"block job {job_id} of VM {self.vm} did not finish within {timeout:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), "disconnect", timeout=5)
        self._loop.close()


@contextlib.contextmanager
def session(socket: Path, *, vm: str, timeout: float = COMMAND_TIMEOUT) -> Iterator[QmpSession]:
    s = QmpSession(socket, vm=vm, timeout=timeout)
    try:
        yield s
    finally:
        s.close()
