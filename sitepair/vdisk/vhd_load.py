"""Opening a VHD file: its footers, dynamic disk header, parent locators and BAT, checked.

:class:`VhdFile` is the base of :class:`sitepair.vdisk.vhd.VhdDisk`: it reads and checks the
file's structures (the footer at the end, or its copy at offset 0 if the end one is damaged) and
keeps them in memory; :mod:`sitepair.vdisk.vhd_read` adds reading and :mod:`sitepair.vdisk.vhd`
writing, the repairs a writable open makes, and the parent chain. The structures themselves are
parsed in :mod:`sitepair.vdisk.vhd_layout`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sitepair.errors import VirtualDiskError
from sitepair.vdisk import vhd_layout as L
from sitepair.vdisk.base import DiskFormat, SubFormat, VirtualDisk
from sitepair.vdisk.fileio import (
    file_size,
    pread_exact,
    round_up,
)

__all__ = ["DEFAULT_BLOCK_SIZE", "VhdFile"]

MiB = 1 << 20
DEFAULT_BLOCK_SIZE = 2 * MiB

_SUBFORMAT_OF = {
    L.DISK_FIXED: SubFormat.FIXED,
    L.DISK_DYNAMIC: SubFormat.DYNAMIC,
    L.DISK_DIFFERENCING: SubFormat.DIFFERENCING,
}


class VhdFile(VirtualDisk):
    """The structures of one opened VHD file, read and checked (no guest I/O yet)."""

    format = DiskFormat.VHD

    def __init__(self, path: Path, fd: int, *, read_only: bool) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        self.parent = None
        self._fd = fd
        self._details: dict[str, object] = {}
        #: What a writable open repaired (see :mod:`sitepair.vdisk.vhd`), for ``info``.
        self._repairs: list[str] = []
        self._load()

    # -- loading ------------------------------------------------------------------------
    def _load(self) -> None:
        path, fd = self.path, self._fd
        size = file_size(fd)
        if size < L.FOOTER_SIZE:
            raise VirtualDiskError(
                f"{path}: {size} bytes is too small to be a VHD image (the footer alone is "
                f"{L.FOOTER_SIZE} bytes)"
            )
        tail = pread_exact(fd, L.FOOTER_SIZE, size - L.FOOTER_SIZE, path, "footer")
        head = pread_exact(fd, L.FOOTER_SIZE, 0, path, "footer copy")
        end_footer: L.Footer | None = None
        copy_footer: L.Footer | None = None
        end_error = copy_error = None
        try:
            end_footer = L.parse_footer(tail, f"{path}: footer at the end of the file")
        except VirtualDiskError as exc:
            end_error = exc
        if head[:8] == L.FOOTER_COOKIE:
            try:
                copy_footer = L.parse_footer(head, f"{path}: footer copy at offset 0")
            except VirtualDiskError as exc:
                copy_error = exc
        self._end_footer_ok = end_footer is not None
        self._copy_needs_repair = False
        if end_footer is not None:
            footer = end_footer
            self._details["footer"] = "end of file"
            if footer.disk_type != L.DISK_FIXED:
                if copy_footer is None:
                    why = copy_error.message if copy_error else "missing"
                    self._details["footer_copy"] = f"damaged: {why}"
                    self._copy_needs_repair = True
                elif head != tail:
                    self._details["footer_copy"] = "differs from the footer at the end"
                    self._copy_needs_repair = True
                else:
                    self._details["footer_copy"] = "ok"
        elif copy_footer is not None and copy_footer.disk_type != L.DISK_FIXED:
            footer = copy_footer
            assert end_error is not None
            self._details["footer"] = (
                f"the footer at the end of the file is damaged ({end_error.message}); "
                "read using the copy at offset 0"
            )
            self._details["footer_copy"] = "ok"
        else:
            if tail[:8] != L.FOOTER_COOKIE and head[:8] != L.FOOTER_COOKIE:
                raise VirtualDiskError(
                    f"{path}: not a VHD image (no 'conectix' footer at the end or at the start "
                    "of the file)"
                )
            reasons = [e.message for e in (end_error, copy_error) if e is not None]
            if copy_footer is not None:
                reasons.append(
                    f"{path}: the copy at offset 0 describes a fixed disk, which has no copy"
                )
            raise VirtualDiskError("; ".join(reasons))
        self._footer = footer
        # The footer exactly as found (reserved bytes included), for every copy we write.
        self._footer_bytes = tail if end_footer is not None else head
        self.subformat = _SUBFORMAT_OF[footer.disk_type]
        self._size = footer.current_size
        self._file_end = size
        if footer.disk_type == L.DISK_FIXED:
            self._load_fixed(size)
        else:
            self._load_dynamic(size)

    def _load_fixed(self, size: int) -> None:
        data_area = size - L.FOOTER_SIZE
        if data_area < self._size:
            raise VirtualDiskError(
                f"{self.path}: truncated fixed VHD: the data area holds {data_area} bytes but "
                f"the footer says the virtual size is {self._size}"
            )
        self._bs = DEFAULT_BLOCK_SIZE
        self._n = 0

    def _load_dynamic(self, size: int) -> None:
        path, fd, footer = self.path, self._fd, self._footer
        # Where the data may go: up to the end footer, or to the end of the file if that
        # footer is missing (a crash while appending a block; the copy at 0 is in use).
        limit = size - L.FOOTER_SIZE if self._end_footer_ok else size
        hoff = footer.data_offset
        if hoff + L.HEADER_SIZE > limit:
            raise VirtualDiskError(
                f"{path}: the dynamic disk header at file offset {hoff} lies beyond the end of "
                f"the file ({size} bytes): the image is truncated"
            )
        header = L.parse_dynamic_header(
            pread_exact(fd, L.HEADER_SIZE, hoff, path, "dynamic disk header"),
            f"{path}: dynamic disk header",
        )
        bs = header.block_size
        n = L.bat_entries_needed(self._size, bs)
        if header.max_table_entries < n:
            raise VirtualDiskError(
                f"{path}: the BAT has {header.max_table_entries} entries, too few for a virtual "
                f"size of {self._size} bytes in {bs}-byte blocks ({n} needed)"
            )
        if n > L.MAX_BAT_ENTRIES:
            raise VirtualDiskError(
                f"{path}: a BAT of {n} entries ({self._size} bytes in {bs}-byte blocks) is "
                f"larger than this implementation supports ({L.MAX_BAT_ENTRIES})"
            )
        bat_region = round_up(header.max_table_entries * 4, L.SECTOR)
        regions = [
            L.Region(0, L.FOOTER_SIZE, "footer copy"),
            L.Region(hoff, hoff + L.HEADER_SIZE, "dynamic disk header"),
            L.Region(header.table_offset, header.table_offset + bat_region, "BAT"),
        ]
        if header.table_offset + bat_region > limit:
            raise VirtualDiskError(
                f"{path}: the BAT ({header.max_table_entries} entries at file offset "
                f"{header.table_offset}) extends beyond the end of the file ({size} bytes)"
            )
        # Read the sectors holding the first n entries, so rewriting a BAT sector keeps any
        # entries past n exactly as they were.
        keep = min(header.max_table_entries, round_up(n * 4, L.SECTOR) // 4)
        bat = L.parse_bat(
            pread_exact(fd, keep * 4, header.table_offset, path, "BAT"),
            keep,
        )
        reserved_end = 0
        locator_data: list[tuple[L.Locator, str]] = []
        if footer.disk_type == L.DISK_DIFFERENCING:
            for idx, loc in enumerate(header.locators):
                if loc.platform_code not in (L.PLATFORM_W2RU, L.PLATFORM_W2KU):
                    continue
                if loc.data_length == 0:
                    continue
                name = f"parent locator {idx} ({loc.platform})"
                if loc.data_length > L.MAX_LOCATOR_BYTES:
                    raise VirtualDiskError(
                        f"{path}: {name} claims {loc.data_length} bytes of path (at most "
                        f"{L.MAX_LOCATOR_BYTES} are accepted)"
                    )
                if loc.data_offset + loc.data_length > limit:
                    raise VirtualDiskError(
                        f"{path}: {name} at file offset {loc.data_offset} points beyond the end "
                        f"of the file ({size} bytes)"
                    )
                regions.append(L.Region(loc.data_offset, loc.data_offset + loc.data_length, name))
                reserved_end = max(reserved_end, min(loc.reserved_end(), limit))
                raw = pread_exact(fd, loc.data_length, loc.data_offset, path, name)
                locator_data.append((loc, L.decode_locator(raw, loc.platform, f"{path}: {name}")))
        L.check_metadata_regions(regions, limit, path)
        highest = L.check_layout(
            bat=bat[:n], block_size=bs, metadata=regions, data_limit=limit, where=path
        )
        self._header = header
        self._regions = regions
        self._locators = locator_data
        self._bat = bat
        self._n = n
        self._bs = bs
        self._spb = bs // L.SECTOR
        self._bm_bytes = L.bitmap_bytes(bs)
        self._full = bytearray(n)
        self._data_end = round_up(
            max(highest, reserved_end, *(r.end for r in regions)),
            L.SECTOR,
        )
        if footer.disk_type == L.DISK_DIFFERENCING:
            self._details["parent_unique_id"] = str(header.parent_unique_id)

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
