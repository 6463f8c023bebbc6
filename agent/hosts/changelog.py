"""The changed-block log of one disk layer: the portable equivalent of Hyper-V RCT.

One file per disk per layer that has been an active layer,
``<vm>/changes/<disk id>/<layer file name>.cbt``::

    offset 0     header, 4096 bytes (little-endian)
                   0  magic "SPCHGLOG"          8  version u16 (1)    10  header size u16 (4096)
                  12  block size u32 (65536)    16  virtual size u64  24  bitmap offset u64
                  32  bitmap bytes u64          40  state u8          41  flags u8
                  42  reserved u16              44  writer pid u32    48  boot id (16 bytes)
                  64  opened at f64 (Unix time) 72  header sequence u64
                  80  disk id length u16        82  layer length u16  84  identity length u16
                  88  disk id (UTF-8, <= 255)  344  layer, the chain entry (UTF-8, <= 2047)
                2392  layer identity (UTF-8, <= 511)
                4092  CRC-32 (zlib) of bytes 0..4091
    offset 4096  bitmap: bit i (byte i // 8, least significant bit first) = guest bytes
                 [i * 64 KiB, (i + 1) * 64 KiB) were written while this layer was active

States: ``clean`` (no writer has it open; the identity field is the layer's identity as the
last writer left it), ``open`` (a writer has it open, or had it when it died), ``frozen``
(the layer became read-only at a checkpoint; never written again).

Flags record why a log cannot vouch for everything written into its layer:
``untracked`` (a writer found no log and started one: earlier writes are unknown),
``replaced`` (a writer found a damaged log and started over), ``reboot`` (a writer found the log
left open in an earlier boot of the host).

Ordering, which makes the bits a superset of what reached the layer:

- A writer switches ``clean`` to ``open`` (recording the boot id) and fsyncs before its first
  write; every write sets its bits with ``pwrite`` before the data write it covers. A process
  that dies (SIGKILL) leaves its page-cache writes in place, so the bits cover everything it
  wrote. A power loss or reboot can lose bits (they are not fsync'd), which is why a log left
  ``open`` is trusted only in the boot that opened it.
- A clean close fsyncs the bits, then writes ``clean`` with the layer's identity and fsyncs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import struct
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

from sitepair.errors import FailedPrecondition, NotFound
from sitepair.fsutil import fsync_dir
from sitepair.vdisk.fileio import O_BINARY, pread, pwrite_all

MAGIC = b"SPCHGLOG"
VERSION = 1
HEADER_SIZE = 4096
BLOCK_SIZE = 64 * 1024
_BLOCK_SHIFT = 16

STATE_CLEAN = 1
STATE_OPEN = 2
STATE_FROZEN = 3
STATE_NAMES = {STATE_CLEAN: "clean", STATE_OPEN: "open", STATE_FROZEN: "frozen"}

FLAG_UNTRACKED = 1
FLAG_REPLACED = 2
FLAG_REBOOT = 4

_FIXED = struct.Struct("<8sHHIQQQBBHI16sdQHHH")
_DISK_ID_AT, _DISK_ID_MAX = 88, 255
_LAYER_AT, _LAYER_MAX = 344, 2047
_IDENTITY_AT, _IDENTITY_MAX = 2392, 511
_CRC_AT = HEADER_SIZE - 4
#: The boot id of a log that was never opened by a writer.
NO_BOOT = uuid.UUID(int=0)


class ChangeLogError(FailedPrecondition):
    """A change log is damaged or does not describe the layer it is found for."""


class ChangeLogMissing(NotFound):
    """No change log exists for a layer."""


# -- the host's boot and a layer's identity ---------------------------------------------------
def boot_id() -> str:
    """An identifier of the current boot of this machine: Linux's
    ``/proc/sys/kernel/random/boot_id``; elsewhere derived from ``psutil.boot_time()``."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    import psutil

    return f"boot-time-{int(psutil.boot_time())}"


def boot_uuid(value: str) -> uuid.UUID:
    """The 16 bytes a log header holds for a boot id."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_OID, value)


def layer_identity(path: Path) -> str:
    """What changes whenever anything writes a layer's guest data, read without opening the
    image through :mod:`sitepair.vdisk` (so no image lock and no parent chain is involved):

    - VHDX: ``vhdx:<DataWriteGuid>`` of the current header (every writer, Hyper-V, qemu and
      ours, gives a file a new DataWriteGuid before its first data change after an open);
    - VHD (no such field): ``vhd:<size>:<mtime_ns>:<hash of the footer at the end>``.

    A file that cannot be read gives ``unreadable:<reason>`` (never equal to a real identity)."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            head = pread(f.fileno(), 8, 0)
            if head == b"vhdxfile":
                return _vhdx_identity(f.fileno())
            footer = pread(f.fileno(), 512, max(0, st.st_size - 512))
    except OSError as exc:
        return f"unreadable:{exc.strerror or exc}"
    digest = hashlib.sha256(footer).hexdigest()[:16]
    return f"vhd:{st.st_size}:{st.st_mtime_ns}:{digest}"


def _vhdx_identity(fd: int) -> str:
    from sitepair.vdisk.vhdx_format import HEADER_OFFSETS, FormatError, parse_header
    from sitepair.vdisk.vhdx_format import HEADER_SIZE as VHDX_HEADER_SIZE

    best = None
    for offset in HEADER_OFFSETS:
        try:
            header = parse_header(pread(fd, VHDX_HEADER_SIZE, offset))
        except FormatError:
            continue
        if best is None or header.sequence_number > best.sequence_number:
            best = header
    if best is None:
        return "unreadable:no valid VHDX header"
    return f"vhdx:{best.data_write_guid}"


def describe_identity(identity: str) -> str:
    """An identity in words, for messages."""
    if identity.startswith("vhdx:"):
        return f"DataWriteGuid {identity[5:]}"
    if identity.startswith("vhd:"):
        _kind, size, mtime_ns, digest = identity.split(":", 3)
        seconds, nanos = divmod(int(mtime_ns), 1_000_000_000)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        return f"{size} bytes, modified {stamp}.{nanos // 1_000_000:03d} UTC, footer {digest}"
    return identity


# -- the header ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LogHeader:
    disk_id: str
    layer: str
    virtual_size: int
    state: int
    flags: int = 0
    writer_pid: int = 0
    boot: uuid.UUID = NO_BOOT
    opened_at: float = 0.0
    sequence: int = 0
    identity: str = ""
    block_size: int = BLOCK_SIZE

    @property
    def bitmap_bytes(self) -> int:
        return bitmap_bytes(self.virtual_size, self.block_size)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"unknown ({self.state})")

    def pack(self) -> bytes:
        disk_id = self.disk_id.encode()
        layer = self.layer.encode()
        identity = self.identity.encode()
        if len(disk_id) > _DISK_ID_MAX or len(layer) > _LAYER_MAX:
            raise ChangeLogError(f"disk id or layer path too long for a change log: {self.layer}")
        if len(identity) > _IDENTITY_MAX:
            identity = identity[:_IDENTITY_MAX]
        buf = bytearray(HEADER_SIZE)
        _FIXED.pack_into(
            buf,
            0,
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self.block_size,
            self.virtual_size,
            HEADER_SIZE,
            self.bitmap_bytes,
            self.state,
            self.flags,
            0,
            self.writer_pid,
            self.boot.bytes,
            self.opened_at,
            self.sequence,
            len(disk_id),
            len(layer),
            len(identity),
        )
        buf[_DISK_ID_AT : _DISK_ID_AT + len(disk_id)] = disk_id
        buf[_LAYER_AT : _LAYER_AT + len(layer)] = layer
        buf[_IDENTITY_AT : _IDENTITY_AT + len(identity)] = identity
        struct.pack_into("<I", buf, _CRC_AT, zlib.crc32(buf[:_CRC_AT]))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes, where: Path) -> LogHeader:
        if len(buf) < HEADER_SIZE:
            raise ChangeLogError(f"{where}: change log header is cut short ({len(buf)} bytes)")
        (crc,) = struct.unpack_from("<I", buf, _CRC_AT)
        if zlib.crc32(buf[:_CRC_AT]) != crc:
            raise ChangeLogError(f"{where}: change log header checksum mismatch")
        (
            magic,
            version,
            header_size,
            block_size,
            virtual_size,
            bitmap_offset,
            bitmap_len,
            state,
            flags,
            _reserved,
            writer_pid,
            boot,
            opened_at,
            sequence,
            disk_id_len,
            layer_len,
            identity_len,
        ) = _FIXED.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ChangeLogError(f"{where}: not a change log (magic {magic!r})")
        if version != VERSION or header_size != HEADER_SIZE or bitmap_offset != HEADER_SIZE:
            raise ChangeLogError(f"{where}: unsupported change log version {version}")
        if block_size != BLOCK_SIZE:
            raise ChangeLogError(f"{where}: unsupported change log block size {block_size}")
        if state not in STATE_NAMES:
            raise ChangeLogError(f"{where}: unknown change log state {state}")
        if (
            disk_id_len > _DISK_ID_MAX
            or layer_len > _LAYER_MAX
            or identity_len > _IDENTITY_MAX
            or bitmap_len != bitmap_bytes(virtual_size, block_size)
        ):
            raise ChangeLogError(f"{where}: inconsistent change log header")
        try:
            return cls(
                disk_id=buf[_DISK_ID_AT : _DISK_ID_AT + disk_id_len].decode(),
                layer=buf[_LAYER_AT : _LAYER_AT + layer_len].decode(),
                identity=buf[_IDENTITY_AT : _IDENTITY_AT + identity_len].decode(),
                virtual_size=virtual_size,
                state=state,
                flags=flags,
                writer_pid=writer_pid,
                boot=uuid.UUID(bytes=boot),
                opened_at=opened_at,
                sequence=sequence,
                block_size=block_size,
            )
        except UnicodeDecodeError as exc:
            raise ChangeLogError(f"{where}: change log header holds invalid text") from exc


def bitmap_bytes(virtual_size: int, block_size: int = BLOCK_SIZE) -> int:
    blocks = -(-virtual_size // block_size)
    return -(-blocks // 8)


def log_path(folder: Path, disk_id: str, layer: str) -> Path:
    """Where the change log of ``layer`` (a chain entry) of ``disk_id`` lives."""
    return folder / "changes" / disk_id / f"{Path(layer).name}.cbt"


# -- whole-file operations (the backend, under the exclusive VM lock) ---------------------
def create_log(
    path: Path,
    *,
    disk_id: str,
    layer: str,
    virtual_size: int,
    identity: str,
    flags: int = 0,
    state: int = STATE_CLEAN,
    boot: uuid.UUID | None = None,
) -> LogHeader:
    """Create (or replace) an empty log, atomically and durably."""
    header = LogHeader(
        disk_id=disk_id,
        layer=layer,
        virtual_size=virtual_size,
        state=state,
        flags=flags,
        writer_pid=os.getpid() if state == STATE_OPEN else 0,
        boot=boot or NO_BOOT,
        opened_at=time.time() if state == STATE_OPEN else 0.0,
        identity=identity,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            pwrite_all(fd, header.pack(), 0)
            os.ftruncate(fd, HEADER_SIZE + header.bitmap_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        if sys.platform != "win32":
            tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return header


def read_header(path: Path) -> LogHeader:
    try:
        with path.open("rb") as f:
            buf = f.read(HEADER_SIZE)
    except FileNotFoundError as exc:
        raise ChangeLogMissing(f"{path}: change log missing") from exc
    except OSError as exc:
        raise ChangeLogError(f"{path}: cannot read the change log: {exc.strerror}") from exc
    return LogHeader.unpack(buf, path)


def check_header(header: LogHeader, path: Path, *, disk_id: str, layer: str) -> None:
    """Refuse a log that describes another disk or layer."""
    if header.disk_id != disk_id or header.layer != layer:
        raise ChangeLogError(
            f"{path}: change log belongs to disk {header.disk_id!r} layer {header.layer!r}, "
            f"not disk {disk_id!r} layer {layer!r}"
        )


def rewrite_header(path: Path, header: LogHeader) -> LogHeader:
    """Write a new header in place (sequence raised) and fsync."""
    new = dataclasses.replace(header, sequence=header.sequence + 1)
    fd = os.open(path, os.O_RDWR | O_BINARY)
    try:
        pwrite_all(fd, new.pack(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return new


def read_bitmap(path: Path, header: LogHeader) -> bytes:
    with path.open("rb") as f:
        data = pread(f.fileno(), header.bitmap_bytes, HEADER_SIZE)
    if len(data) < header.bitmap_bytes:
        data += bytes(header.bitmap_bytes - len(data))  # a sparse tail reads as zeros
    return data


def freeze(path: Path, *, identity: str) -> LogHeader:
    """Mark a log frozen (its layer is no longer active), recording the layer's identity."""
    header = read_header(path)
    return rewrite_header(
        path, dataclasses.replace(header, state=STATE_FROZEN, identity=identity, writer_pid=0)
    )


def set_identity(path: Path, identity: str) -> None:
    """Record a new identity (the backend changed the layer itself, e.g. relinked it)."""
    header = read_header(path)
    rewrite_header(path, dataclasses.replace(header, identity=identity))


# -- bitmaps as byte ranges ---------------------------------------------------------------
_NONZERO = re.compile(rb"[^\x00]+")


def bitmap_ranges(
    bits: bytes, virtual_size: int, block_size: int = BLOCK_SIZE
) -> tuple[tuple[int, int], ...]:
    """Coalesced ``(offset, length)`` ranges of the set bits, clipped to ``virtual_size``."""
    out: list[tuple[int, int]] = []
    run_start = run_end = -1
    for match in _NONZERO.finditer(bits):
        base = match.start() * 8
        for i, byte in enumerate(match.group()):
            if byte == 0:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    block = base + i * 8 + bit
                    if block == run_end:
                        run_end += 1
                    else:
                        if run_start >= 0:
                            out.append((run_start, run_end))
                        run_start, run_end = block, block + 1
    if run_start >= 0:
        out.append((run_start, run_end))
    ranges = []
    for first, stop in out:
        start = first * block_size
        end = min(stop * block_size, virtual_size)
        if end > start:
            ranges.append((start, end - start))
    return tuple(ranges)


def union(bitmaps: list[bytes], size: int) -> bytes:
    """Bitwise OR of equally sized bitmaps."""
    acc = 0
    for bits in bitmaps:
        acc |= int.from_bytes(bits[:size].ljust(size, b"\x00"), "little")
    return acc.to_bytes(size, "little")


# -- the writers' side --------------------------------------------------------------------
class LogWriter:
    """The open log of a writer's active layer: marks blocks before their data is written."""

    def __init__(self, path: Path, fd: int, header: LogHeader, bits: bytearray) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self._bits = bits
        self._closed = False

    @classmethod
    def open(
        cls, path: Path, *, disk_id: str, layer: str, virtual_size: int, boot: uuid.UUID
    ) -> LogWriter:
        """Open the log of an active layer for writing, switching it to ``open``.

        A missing log is started with the ``untracked`` flag, a damaged or foreign one replaced
        with the ``replaced`` flag, and one left ``open`` in another boot gets the ``reboot``
        flag: the backend turns each into a reason why tracking cannot be trusted. A frozen log
        is refused: its layer must never be written again."""
        flags = 0
        header: LogHeader | None
        try:
            header = read_header(path)
            check_header(header, path, disk_id=disk_id, layer=layer)
            if header.virtual_size != virtual_size:
                raise ChangeLogError(
                    f"{path}: change log is for a {header.virtual_size}-byte disk, the layer "
                    f"is {virtual_size} bytes"
                )
        except ChangeLogMissing:
            header, flags = None, FLAG_UNTRACKED
        except ChangeLogError:
            header, flags = None, FLAG_REPLACED
        if header is None:
            create_log(
                path,
                disk_id=disk_id,
                layer=layer,
                virtual_size=virtual_size,
                identity="",
                flags=flags,
            )
            header = read_header(path)
        if header.state == STATE_FROZEN:
            raise ChangeLogError(
                f"{path}: the layer {layer} of disk {disk_id} is frozen (part of a checkpoint); "
                "it must not be written",
                hint="reopen the VM: its vm.json names the current active layer",
            )
        if header.state == STATE_OPEN and header.boot != boot:
            flags |= FLAG_REBOOT
        fd = os.open(path, os.O_RDWR | O_BINARY)
        try:
            opened = dataclasses.replace(
                header,
                state=STATE_OPEN,
                flags=header.flags | flags,
                boot=boot,
                writer_pid=os.getpid(),
                opened_at=time.time(),
                sequence=header.sequence + 1,
            )
            pwrite_all(fd, opened.pack(), 0)
            os.fsync(fd)  # "open" is durable before any data write it covers
            bits = bytearray(pread(fd, opened.bitmap_bytes, HEADER_SIZE))
            bits.extend(bytes(opened.bitmap_bytes - len(bits)))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, opened, bits)

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of ``[offset, offset + length)``; written before the caller's data."""
        if length <= 0:
            return
        first = offset >> _BLOCK_SHIFT
        last = (offset + length - 1) >> _BLOCK_SHIFT
        bits = self._bits
        if first == last:
            byte, mask = first >> 3, 1 << (first & 7)
            if bits[byte] & mask:
                return
            bits[byte] |= mask
            pwrite_all(self._fd, bits[byte : byte + 1], HEADER_SIZE + byte)
            return
        changed = False
        for block in range(first, last + 1):
            byte, mask = block >> 3, 1 << (block & 7)
            if not bits[byte] & mask:
                bits[byte] |= mask
                changed = True
        if changed:
            b0, b1 = first >> 3, (last >> 3) + 1
            pwrite_all(self._fd, bits[b0:b1], HEADER_SIZE + b0)

    def close_clean(self, identity: str) -> None:
        """The layer is flushed and closed: make the bits durable, then record ``clean``."""
        if self._closed:
            return
        try:
            os.fsync(self._fd)
            clean = dataclasses.replace(
                self.header,
                state=STATE_CLEAN,
                identity=identity,
                writer_pid=0,
                sequence=self.header.sequence + 1,
            )
            pwrite_all(self._fd, clean.pack(), 0)
            os.fsync(self._fd)
            self.header = clean
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without changing the state (the log stays ``open``, as after a crash)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
