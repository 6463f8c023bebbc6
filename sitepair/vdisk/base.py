"""The contract every virtual-disk format implements.

A :class:`VirtualDisk` is the guest-visible byte array of a disk image: ``read`` and ``write``
address guest offsets, never file offsets. Differencing disks are whole chains: reads fall
through to the parent where this layer has no data, writes always land in the top layer.

Thread safety: ``read`` (and ``allocated_ranges``) may be called from several threads at once
(the replication scanner hashes with both cores); implementations use positional I/O
(``os.pread``) and never share a file position. ``write``, ``write_zeroes`` and ``flush`` are
serialised by an internal lock and may run concurrently with reads: a read that overlaps a
concurrent write returns either the old or the new bytes of each sector, never garbage.
"""

from __future__ import annotations

import abc
import enum
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import fileio

MiB = 1 << 20


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    VHD = "vhd"
    VHDX = "vhdx"
    #: Read-only (QEMU's overlays, see :mod:`sitepair.vdisk.qcow2`): ``create_disk`` refuses
    #: it and ``open_disk`` opens it only with ``read_only=True``. Code that lists the formats
    #: it can write names them (:data:`sitepair.vdisk.WRITABLE_FORMATS`), never iterates this.
    QCOW2 = "qcow2"


class SubFormat(enum.StrEnum):
    FIXED = "fixed"
    DYNAMIC = "dynamic"
    DIFFERENCING = "differencing"


@dataclass(frozen=True)
class DiskInfo:
    """What ``sitepair-vdisk info`` prints, for one layer (``parent`` describes the next one)."""

    path: str
    format: DiskFormat
    subformat: SubFormat
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    block_size: int
    #: VHDX: page83 data (the SCSI identity the guest sees); VHD: the footer's unique id.
    identity: uuid.UUID | None
    #: Bytes of the file itself (allocated payload plus metadata).
    file_size: int
    #: Guest bytes this layer holds data for (what ``allocated_ranges(this_layer_only=True)`` sums).
    allocated_bytes: int
    #: A token that changes whenever the image is written by anyone (VHDX DataWriteGuid; for VHD,
    #: which has no such field, ``None``: callers use size and mtime instead).
    change_token: uuid.UUID | None
    parent: DiskInfo | None = None
    #: Format-specific details worth showing an operator (header sequence numbers, log state, ...).
    details: dict[str, object] = field(default_factory=dict)


class VirtualDisk(abc.ABC):
    """One opened image (and, for a differencing disk, its opened parent chain).

    ``parent`` is a plain attribute and implementations read through it on every access (they
    never cache parent data): :func:`sitepair.vdisk.ops.merge` swaps a child's read-only parent
    for a writable open of the same file, so it can write the child's layer into the parent
    while reading the child.
    """

    path: Path
    format: DiskFormat
    subformat: SubFormat
    read_only: bool
    parent: VirtualDisk | None
    #: The image file's descriptor (every format keeps one open file per layer).
    _fd: int

    def __init__(self) -> None:
        self._write_lock = threading.Lock()
        self._closed = False

    # -- geometry and identity -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def virtual_size(self) -> int:
        """Guest-visible size in bytes."""

    @property
    @abc.abstractmethod
    def logical_sector_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def physical_sector_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """Allocation unit of the format (VHDX payload block, VHD block); for fixed and raw
        images a nominal 2 MiB, so callers can always iterate in blocks."""

    @property
    @abc.abstractmethod
    def identity(self) -> uuid.UUID | None:
        """VHDX page83 data or VHD unique id; ``None`` for raw images."""

    @abc.abstractmethod
    def info(self) -> DiskInfo: ...

    # -- data ----------------------------------------------------------------------------
    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``; raises VirtualDiskError beyond the end."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the guest bytes at ``offset`` (``len(buf)`` of them).

        The default copies from :meth:`read`; formats override it so a differencing child can
        have its parent read straight into the child's buffer."""
        buf[:] = self.read(offset, len(buf))

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes. Any offset and length inside the disk (no alignment required).

        Writing zeros into a region that no layer of the chain has allocated must not allocate
        space (sparse regions stay sparse)."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, deallocating or marking blocks zero
        where the format allows and the layer below would otherwise show through."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (data, then metadata, fsync'd)."""

    def start_writeback(self) -> bool:
        """Start writing this layer's written data to disk in the background, without waiting
        and without making anything durable (:meth:`flush` still does that). A writer that
        flushes now and then calls this after its writes so that the disk works while it goes
        on, and the next flush finds little left to wait for. False when read-only or where the
        system has no such call (see :func:`sitepair.vdisk.fileio.start_writeback`)."""
        self._check_open()
        return not self.read_only and fileio.start_writeback(self._fd)

    @abc.abstractmethod
    def allocated_ranges(self, *, this_layer_only: bool = False) -> Iterator[tuple[int, int]]:
        """Sorted, non-overlapping, coalesced ``(offset, length)`` guest ranges that may hold
        non-zero data: from the BAT (and sector bitmaps where the format has them) of this layer
        and, unless ``this_layer_only``, of every parent. Regions outside are guaranteed to read
        as zeros. Cost is proportional to the BAT, never to the virtual size in bytes."""

    def close(self) -> None:
        """Flush (if writable) and close this layer and its parents. Idempotent."""
        if self._closed:
            return
        try:
            if not self.read_only:
                self.flush()
        finally:
            self._closed = True
            self._close_files()
            if self.parent is not None:
                self.parent.close()

    @abc.abstractmethod
    def _close_files(self) -> None: ...

    # -- helpers shared by all formats ----------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise VirtualDiskError(f"{self.path}: disk is closed")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise VirtualDiskError(
                f"{self.path}: range [{offset}, {offset + length}) is outside the disk "
                f"(virtual size {self.virtual_size})"
            )

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise VirtualDiskError(f"{self.path}: opened read-only")

    def chain(self) -> list[VirtualDisk]:
        """This layer first, then each parent down to the base."""
        out: list[VirtualDisk] = []
        layer: VirtualDisk | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.parent
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format}/{self.subformat} {self.path}>"


def coalesce(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Merge sorted ``(offset, length)`` ranges that touch or overlap."""
    cur_off = cur_end = -1
    for off, length in ranges:
        if length <= 0:
            continue
        end = off + length
        if cur_end >= off and cur_off >= 0:
            cur_end = max(cur_end, end)
            continue
        if cur_off >= 0:
            yield cur_off, cur_end - cur_off
        cur_off, cur_end = off, end
    if cur_off >= 0:
        yield cur_off, cur_end - cur_off
