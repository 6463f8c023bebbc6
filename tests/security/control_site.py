"""An attacker's side of the broker's control port: a raw control stream opened with an enrolled
agent's certificate, fed one message at a time (tests/security)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import grpc

from sitepair import PROTOCOL_VERSION, pki
from sitepair.v1 import common_pb2, control_pb2, control_pb2_grpc

MIB = 1024 * 1024
#: What the attacker's side of a channel may send and receive (more than the broker accepts).
BIG_CHANNEL = [
    ("grpc.ssl_target_name_override", pki.BROKER_DNS_NAME),
    ("grpc.max_send_message_length", 32 * MIB),
    ("grpc.max_receive_message_length", 32 * MIB),
]


def eventually(check: Callable[[], object], *, timeout: float = 30, what: str) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class RawStream:
    """A control stream opened with an enrolled agent's certificate, fed one message at a time."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials) -> None:
        self.channel = grpc.secure_channel(address, credentials, options=BIG_CHANNEL)
        self.outbox: queue.Queue[control_pb2.AgentMessage | None] = queue.Queue()
        self.call = control_pb2_grpc.ControlStub(self.channel).Connect(
            iter(self.outbox.get, None), timeout=120
        )

    def send(self, **body: object) -> None:
        self.outbox.put(control_pb2.AgentMessage(**body))  # type: ignore[arg-type]

    def first(self) -> control_pb2.BrokerMessage:
        for message in self.call:
            return message
        raise AssertionError("the broker ended the stream without a word")

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()  # type: ignore[no-untyped-call]
        self.channel.close()


def hello(facts: common_pb2.HostFacts | None = None) -> control_pb2.Hello:
    return control_pb2.Hello(
        facts=facts or common_pb2.HostFacts(hostname="evil", backend="directory"),
        agent_version="0.0.1",
        protocol_version=PROTOCOL_VERSION,
    )
