"""Connected agents: one control-stream session per server, at most one at a time.

A session owns the outbound queue of its stream. When the same agent connects again (after a
network blip the old stream may linger until keepalive notices), the newer session replaces the
older one, which is told Goodbye(REPLACED) and ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.sessions")

#: Outbound messages a slow agent may have queued before its stream is closed as stuck.
MAX_OUTBOUND = 10_000


@dataclasses.dataclass(eq=False)
class AgentSession:
    server_id: str
    name: str
    site: str
    connected_at: float
    outbound: asyncio.Queue[control_pb2.BrokerMessage | None] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(MAX_OUTBOUND)
    )
    #: Commands already written to this stream (a command is sent at most once per stream).
    sent_commands: set[str] = dataclasses.field(default_factory=set)
    inventory_digest: str = ""
    closed: bool = False

    def send(self, message: control_pb2.BrokerMessage) -> bool:
        """Queue a message for the agent; False if the session is closed or hopelessly behind."""
        if self.closed:
            return False
        try:
            self.outbound.put_nowait(message)
        except asyncio.QueueFull:
            log.warning(
                "agent stream is stuck; closing it", extra={"fields": {"server": self.name}}
            )
            self.close()
            return False
        return True

    def close(self, goodbye: control_pb2.Goodbye | None = None) -> None:
        """End the stream after sending ``goodbye`` (if any). Idempotent."""
        if self.closed:
            return
        self.closed = True
        # Make room so the closing messages always fit.
        while self.outbound.full():
            self.outbound.get_nowait()
        if goodbye is not None and not self.outbound.full():
            self.outbound.put_nowait(control_pb2.BrokerMessage(goodbye=goodbye))
        if not self.outbound.full():
            self.outbound.put_nowait(None)


class SessionRegistry:
    def __init__(self) -> None:
        self._by_server: dict[str, AgentSession] = {}

    def open(self, session: AgentSession) -> AgentSession | None:
        """Make ``session`` current for its server; returns the session it replaced, if any."""
        old = self._by_server.get(session.server_id)
        self._by_server[session.server_id] = session
        if old is not None:
            old.close(
                control_pb2.Goodbye(
                    reason=control_pb2.Goodbye.REPLACED,
                    message="a newer control stream of this agent took over",
                )
            )
        return old

    def release(self, session: AgentSession) -> bool:
        """Forget ``session`` if it is still current; True if it was (the server is now offline)."""
        if self._by_server.get(session.server_id) is session:
            del self._by_server[session.server_id]
            return True
        return False

    def get(self, server_id: str) -> AgentSession | None:
        return self._by_server.get(server_id)

    def close(self, server_id: str, goodbye: control_pb2.Goodbye | None = None) -> bool:
        session = self._by_server.get(server_id)
        if session is None:
            return False
        session.close(goodbye)
        return True

    def close_all(self, goodbye: control_pb2.Goodbye) -> None:
        for session in list(self._by_server.values()):
            session.close(goodbye)

    def __len__(self) -> int:
        return len(self._by_server)
