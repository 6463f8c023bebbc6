"""The ``directory`` backend's write path: what a workload uses to write a VM's disks.

A :class:`DirectoryVmWriter` may live in any process. For each disk it writes, it opens the
active layer named in ``vm.json`` for writing (through :mod:`sitepair.vdisk`) together with
that layer's change log, and marks each write's 64 KiB blocks in the log before the write.

It holds ``vm.lock`` shared from its first write until the backend asks for the disks (see
:mod:`agent.hosts.vmlock`): a watcher thread reads the lock header every few milliseconds and,
when an exclusive operation is requested, waits for the write in progress, flushes and closes
every disk cleanly (change log ``clean`` with the layer's identity) and releases the lock. The
next write takes the lock again once the operation is over, compares the chain generation and
rereads ``vm.json``, and opens the (possibly new) active layer: the writer never writes a frozen
layer, and its callers notice nothing but a pause.

If the backend died in the middle of an operation (``vm.lock`` still says "requested" but
nobody holds ``vm.ops.lock``), the writer finishes or undoes that operation itself before it
opens a disk (``recover``, the backend's own recovery, which any process may run): after a
crash in the middle of a merge the chain cannot be opened until then.

The per-write cost is a mutex, a dictionary lookup, a bit test in memory (and, for a block not
marked yet, one ``pwrite`` of a byte) and the disk write itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from agent.hosts import changelog
from agent.hosts.base import VmWriter
from agent.hosts.vmlock import VmLockFile
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound, SitepairError

if TYPE_CHECKING:
    from agent.hosts.vmspec import VmSpec

log = logging.getLogger("sitepair.agent.directory")

#: How often the watcher looks for a request for the disks (seconds).
DEFAULT_POLL_INTERVAL = 0.005


@dataclasses.dataclass
class _OpenDisk:
    disk_id: str
    entry: str
    path: Path
    disk: vdisk.VirtualDisk
    log: changelog.LogWriter
    size: int


class DirectoryVmWriter(VmWriter):
    """Writes one VM's disks; see the module docstring. Thread-safe."""

    def __init__(
        self,
        folder: Path,
        vm_name: str,
        read_spec: Callable[[], VmSpec],
        *,
        boot: uuid.UUID,
        recover: Callable[[], None] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        running_only: bool = False,
    ) -> None:
        self.folder = folder
        self._running_only = running_only
        self._recover = recover
        self.vm_name = vm_name
        self._read_spec = read_spec
        self._boot = boot
        self._poll = poll_interval
        self._lock = VmLockFile(folder)
        self._mutex = threading.Lock()
        self._open: dict[str, _OpenDisk] = {}
        self._spec: VmSpec | None = None
        self._generation = -1
        self._served = -1
        self._closed = False
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, name=f"vm-writer-{vm_name}", daemon=True
        )
        self._watcher.start()

    # -- the interface ---------------------------------------------------------------------
    def write(self, disk_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = memoryview(data).nbytes
        with self._mutex, self._context(disk_id):
            od = self._disk(disk_id)
            self._check_range(od, offset, length)
            od.log.mark(offset, length)
            od.disk.write(offset, data)

    def write_zeroes(self, disk_id: str, offset: int, length: int) -> None:
        with self._mutex, self._context(disk_id):
            od = self._disk(disk_id)
            self._check_range(od, offset, length)
            od.log.mark(offset, length)
            od.disk.write_zeroes(offset, length)

    def read(self, disk_id: str, offset: int, length: int) -> bytes:
        with self._mutex, self._context(disk_id):
            od = self._disk(disk_id)
            self._check_range(od, offset, length)
            return od.disk.read(offset, length)

    def virtual_size(self, disk_id: str) -> int:
        with self._mutex, self._context(disk_id):
            return self._disk(disk_id).size

    def flush(self) -> None:
        with self._mutex:
            for od in self._open.values():
                with self._context(od.disk_id):
                    od.disk.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if threading.current_thread() is not self._watcher:
            self._watcher.join()
        with self._mutex:
            self._closed = True
            try:
                self._let_go()
            finally:
                self._lock.close()

    # -- internals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self, disk_id: str) -> Iterator[None]:
        """Name the VM and disk in errors from below (the file is named by vdisk)."""
        try:
            yield
        except SitepairError as exc:
            if exc.message.startswith(f"VM {self.vm_name}"):
                raise
            raise type(exc)(
                f"VM {self.vm_name} disk {disk_id}: {exc.message}", hint=exc.hint
            ) from exc
        except OSError as exc:
            raise FailedPrecondition(
                f"VM {self.vm_name} disk {disk_id}: I/O error on "
                f"{exc.filename or 'a disk file'}: {exc.strerror or exc}"
            ) from exc

    def _check_range(self, od: _OpenDisk, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > od.size:
            raise InvalidArgument(
                f"VM {self.vm_name} disk {od.disk_id}: range [{offset}, {offset + length}) "
                f"is outside the disk ({od.size} bytes, {od.path})"
            )

    def _disk(self, disk_id: str) -> _OpenDisk:
        if self._closed:
            raise FailedPrecondition(f"VM {self.vm_name}: the writer is closed")
        if not self._lock.held:
            self._acquire()
        od = self._open.get(disk_id)
        if od is None:
            od = self._open_disk(disk_id)
        return od

    def _acquire(self) -> None:
        state = self._lock.acquire_shared()
        if state.requested and self._recover is not None:
            # A request nobody serves: the backend died mid-operation. Finish its job first.
            self._lock.release()
            self._recover()
            state = self._lock.acquire_shared()
        # Once holding the lock, an old request can only be left over from a backend that
        # died; the watcher must not close the disks for it.
        self._served = state.request
        if state.generation != self._generation or self._spec is None or self._running_only:
            self._spec = self._read_spec()
            self._generation = state.generation
        if self._running_only and self._spec.state != "running":
            # A guest writes only while its VM runs. The check happens with the lock held, so
            # a write is either before a cut (and in it) or refused: nothing lands after the
            # final cut of a planned failover.
            self._lock.release()
            raise FailedPrecondition(
                f"VM {self.vm_name} is {self._spec.state}; the guest cannot write"
            )

    def _open_disk(self, disk_id: str) -> _OpenDisk:
        assert self._spec is not None
        spec = next((d for d in self._spec.disks if d.id == disk_id), None)
        if spec is None:
            known = ", ".join(d.id for d in self._spec.disks) or "none"
            raise NotFound(f"VM {self.vm_name} has no disk {disk_id!r} (disks: {known})")
        path = self.folder / spec.active
        disk = vdisk.open_disk(path)
        try:
            size = disk.virtual_size
            lg = changelog.LogWriter.open(
                changelog.log_path(self.folder, disk_id, spec.active),
                disk_id=disk_id,
                layer=spec.active,
                virtual_size=size,
                boot=self._boot,
            )
        except BaseException:
            disk.close()
            raise
        od = _OpenDisk(disk_id, spec.active, path, disk, lg, size)
        self._open[disk_id] = od
        return od

    def _let_go(self) -> None:
        """Flush and close every disk cleanly, then release the shared lock."""
        errors: list[str] = []
        try:
            for od in list(self._open.values()):
                try:
                    od.disk.close()
                except (SitepairError, OSError) as exc:
                    # The log stays "open": its bits still cover whatever reached the layer.
                    od.log.abandon()
                    errors.append(f"{od.path}: {exc}")
                    continue
                try:
                    od.log.close_clean(changelog.layer_identity(od.path))
                except OSError as exc:
                    errors.append(f"{od.log.path}: {exc}")
        finally:
            self._open.clear()
            self._lock.release()
        if errors:
            log.error(
                "closing disks failed",
                extra={"fields": {"vm": self.vm_name, "errors": "; ".join(errors)}},
            )

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                state = self._lock.state()
                if not state.requested or state.request == self._served:
                    continue
                with self._mutex:
                    state = self._lock.state()
                    if self._closed or not state.requested or state.request == self._served:
                        continue
                    self._served = state.request
                    if self._lock.held:
                        self._let_go()
            except Exception:
                log.exception("VM writer watcher failed", extra={"fields": {"vm": self.vm_name}})
