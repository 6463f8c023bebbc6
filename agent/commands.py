"""Executing broker commands exactly once, with the journal as the memory of what ran.

Handlers are registered by command kind (the ``body`` oneof name of ``sitepair.v1.Command``)
and return a ``sitepair.v1.CommandResult`` whose ``body`` case is that same kind. The executor
answers every delivery: a first delivery is journaled as running, acknowledged as RECEIVED,
executed, journaled with its outcome and acknowledged with it; a repeated delivery is answered
from the journal without running anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.journal import CommandJournal
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound, SitepairError
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.agent.commands")

Handler = Callable[[control_pb2.Command], Awaitable[control_pb2.CommandResult]]
Ack = Callable[[control_pb2.CommandAck], Awaitable[None]]

MAX_SCRIPT_OUTPUT = 64 * 1024


class CommandExecutor:
    def __init__(self, journal: CommandJournal, clock: Clock) -> None:
        self._journal = journal
        self._clock = clock
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._order: dict[str, tuple[asyncio.Lock, int]] = {}  # lock and its users

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    async def handle(self, command: control_pb2.Command, ack: Ack) -> None:
        """Answer one delivery of ``command``; ``ack`` sends an acknowledgement to the broker."""
        kind = command.WhichOneof("body") or "unknown"
        if command.id in self._running:
            await ack(
                control_pb2.CommandAck(command_id=command.id, state=control_pb2.CommandAck.RECEIVED)
            )
            return  # already running in this process: its outcome will be acknowledged
        # Commands of one relationship run one at a time, in the order they arrived: after a
        # reconnect the broker redelivers, say, a ConfigureReplica and the RemoveRelationship
        # that undoes it together, and running them concurrently could leave the grant behind.
        # The lock is taken before the first await, and asyncio locks are FIFO, so tasks
        # created in delivery order run in delivery order.
        key = _relationship_of(command)
        if not key:
            await self._handle(command, ack, kind)
            return
        lock, users = self._order.get(key, (asyncio.Lock(), 0))
        self._order[key] = (lock, users + 1)
        try:
            async with lock:
                await self._handle(command, ack, kind)
        finally:
            lock, users = self._order[key]
            if users > 1:
                self._order[key] = (lock, users - 1)
            else:
                del self._order[key]

    async def _handle(self, command: control_pb2.Command, ack: Ack, kind: str) -> None:
        seen = await asyncio.to_thread(self._journal.begin, command.id, kind, self._clock.now())
        if seen is not None:
            if seen.state == "running":
                await ack(
                    control_pb2.CommandAck(
                        command_id=command.id, state=control_pb2.CommandAck.RECEIVED
                    )
                )
                return
            log.info(
                "command redelivered; answering from the journal",
                extra={"fields": {"command": command.id, "kind": kind, "state": seen.state}},
            )
            await ack(
                control_pb2.CommandAck(
                    command_id=command.id,
                    state=control_pb2.CommandAck.SUCCEEDED
                    if seen.state == "succeeded"
                    else control_pb2.CommandAck.FAILED,
                    result=seen.command_result(),
                    error=seen.error,
                )
            )
            return
        await ack(
            control_pb2.CommandAck(command_id=command.id, state=control_pb2.CommandAck.RECEIVED)
        )
        task = asyncio.current_task()
        assert task is not None
        self._running[command.id] = task
        try:
            ok, result, error = await self._execute(kind, command)
        finally:
            self._running.pop(command.id, None)
        await asyncio.to_thread(
            self._journal.finish,
            command.id,
            ok=ok,
            now=self._clock.now(),
            result=result,
            error=error,
        )
        await ack(
            control_pb2.CommandAck(
                command_id=command.id,
                state=control_pb2.CommandAck.SUCCEEDED if ok else control_pb2.CommandAck.FAILED,
                result=result,
                error=error,
            )
        )

    async def _execute(
        self, kind: str, command: control_pb2.Command
    ) -> tuple[bool, control_pb2.CommandResult, str]:
        """Run the handler of ``kind``: (succeeded, its result, the error when it failed)."""
        none = control_pb2.CommandResult()
        handler = self._handlers.get(kind)
        if handler is None:
            return False, none, f"this agent does not know the command {kind!r} (upgrade it?)"
        log.info("command started", extra={"fields": {"command": command.id, "kind": kind}})
        try:
            result = await handler(command)
        except SitepairError as exc:
            log.warning(
                "command failed", extra={"fields": {"command": command.id, "error": str(exc)}}
            )
            return False, none, str(exc)
        except Exception as exc:
            log.exception("command crashed", extra={"fields": {"command": command.id}})
            return False, none, f"internal error in the agent: {type(exc).__name__}: {exc}"
        answered = result.WhichOneof("body")
        if answered != kind:
            log.error(
                "command handler answered with the wrong result",
                extra={"fields": {"command": command.id, "kind": kind, "result": answered}},
            )
            return False, none, f"internal error in the agent: a {answered} result for {kind}"
        log.info("command succeeded", extra={"fields": {"command": command.id, "kind": kind}})
        return True, result, ""


def _relationship_of(command: control_pb2.Command) -> str:
    """The relationship a command acts on ("" for host-wide commands)."""
    kind = command.WhichOneof("body")
    if kind is None:
        return ""
    return str(getattr(getattr(command, kind), "relationship_id", "") or "")


async def run_script(
    scripts_dir: Path, request: control_pb2.RunScript
) -> control_pb2.RunScriptResult:
    """Run a script the operator placed in the agent's scripts folder, with a timeout.

    Only a bare file name inside ``scripts_dir`` is accepted, so the broker cannot make an agent
    run an arbitrary program. Output (stdout and stderr, interleaved) is kept up to 64 KiB.
    A non-zero exit status or a timeout is a failure whose message carries the output's tail,
    unless the request asks for them in the result (``report_exit``: a drill's check).
    """
    name = request.script
    if not name or Path(name).name != name or name.startswith("."):
        raise InvalidArgument(f"script name {name!r} must be a file name in the scripts folder")
    path = scripts_dir / name
    if not path.is_file():
        raise NotFound(f"no script {name!r} in {scripts_dir}")
    timeout = request.timeout_seconds or 300
    argv = [str(path), *request.args]
    if path.suffix == ".py":
        argv = [sys.executable, *argv]
    elif sys.platform == "win32" and path.suffix.lower() == ".ps1":  # pragma: no cover
        argv = ["powershell", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", *argv]
    env = {**os.environ, **dict(request.env)}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=str(scripts_dir),
    )
    out = bytearray()  # what the script said so far, its last MAX_SCRIPT_OUTPUT bytes kept

    async def collect() -> None:
        assert proc.stdout is not None
        while data := await proc.stdout.read(65536):
            out.extend(data)
            if len(out) > 2 * MAX_SCRIPT_OUTPUT:
                del out[:-MAX_SCRIPT_OUTPUT]

    try:
        await asyncio.wait_for(asyncio.gather(collect(), proc.wait()), timeout=timeout)
    except TimeoutError:
        # What was read before the timeout is kept: a hung script's last words say where.
        proc.kill()
        await proc.wait()
        with contextlib.suppress(TimeoutError):  # a child of the script may hold the pipe
            await asyncio.wait_for(collect(), timeout=5)
        if request.report_exit:
            return control_pb2.RunScriptResult(
                script=name,
                exit_status=proc.returncode if proc.returncode is not None else -9,
                output=out[-MAX_SCRIPT_OUTPUT:].decode(errors="replace"),
                timed_out=True,
            )
        tail = out[-2000:].decode(errors="replace")
        raise FailedPrecondition(
            f"script {name} timed out after {timeout} s; output: {tail}"
        ) from None
    text = out[-MAX_SCRIPT_OUTPUT:].decode(errors="replace")
    status = await proc.wait()
    if status != 0 and not request.report_exit:
        raise FailedPrecondition(
            f"script {name} exited with status {status}; output: {text[-2000:]}"
        )
    return control_pb2.RunScriptResult(script=name, exit_status=status, output=text)
