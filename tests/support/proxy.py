"""A userspace TCP proxy that breaks things on purpose: delay, bandwidth, corruption, cuts.

This machine's kernel has no netem, so WAN delay, stalls, disconnects and byte corruption are
made here, between the two sites. One ``FaultProxy`` listens on a local port and forwards each
connection to ``target``; the fault settings can be changed while connections are open:

* ``delay`` seconds added to every chunk, in both directions (latency);
* ``rate`` bytes per second per direction (0 = unlimited);
* ``corrupt_at``: flip one byte at that offset of the client-to-server stream of the *next*
  connection (then reset), to show corrupted bytes are detected and never applied;
* ``cut_after``: close the next connection after that many client-to-server bytes (a truncated
  stream);
* ``partition()`` / ``heal()``: drop every open connection and refuse new ones until healed.

It runs its own event loop in a thread, so synchronous tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time


@dataclasses.dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    corrupted: int = 0
    cut: int = 0
    refused: int = 0


class FaultProxy:
    def __init__(self, target: str, *, listen_host: str = "127.0.0.1") -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listen_host = listen_host
        self.delay = 0.0
        self.rate = 0.0
        self.corrupt_at: int | None = None
        self.cut_after: int | None = None
        self.partitioned = False
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), daemon=True, name="fault-proxy"
        )
        self._thread.start()
        ready.wait(10)
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, self.listen_host, 0)

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.partitioned:
            self.stats.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.stats.connections += 1
        corrupt_at, self.corrupt_at = self.corrupt_at, None
        cut_after, self.cut_after = self.cut_after, None
        self._writers.update((writer, up_writer))
        up = asyncio.ensure_future(
            self._pump(reader, up_writer, upstream=True, corrupt_at=corrupt_at, cut_after=cut_after)
        )
        down = asyncio.ensure_future(self._pump(up_reader, writer, upstream=False))
        for t in (up, down):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
        corrupt_at: int | None = None,
        cut_after: int | None = None,
    ) -> None:
        seen = 0
        while True:
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(Exception):
                    writer.write_eof()
                return
            if self.partitioned:
                return
            if cut_after is not None and seen + len(data) >= cut_after:
                writer.write(data[: max(0, cut_after - seen)])
                with contextlib.suppress(Exception):
                    await writer.drain()
                self.stats.cut += 1
                return
            if corrupt_at is not None and seen <= corrupt_at < seen + len(data):
                buf = bytearray(data)
                buf[corrupt_at - seen] ^= 0xFF
                data = bytes(buf)
                self.stats.corrupted += 1
            seen += len(data)
            if upstream:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.rate:
                await asyncio.sleep(len(data) / self.rate)
            writer.write(data)
            await writer.drain()

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def partition(self) -> None:
        """Drop every connection and refuse new ones."""

        def cut() -> None:
            self.partitioned = True
            for w in list(self._writers):
                w.transport.abort()

        self._call(cut)

    def heal(self) -> None:
        self.partitioned = False

    def wait_connections(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.stats.connections < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.stats.connections} connections through the proxy")
            time.sleep(0.01)

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()

        with contextlib.suppress(Exception):
            self._call(stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
