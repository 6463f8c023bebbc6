"""The agent's end of the control stream: connect, say Hello, heartbeat, obey, reconnect.

One long-lived bidirectional stream over mutual TLS. After Hello and Welcome the agent sends its
inventory, then a heartbeat every interval the broker asked for (with host metrics, and the
inventory again whenever it changed), and executes commands as they arrive. When the stream
breaks, it reconnects with exponential backoff and full jitter (so a thousand agents do not
reconnect in step after a broker restart). A Goodbye(REMOVED) or a refusal of its certificate
stops the agent with a clear message: retrying cannot help until an operator acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from agent.commands import CommandExecutor
from agent.facts import host_facts
from agent.hosts.base import HostBackend, HostInventory
from agent.identity import AgentIdentity
from agent.metrics import sample
from sitepair import PROTOCOL_VERSION, __version__, pki
from sitepair.clock import Clock
from sitepair.errors import SitepairError
from sitepair.protoconv import timestamp
from sitepair.rpc import channel_options
from sitepair.v1 import common_pb2, control_pb2, control_pb2_grpc

log = logging.getLogger("sitepair.agent.control")

#: End-of-stream marker of grpc.aio reads (missing from grpc-stubs).
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class AgentRemoved(SitepairError):
    """The broker removed this server (or refuses its certificate): stop, do not retry."""

    status = "PERMISSION_DENIED"


def inventory_to_proto(inv: HostInventory, now: float) -> common_pb2.Inventory:
    msg = common_pb2.Inventory(
        vms=[
            common_pb2.VirtualMachine(
                id=vm.id,
                name=vm.name,
                generation=vm.generation,
                cpu_count=vm.cpu_count,
                memory_mb=vm.memory_mb,
                state=vm.state,
                disks=[
                    common_pb2.VirtualDiskRef(
                        id=d.id,
                        path=str(d.path),
                        format=d.format,
                        virtual_size=d.virtual_size,
                        storage_class=d.storage_class,
                        file_size=d.file_size,
                    )
                    for d in vm.disks
                ],
                nics=[common_pb2.VmNic(name=n.name, network=n.network, mac=n.mac) for n in vm.nics],
            )
            for vm in inv.vms
        ],
        networks=[common_pb2.VmNetwork(name=n.name, subnets=n.subnets) for n in inv.networks],
        storage=[
            common_pb2.StorageClassification(
                name=s.name, path=str(s.path), total_bytes=s.total_bytes, free_bytes=s.free_bytes
            )
            for s in inv.storage
        ],
    )
    # The digest covers what the broker cares about, not the free-space numbers, which change
    # with every write and would resend the inventory on every heartbeat.
    stable = common_pb2.Inventory()
    stable.CopyFrom(msg)
    for s in stable.storage:
        s.free_bytes = 0
    for vm in stable.vms:
        for d in vm.disks:
            d.file_size = 0
    msg.digest = hashlib.sha256(stable.SerializeToString(deterministic=True)).hexdigest()
    msg.collected_at.CopyFrom(timestamp(now))
    return msg


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 20))))  # noqa: S311 - jitter, not crypto


class ControlClient:
    def __init__(
        self,
        *,
        identity: Callable[[], AgentIdentity],
        backend: HostBackend,
        executor: CommandExecutor,
        clock: Clock,
        cloud: str = "",
        facts: Callable[[], common_pb2.HostFacts] | None = None,
        reports: Callable[[], list[control_pb2.AgentMessage]] | None = None,
    ) -> None:
        self._identity = identity
        self._backend = backend
        self._executor = executor
        self._clock = clock
        self._cloud = cloud
        self._facts = facts
        self._reports = reports
        self._stop = asyncio.Event()
        self._outbound: asyncio.Queue[control_pb2.AgentMessage] | None = None
        self._inventory_digest = ""
        self._command_tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.sessions = 0
        self.heartbeat_interval = 10.0
        self.last_welcome: control_pb2.Welcome | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = self._clock.monotonic()
            try:
                await self._session()
            except AgentRemoved:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    raise AgentRemoved(
                        f"the broker refuses this agent: {exc.details()}",
                        hint="if the server was removed, register again with a new key",
                    ) from None
                log.warning(
                    "control stream failed",
                    extra={"fields": {"code": exc.code().name, "details": exc.details()}},
                )
            except (OSError, SitepairError) as exc:
                log.warning("control stream failed", extra={"fields": {"error": str(exc)}})
            finally:
                self.connected.clear()
            if self._stop.is_set():
                break
            # A stream that lived a while was healthy: start the backoff over.
            attempt = 0 if self._clock.monotonic() - started > 60 else attempt + 1
            delay = backoff_delay(attempt)
            log.info("reconnecting", extra={"fields": {"in_seconds": round(delay, 2)}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def shutdown(self) -> None:
        self._stop.set()
        for t in list(self._command_tasks):
            t.cancel()

    async def send_inventory(self) -> int:
        """Collect the host's inventory and queue it at once; returns how many VMs it lists.

        The broker handles a stream's messages in order and stores an inventory before reading
        on, so whatever is queued after this call (the refresh command's acknowledgement among
        them) reaches the broker only once it holds this inventory: a refresh job never
        completes with the old one still listed. Not connected, nothing is queued: every stream
        begins with a fresh inventory. A backend that cannot list its VMs raises, and the
        command reports that."""
        message = await self._inventory()
        if self._outbound is not None:
            self._inventory_digest = message.digest
            self._outbound.put_nowait(control_pb2.AgentMessage(inventory=message))
        return len(message.vms)

    # -- one stream -------------------------------------------------------------------------
    async def _session(self) -> None:
        identity = self._identity()
        address = identity.control_addresses[0]
        async with grpc.aio.secure_channel(
            address,
            identity.channel_credentials(),
            options=channel_options(target_name=pki.BROKER_DNS_NAME),
        ) as channel:
            stub = control_pb2_grpc.ControlStub(channel)
            call: Any = stub.Connect()  # type: ignore[call-arg]  # no iterator: we write()
            await call.write(
                control_pb2.AgentMessage(
                    hello=control_pb2.Hello(
                        facts=self._facts()
                        if self._facts is not None
                        else host_facts(backend=self._backend.kind, cloud=self._cloud),
                        agent_version=__version__,
                        protocol_version=PROTOCOL_VERSION,
                    )
                )
            )
            first = await call.read()
            if first is EOF:
                await call.code()  # raises AioRpcError with the broker's reason
                raise SitepairError("the broker closed the stream before Welcome")
            if first.WhichOneof("body") != "welcome":
                raise SitepairError("the broker did not answer Hello with Welcome")
            welcome = first.welcome
            self.last_welcome = welcome
            self.heartbeat_interval = max(0.05, welcome.heartbeat_interval_ms / 1000)
            self.sessions += 1
            log.info(
                "connected to broker",
                extra={"fields": {"address": address, "host_id": welcome.host_id}},
            )
            outbound: asyncio.Queue[control_pb2.AgentMessage] = asyncio.Queue()
            self._outbound = outbound
            self._inventory_digest = ""
            self.connected.set()
            tasks = [
                asyncio.create_task(self._writer(call, outbound)),
                asyncio.create_task(self._reader(call)),
                asyncio.create_task(self._heartbeats(outbound)),
                asyncio.create_task(self._stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            finally:
                self._outbound = None
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()

    async def _writer(self, call: Any, outbound: asyncio.Queue[control_pb2.AgentMessage]) -> None:
        while True:
            message = await outbound.get()
            await call.write(message)

    async def _reader(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is EOF:
                await call.code()
                return
            kind = message.WhichOneof("body")
            if kind == "command":
                task = asyncio.create_task(self._executor.handle(message.command, self._send_ack))
                self._command_tasks.add(task)
                task.add_done_callback(self._command_tasks.discard)
            elif kind == "goodbye":
                bye = message.goodbye
                if bye.reason == control_pb2.Goodbye.REMOVED:
                    raise AgentRemoved(
                        f"the broker removed this server: {bye.message}",
                        hint="register the host again with a new registration key",
                    )
                log.info(
                    "broker said goodbye",
                    extra={
                        "fields": {
                            "reason": control_pb2.Goodbye.Reason.Name(bye.reason),
                            "message": bye.message,
                        }
                    },
                )
                return
            else:
                log.warning("unexpected message from broker", extra={"fields": {"kind": kind}})

    async def _send_ack(self, ack: control_pb2.CommandAck) -> None:
        # If the stream is gone the ack is dropped: the broker redelivers the command on the next
        # stream and the journal answers it without running it again.
        if self._outbound is not None:
            self._outbound.put_nowait(control_pb2.AgentMessage(ack=ack))

    async def _heartbeats(self, outbound: asyncio.Queue[control_pb2.AgentMessage]) -> None:
        seq = 0
        volumes = self._backend.volumes()
        while True:
            inventory = await self._collect_inventory()
            if inventory is not None and inventory.digest != self._inventory_digest:
                self._inventory_digest = inventory.digest
                outbound.put_nowait(control_pb2.AgentMessage(inventory=inventory))
            if self._reports is not None:
                try:
                    for message in await asyncio.to_thread(self._reports):
                        outbound.put_nowait(message)
                except (OSError, SitepairError) as exc:
                    log.warning("status report failed", extra={"fields": {"error": str(exc)}})
            seq += 1
            metrics = await asyncio.to_thread(sample, volumes)
            outbound.put_nowait(
                control_pb2.AgentMessage(
                    heartbeat=control_pb2.Heartbeat(
                        seq=seq,
                        sent_at=timestamp(self._clock.now()),
                        metrics=metrics,
                        inventory_digest=self._inventory_digest,
                    )
                )
            )
            await asyncio.sleep(self.heartbeat_interval)

    async def _inventory(self) -> common_pb2.Inventory:
        inv = await asyncio.to_thread(self._backend.inventory)
        return inventory_to_proto(inv, self._clock.now())

    async def _collect_inventory(self) -> common_pb2.Inventory | None:
        try:
            return await self._inventory()
        except (OSError, SitepairError) as exc:
            log.warning("inventory failed", extra={"fields": {"error": str(exc)}})
            return None
