"""Virtual disks: raw, VHD and VHDX (fixed, dynamic, differencing); qcow2 read-only.

Entry points:

- :func:`open_disk` opens any supported image, detecting its format from its content;
- :func:`create_disk` creates one and returns it opened for writing;
- :func:`detect_format` says what a file is without opening it as a disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sitepair.errors import VirtualDiskError
from sitepair.vdisk.base import DiskFormat, DiskInfo, SubFormat, VirtualDisk, coalesce
from sitepair.vdisk.fileio import file_size, open_image, pread
from sitepair.vdisk.qcow2 import open_qcow2
from sitepair.vdisk.qcow2_header import probe_qcow2
from sitepair.vdisk.raw import create_raw, open_raw
from sitepair.vdisk.vhd import open_vhd, probe_vhd, set_parent_vhd
from sitepair.vdisk.vhd_create import create_vhd
from sitepair.vdisk.vhd_layout import FOOTER_SIZE, parse_footer
from sitepair.vdisk.vhdx import open_vhdx, set_parent_vhdx
from sitepair.vdisk.vhdx_create import create_vhdx
from sitepair.vdisk.vhdx_format import probe_vhdx

__all__ = [
    "WRITABLE_FORMATS",
    "DiskFormat",
    "DiskInfo",
    "SubFormat",
    "VirtualDisk",
    "VirtualDiskError",
    "coalesce",
    "create_disk",
    "detect_format",
    "open_disk",
    "set_parent",
]

#: Extensions that may hold a raw image (anything else must be recognised by its content).
RAW_EXTENSIONS = frozenset({".raw", ".img"})
#: Extensions whose files must be recognised; never treated as raw.
VHD_EXTENSIONS = frozenset({".vhd", ".avhd"})
VHDX_EXTENSIONS = frozenset({".vhdx", ".avhdx"})
#: The formats sitepair creates and writes (qcow2 is read-only).
WRITABLE_FORMATS = (DiskFormat.RAW, DiskFormat.VHD, DiskFormat.VHDX)
_HEAD = 64 * 1024


def detect_format(path: str | os.PathLike[str]) -> DiskFormat | None:
    """The format a file's content declares: VHDX by its file identifier, VHD by a footer at
    the start or the end, qcow2 by its magic at the start; ``None`` if none (the file may be a
    raw image).

    The first bytes of a fixed VHD (and of a raw image) are the guest's own sector 0, so a
    guest can write a qcow2 header there, and a qcow2 header names a backing file that is
    then read as guest data. So a VHD footer wins over a qcow2 magic: a file with both is a
    VHD if its footer is valid, and refused as ambiguous otherwise, unless the file is named
    ``*.qcow2``: the end of a qcow2 file can be guest data too, and sitepair names its qcow2
    overlays itself. Callers that know an image is qcow2 (or raw) pass the format instead of
    detecting it."""
    p = Path(path)
    fd = open_image(p, read_only=True)
    try:
        size = file_size(fd)
        head = pread(fd, _HEAD, 0)
        tail = pread(fd, FOOTER_SIZE, size - FOOTER_SIZE) if size >= FOOTER_SIZE else b""
    finally:
        os.close(fd)
    if probe_vhdx(head):
        return DiskFormat.VHDX
    if probe_qcow2(head):
        if p.suffix.lower() == ".qcow2":
            # The qemu backend names its overlays *.qcow2. The end of an overlay file can be
            # a data cluster the guest filled, so a guest could plant a VHD footer there; a
            # name sitepair gave (never guest-controlled) settles it.
            return DiskFormat.QCOW2
        if not probe_vhd(b"", tail):
            return DiskFormat.QCOW2
        try:
            parse_footer(tail, f"{p}: footer at the end")
        except VirtualDiskError as exc:
            raise VirtualDiskError(
                f"{p}: ambiguous image: a qcow2 header at the start and a damaged VHD footer at "
                f"the end ({exc.message})",
                hint="pass the format explicitly (-f qcow2 or -f vhd)",
            ) from exc
        return DiskFormat.VHD
    if probe_vhd(head, tail):
        return DiskFormat.VHD
    return None


def open_disk(
    path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    format: DiskFormat | str | None = None,
) -> VirtualDisk:
    """Open an image, detecting its format from its content unless ``format`` is given.

    A file with no VHD/VHDX/qcow2 signature is opened as raw only if its name ends in .raw or
    .img or the caller passes ``format=DiskFormat.RAW``; an unrecognised .vhd/.vhdx is an
    error, never silently raw. qcow2 images open only with ``read_only=True`` (sitepair does
    not write qcow2)."""
    p = Path(path)
    fmt = DiskFormat(format) if format is not None else detect_format(p)
    if fmt is None:
        ext = p.suffix.lower()
        if ext in RAW_EXTENSIONS:
            fmt = DiskFormat.RAW
        elif ext in VHD_EXTENSIONS | VHDX_EXTENSIONS:
            kind = "VHDX" if ext in VHDX_EXTENSIONS else "VHD"
            raise VirtualDiskError(
                f"{p}: not a {kind} image: no {kind} signature found (the file is damaged or "
                "is not a virtual disk)"
            )
        else:
            raise VirtualDiskError(
                f"{p}: unrecognised image format (no VHD, VHDX or qcow2 signature)",
                hint="name raw images .raw or .img, or pass the raw format explicitly",
            )
    if fmt is DiskFormat.VHDX:
        return open_vhdx(p, read_only=read_only)
    if fmt is DiskFormat.VHD:
        return open_vhd(p, read_only=read_only)
    if fmt is DiskFormat.QCOW2:
        return open_qcow2(p, read_only=read_only)
    return open_raw(p, read_only=read_only)


def create_disk(
    path: str | os.PathLike[str],
    *,
    format: DiskFormat | str,
    subformat: SubFormat | str,
    size: int | None = None,
    block_size: int | None = None,
    parent: str | os.PathLike[str] | None = None,
    **options: Any,
) -> VirtualDisk:
    """Create an image and return it opened for writing.

    ``size`` is required except for differencing disks (which take the parent's size).
    ``block_size`` defaults to the format's own default (VHD 2 MiB, VHDX 32 MiB); raw images
    are always sparse and have no subformat other than fixed (dynamic is accepted as a
    synonym: the file is sparse either way). Extra ``options`` go to the format
    (VHDX: ``logical_sector_size``, ``physical_sector_size``)."""
    fmt = DiskFormat(format)
    sub = SubFormat(subformat)
    p = Path(path)
    if fmt not in WRITABLE_FORMATS:
        raise VirtualDiskError(
            f"{p}: sitepair does not create {fmt} images (it reads them only)",
            hint="create a VHDX, VHD or raw image",
        )
    if fmt is DiskFormat.RAW:
        if sub is SubFormat.DIFFERENCING or parent is not None:
            raise VirtualDiskError(f"{p}: raw images cannot be differencing disks")
        if options:
            raise VirtualDiskError(f"{p}: raw images take no options ({', '.join(options)})")
        if size is None:
            raise VirtualDiskError(f"{p}: a size is needed to create a raw image")
        return create_raw(p, size=size)
    if fmt is DiskFormat.VHD:
        if options:
            raise VirtualDiskError(f"{p}: VHD takes no options ({', '.join(options)})")
        kwargs: dict[str, Any] = {} if block_size is None else {"block_size": block_size}
        return create_vhd(p, size=size, subformat=sub, parent=parent, **kwargs)
    kwargs = dict(options)
    if block_size is not None:
        kwargs["block_size"] = block_size
    if parent is not None:
        kwargs["parent"] = Path(parent)
    if size is None and sub is not SubFormat.DIFFERENCING:
        raise VirtualDiskError(f"{p}: a size is needed to create a {sub} VHDX")
    return create_vhdx(p, size=size or 0, subformat=sub, **kwargs)


def set_parent(child: str | os.PathLike[str], new_parent: str | os.PathLike[str]) -> None:
    """Relink a differencing disk to a new parent, with its format's own function."""
    fmt = detect_format(child)
    if fmt is DiskFormat.VHD:
        set_parent_vhd(child, new_parent)
    elif fmt is DiskFormat.VHDX:
        set_parent_vhdx(Path(child), Path(new_parent))
    else:
        raise VirtualDiskError(f"{child}: not a VHD or VHDX image; it cannot have a parent")
