"""Operations on any virtual disk, written against the :class:`VirtualDisk` interface only:
compare, convert, flatten, merge, digest.

They read only what the images have allocated (``allocated_ranges``): a region that neither
side has allocated reads as zeros on both sides by the interface's guarantee, so it is never
read. That makes a sparse 1 TiB image as cheap to compare or convert as its data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import blake3

from sitepair.errors import VirtualDiskError
from sitepair.fsutil import fsync_dir
from sitepair.vdisk import create_disk, detect_format, open_disk, set_parent
from sitepair.vdisk.base import DiskFormat, SubFormat, VirtualDisk, coalesce
from sitepair.vdisk.fileio import is_zero

MiB = 1 << 20
#: Unit of work for copying and comparing: large enough to amortise per-call costs, small
#: enough to keep memory flat.
CHUNK = 4 * MiB


def _chunks(ranges: Iterable[tuple[int, int]], limit: int) -> Iterator[tuple[int, int]]:
    """Split ``(offset, length)`` ranges into pieces of at most CHUNK bytes, clipped to
    ``limit`` and aligned to CHUNK boundaries so consecutive ranges read in even pieces."""
    for off, length in ranges:
        end = min(off + length, limit)
        pos = off
        while pos < end:
            step = min(end, (pos // CHUNK + 1) * CHUNK) - pos
            yield pos, step
            pos += step


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length, unequal buffers."""
    step = 4096
    for pos in range(0, len(a), step):
        if a[pos : pos + step] != b[pos : pos + step]:
            for i in range(pos, min(pos + step, len(a))):
                if a[i] != b[i]:
                    return i
    raise AssertionError("buffers do not differ")  # pragma: no cover - caller checked


def _first_nonzero(data: bytes) -> int:
    stripped = data.lstrip(b"\x00")
    return len(data) - len(stripped)


def compare(a: VirtualDisk, b: VirtualDisk) -> int | None:
    """First guest offset where ``a`` and ``b`` differ, or ``None`` if identical.

    Like ``qemu-img compare`` without ``-s``: disks of different sizes are equal if the
    larger one reads as zeros beyond the smaller one's end."""
    common = min(a.virtual_size, b.virtual_size)
    ranges = coalesce(heapq.merge(a.allocated_ranges(), b.allocated_ranges()))
    for off, length in _chunks(ranges, common):
        da, db = a.read(off, length), b.read(off, length)
        if da != db:
            return off + _first_difference(da, db)
    longer = a if a.virtual_size > b.virtual_size else b
    for off, length in _chunks(longer.allocated_ranges(), longer.virtual_size):
        if off + length <= common:
            continue
        start = max(off, common)
        data = longer.read(start, off + length - start)
        if not is_zero(data):
            return start + _first_nonzero(data)
    return None


def _copy(src: VirtualDisk, dst: VirtualDisk) -> None:
    """Copy every allocated, non-zero piece of ``src`` into ``dst`` (which reads as zeros)."""
    size = min(src.virtual_size, dst.virtual_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pieces = iter(list(_chunks(src.allocated_ranges(), size)))
        pending = None
        nxt = next(pieces, None)
        if nxt is not None:
            pending = (nxt, reader.submit(src.read, *nxt))
        while pending is not None:
            (off, _length), future = pending
            nxt = next(pieces, None)
            pending = (nxt, reader.submit(src.read, *nxt)) if nxt is not None else None
            data = future.result()  # read the next piece while this one is written
            if not is_zero(data):
                dst.write(off, data)
                dst.start_writeback()  # the caller's flush then finds the disk work done


def _temp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial{dst.suffix}")


def _place(tmp: Path, dst: Path) -> None:
    """Give the finished ``tmp`` its final name ``dst``, never replacing an existing file."""
    try:
        os.link(tmp, dst)  # atomic and exclusive
    except FileExistsError as exc:
        raise VirtualDiskError(f"{dst}: appeared while converting; not replaced") from exc
    except OSError:
        # No hard links on this file system: check, then rename.
        if dst.exists():
            raise VirtualDiskError(f"{dst}: appeared while converting; not replaced") from None
        tmp.replace(dst)
        return
    tmp.unlink()


def convert(
    src: str | os.PathLike[str] | VirtualDisk,
    dst: str | os.PathLike[str],
    format: DiskFormat | str,
    subformat: SubFormat | str,
    block_size: int | None = None,
    **options: Any,
) -> None:
    """Write the guest view of ``src`` (a path or an open disk; a differencing chain is
    flattened) into a new standalone image ``dst``, copying only allocated, non-zero data.

    ``dst`` is built under a temporary name in the same folder and renamed into place when
    complete and durable, so an interrupted convert never leaves a half-written ``dst``.
    An existing ``dst`` is refused."""
    dst_path = Path(dst)
    sub = SubFormat(subformat)
    if sub is SubFormat.DIFFERENCING:
        raise VirtualDiskError(f"{dst_path}: convert writes standalone images (fixed or dynamic)")
    if dst_path.exists():
        raise VirtualDiskError(f"{dst_path}: already exists; refusing to overwrite it")
    with contextlib.ExitStack() as stack:
        if isinstance(src, VirtualDisk):
            source = src
        else:
            source = stack.enter_context(open_disk(src, read_only=True))
        tmp = _temp_path(dst_path)
        try:
            with create_disk(
                tmp,
                format=format,
                subformat=sub,
                size=source.virtual_size,
                block_size=block_size,
                **options,
            ) as target:
                _copy(source, target)
                target.flush()
            _place(tmp, dst_path)
            fsync_dir(dst_path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def flatten(
    path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: DiskFormat | str | None = None,
    subformat: SubFormat | str = SubFormat.DYNAMIC,
    block_size: int | None = None,
) -> None:
    """Write the whole chain ending at ``path`` into one standalone image ``dst`` (by default
    of the same format as ``path``, dynamic)."""
    with open_disk(path, read_only=True) as disk:
        convert(disk, dst, format or disk.format, subformat, block_size)


def merge(
    child_path: str | os.PathLike[str], *, relink: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Merge a differencing disk into its parent and remove it.

    ``relink`` lists the children of ``child_path`` (the "grandchildren"), which are pointed at
    the parent afterwards. Other children of the parent (siblings of ``child_path``) would see
    the merged data and become inconsistent: the caller must ensure there are none.

    Order, chosen so a crash at any point loses nothing and re-running ``merge`` finishes:

    1. Check every grandchild names ``child_path`` (or already the parent) as its parent.
    2. Write the child's own layer (``allocated_ranges(this_layer_only=True)``, read through
       the chain) into the parent opened writable, then flush the parent. Until the child is
       removed, every sector the parent changed is one the child overrides, so the child and
       its grandchildren still read exactly as before.
    3. Relink each grandchild to the parent (each durable on its own). A grandchild reads the
       same through the child or directly through the parent, since the parent now holds the
       child's data.
    4. Remove the child file and sync the folder.

    VHDX parents record which parent state they were linked to (DataWriteGuid); after step 2
    the child no longer matches its parent, so after a crash between 2 and 4 the child can
    only be discarded or re-merged by relinking it first (``set_parent``)."""
    child_file = Path(child_path)
    grandchildren = [Path(g) for g in relink]
    with open_disk(child_file, read_only=True) as child:
        if child.parent is None:
            raise VirtualDiskError(f"{child_file}: not a differencing disk; nothing to merge into")
        parent_file = child.parent.path
    parent_real = parent_file.resolve()
    child_real = child_file.resolve()
    pending: list[Path] = []
    for g in grandchildren:
        if g.resolve() in (child_real, parent_real):
            raise VirtualDiskError(f"{g}: cannot relink the merged disk or its parent")
        with open_disk(g, read_only=True) as gdisk:
            above = gdisk.parent.path.resolve() if gdisk.parent is not None else None
        if above == parent_real:
            continue  # relinked by an earlier, interrupted merge
        if above != child_real:
            raise VirtualDiskError(
                f"{g}: its parent is {above}, not {child_file}; refusing to relink it"
            )
        pending.append(g)

    with open_disk(child_file, read_only=True) as child:
        # Swap the child's read-only parent for a writable open of the same file: the child's
        # reads fall through to it, and the child's layer is written into it.
        assert child.parent is not None
        child.parent.close()
        child.parent = None
        child.parent = open_disk(parent_file, read_only=False)
        parent = child.parent
        for off, length in _chunks(
            child.allocated_ranges(this_layer_only=True), child.virtual_size
        ):
            parent.write(off, child.read(off, length))
            parent.start_writeback()
        parent.flush()
    for g in pending:
        set_parent(g, parent_file)
    child_file.unlink()
    fsync_dir(child_file.parent)


def digest(disk: VirtualDisk, block_size: int, *, threads: int = 2) -> list[bytes]:
    """BLAKE3 digest (32 bytes) of each ``block_size`` block of the guest view, in order (the
    last block may be shorter). Blocks outside ``allocated_ranges`` are hashed as zeros
    without being read; the others are read and hashed in ``threads`` threads (blake3 and
    the reads release the GIL)."""
    out: list[bytes] = []
    for _first, digests, _allocated in iter_digests(disk, block_size, threads=threads):
        out.extend(digests)
    return out


def iter_digests(
    disk: VirtualDisk, block_size: int, *, threads: int = 2, window: int = 4096
) -> Iterator[tuple[int, list[bytes], set[int]]]:
    """What :func:`digest` computes, ``window`` blocks at a time: (first block, digests of the
    window, indexes of the window's blocks that hold allocated data). Memory stays bounded by
    the window and the disk's allocation map, whatever the virtual size (a 64 TiB sparse disk
    is a billion 64 KiB blocks)."""
    if block_size <= 0:
        raise VirtualDiskError(f"digest block size must be positive (got {block_size})")
    if window <= 0:
        raise VirtualDiskError(f"digest window must be positive (got {window})")
    size = disk.virtual_size
    count = -(-size // block_size)
    # Allocated block indexes as sorted, disjoint [first, end] runs: bounded by the allocation
    # map, not by the virtual size.
    runs: list[tuple[int, int]] = []
    last = -1
    for off, length in disk.allocated_ranges():
        if length <= 0:
            continue
        first_block = max(off // block_size, last + 1)
        end_block = (off + length - 1) // block_size
        if end_block >= first_block:
            if runs and runs[-1][1] + 1 == first_block:
                runs[-1] = (runs[-1][0], end_block)
            else:
                runs.append((first_block, end_block))
        last = max(last, end_block)
    zero_digests: dict[int, bytes] = {}

    def zero_digest(n: int) -> bytes:
        if n not in zero_digests:
            hasher = blake3.blake3()
            remaining = n
            zeros = bytes(min(n, CHUNK))
            while remaining:
                step = min(remaining, len(zeros))
                hasher.update(memoryview(zeros)[:step])
                remaining -= step
            zero_digests[n] = hasher.digest()
        return zero_digests[n]

    local = threading.local()

    def hash_block(index: int) -> bytes:
        # Each thread reads into its own reused buffer (read_into): no allocation per read.
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(min(CHUNK, max(block_size, 1))))
        start = index * block_size
        end = min(start + block_size, size)
        hasher = blake3.blake3()
        pos = start
        while pos < end:
            step = min(end - pos, len(buf))
            disk.read_into(pos, buf[:step])
            hasher.update(buf[:step])
            pos += step
        return hasher.digest()

    run = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for first in range(0, count, window):
            stop = min(first + window, count)
            wanted: list[int] = []
            while run < len(runs) and runs[run][1] < first:
                run += 1
            r = run
            while r < len(runs) and runs[r][0] < stop:
                wanted.extend(range(max(runs[r][0], first), min(runs[r][1] + 1, stop)))
                r += 1
            out = [zero_digest(min(block_size, size - i * block_size)) for i in range(first, stop)]
            for index, value in zip(wanted, pool.map(hash_block, wanted), strict=True):
                out[index - first] = value
            yield first, out, set(wanted)


__all__ = ["compare", "convert", "detect_format", "digest", "flatten", "iter_digests", "merge"]
