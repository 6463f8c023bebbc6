"""A real notify socket for tests: the datagram socket systemd would bind for a service."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable


class NotifySocket:
    """Binds a ``SOCK_DGRAM`` Unix socket (abstract namespace by default) and reads messages."""

    def __init__(self, path: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"sitepair-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], *, timeout: float = 60
    ) -> dict[str, str]:
        """Read messages until one satisfies ``predicate`` (a deadline, not a timing check)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such notify message; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            if predicate(msg):
                return msg

    def close(self) -> None:
        self.sock.close()
