"""qemu_guest_agent.run_program against what can sit at the other end of a VM's guest agent
channel besides a well-behaved qemu-ga: nothing (no agent running in the guest), and a hostile
guest whose agent answers with garbage. The real qemu-ga is in tests/qemu/test_guest_run.py.

The channel is a unix socket, as QEMU's chardev is; the test plays the guest's end of it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.hosts import qemu_guest_agent
from agent.hosts.base import GuestProgramResult
from sitepair.errors import FailedPrecondition

Replies = Callable[[dict[str, object]], list[bytes]]


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[Callable[[Replies], Path]]:
    """``channel(replies)``: a socket whose peer answers each request with ``replies(request)``
    (raw lines); ``[]`` answers nothing."""
    servers: list[socket.socket] = []

    def make(replies: Replies) -> Path:
        path = tmp_path / f"qga-{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def serve() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        for reply in replies(json.loads(line)):
                            try:
                                conn.sendall(reply)
                            except OSError:  # the agent side hung up on a hostile reply
                                return

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield make
    for s in servers:
        s.close()


def hostile(exec_reply: bytes, status_reply: bytes = b"") -> Replies:
    """An agent that syncs properly, then answers guest-exec and guest-exec-status as given."""

    def replies(request: dict[str, object]) -> list[bytes]:
        command = request["execute"]
        if command == "guest-sync":
            token = request["arguments"]["id"]  # type: ignore[index]
            return [json.dumps({"return": token}).encode() + b"\n"]
        if command == "guest-exec":
            return [exec_reply]
        return [status_reply]

    return replies


def run(path: Path, timeout: float = 10) -> object:
    return qemu_guest_agent.run_program(
        path, vm="web01-test", program="/bin/sh", args=["-c", "true"], timeout=timeout
    )


def test_a_guest_without_a_running_agent_is_named(
    channel: Callable[[Replies], Path],
) -> None:
    with pytest.raises(FailedPrecondition) as err:
        run(channel(lambda request: []))
    assert "qemu-guest-agent is not running in the guest" in str(err.value)
    assert "to run programs in it" in str(err.value)


def test_no_channel_at_all_is_named(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"guest agent channel .* cannot be opened"):
        run(tmp_path / "absent.sock")


@pytest.mark.parametrize(
    ("exec_reply", "status_reply", "problem"),
    [
        (b"[1, 2]\n", b"", "answered guest-exec with"),
        (b'{"return": {"pid": "7"}}\n', b"", "not a pid"),
        (b"{not json\n", b"", "running /bin/sh through the guest agent failed"),
        (b'{"return": {"pid": 7}}\n', b'{"return": {"exited": true}}\n', "without a status"),
        (
            b'{"return": {"pid": 7}}\n',
            b'{"return": {"exited": true, "exitcode": 0, "out-data": "%%%"}}\n',
            "out-data is not base64",
        ),
        (
            b'{"return": {"pid": 7}}\n',
            b'{"return": {"exited": true, "exitcode": 0, "err-data": 5}}\n',
            "err-data is not text",
        ),
        (b'{"return": {"pid": 7}}\n', b"x" * (49 << 20) + b"\n", "over-long line"),
    ],
)
def test_a_hostile_guest_agent_gets_a_clear_error(
    channel: Callable[[Replies], Path], exec_reply: bytes, status_reply: bytes, problem: str
) -> None:
    with pytest.raises(FailedPrecondition, match=problem):
        run(channel(hostile(exec_reply, status_reply)))


def test_only_the_last_64_kib_of_output_is_kept(channel: Callable[[Replies], Path]) -> None:
    out = base64.b64encode(b"a" * 70_000).decode()
    err = base64.b64encode(b"\xffthe end").decode()
    status = {"return": {"exited": True, "exitcode": 0, "out-data": out, "err-data": err}}
    result = run(channel(hostile(b'{"return": {"pid": 7}}\n', json.dumps(status).encode() + b"\n")))
    assert isinstance(result, GuestProgramResult)
    assert len(result.output.encode()) == 64 * 1024 - 1 + 3  # \xff became U+FFFD (3 bytes)
    assert result.output.endswith("a\ufffdthe end") and result.exit_status == 0
