"""``sitepair-vdisk``: inspect, create, read, write, compare, convert and merge virtual disks.

qcow2 images (QEMU's overlays) are accepted wherever an image is only read (``info``, ``read``,
``compare``, the source of ``convert``); sitepair never creates or writes them.

Every failure prints one line, ``sitepair-vdisk: error: ...``, to standard error and exits
with status 2; ``compare`` exits 0 when the images are the same and 1 when they differ,
printing the first differing offset, like ``qemu-img compare``. Sizes and offsets accept
binary suffixes (``64M``, ``1G``, ``4K``, ``2T``) and ``0x`` hexadecimal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import argcomplete

from sitepair import cliutil
from sitepair.errors import InvalidArgument, SitepairError, VirtualDiskError

PROG = "sitepair-vdisk"
EXIT_SAME = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2
CHUNK = 4 << 20
_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


class UsageError(InvalidArgument):
    """A command-line mistake; reported like any other error."""


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; plain integers and ``0x`` hex are bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 4096, 64M, 1G, 0x1000)"
        )
    number, suffix = match.groups()
    return int(number, 0) << _SUFFIXES[suffix.upper()]


def parse_byte(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte value (0-255, e.g. 0xAB)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog=PROG,
        description="Inspect and manipulate VHD, VHDX and raw images; read qcow2 images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt_choices = ["raw", "vhd", "vhdx"]  # formats sitepair writes
    read_choices = [*fmt_choices, "qcow2"]  # and those it only reads
    image = "the image file (.vhd, .vhdx, .raw/.img, or qcow2 where only read)"

    p = sub.add_parser("info", help="describe an image (and its parents)")
    p.add_argument("path", help=image)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "-f", "--format", choices=read_choices, help="the image's format (default: detected)"
    )
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("create", help="create an image")
    p.add_argument("path", help="the image file to create (must not exist)")
    p.add_argument(
        "-O", "--format", choices=fmt_choices, help="image format (default: from the extension)"
    )
    p.add_argument(
        "--subformat",
        choices=["fixed", "dynamic", "differencing"],
        help="how space is allocated (default: differencing with --parent, else dynamic)",
    )
    p.add_argument(
        "--size", type=parse_size, help="virtual size, e.g. 64M or 1G (not with --parent)"
    )
    p.add_argument(
        "--block-size",
        type=parse_size,
        help="allocation block size, e.g. 2M (default: the format's, 2M for VHD, 32M for VHDX)",
    )
    p.add_argument("--parent", help="parent image of a differencing disk")
    p.add_argument("--logical-sector-size", type=int, help="VHDX: 512 or 4096 bytes (default 512)")
    p.add_argument(
        "--physical-sector-size", type=int, help="VHDX: 512 or 4096 bytes (default 4096)"
    )
    p.set_defaults(fn=_cmd_create)

    p = sub.add_parser("read", help="read guest bytes (to standard output or --out)")
    p.add_argument("path", help=image)
    p.add_argument("offset", type=parse_size, help="where to start, in bytes (e.g. 0, 1M, 0x200)")
    p.add_argument("length", type=parse_size, help="how many bytes to read (e.g. 512, 4K)")
    p.add_argument("--out", help="write the bytes to this file (default: standard output)")
    p.add_argument(
        "-f", "--format", choices=read_choices, help="the image's format (default: detected)"
    )
    p.set_defaults(fn=_cmd_read)

    p = sub.add_parser("write", help="write guest bytes")
    p.add_argument("path", help="the image file to write into")
    p.add_argument("offset", type=parse_size, help="where to start, in bytes (e.g. 0, 1M, 0x200)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pattern", type=parse_byte, help="fill with this byte (needs --length)")
    src.add_argument("--from", dest="from_file", help="copy this file's bytes")
    src.add_argument("--zero", action="store_true", help="zero the range (needs --length)")
    p.add_argument("--length", type=parse_size, help="bytes to write with --pattern/--zero")
    p.add_argument(
        "-f", "--format", choices=fmt_choices, help="the image's format (default: detected)"
    )
    p.set_defaults(fn=_cmd_write)

    p = sub.add_parser(
        "compare", help="compare guest contents: exit 0 same, 1 different (first offset printed)"
    )
    p.add_argument("a", help="the first image")
    p.add_argument("b", help="the second image")
    p.add_argument(
        "-f", dest="format_a", choices=read_choices, help="format of A (default: detected)"
    )
    p.add_argument(
        "-F", dest="format_b", choices=read_choices, help="format of B (default: detected)"
    )
    p.set_defaults(fn=_cmd_compare)

    p = sub.add_parser("convert", help="copy an image (a chain is flattened) into a new one")
    p.add_argument("src", help="the image to copy (its parents are read too)")
    p.add_argument("dst", help="the new image file (must not exist)")
    p.add_argument(
        "-O", "--format", choices=fmt_choices, help="output format (default: from the extension)"
    )
    p.add_argument(
        "--subformat",
        choices=["fixed", "dynamic"],
        default="dynamic",
        help="how the new image allocates space (default dynamic)",
    )
    p.add_argument(
        "--block-size", type=parse_size, help="the new image's block size (default: the format's)"
    )
    p.add_argument(
        "-f", dest="src_format", choices=read_choices, help="format of SRC (default: detected)"
    )
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("merge", help="merge a differencing disk into its parent and remove it")
    p.add_argument("child", help="the differencing disk to merge")
    p.add_argument(
        "--relink",
        action="append",
        default=[],
        metavar="GRANDCHILD",
        help="a child of CHILD to point at the parent afterwards (repeatable)",
    )
    p.set_defaults(fn=_cmd_merge)
    cliutil.add_completion_command(sub, PROG)
    return parser


def _format_from_extension(path: str, what: str) -> str:
    ext = Path(path).suffix.lower()
    mapping = {".vhd": "vhd", ".avhd": "vhd", ".vhdx": "vhdx", ".avhdx": "vhdx"}
    mapping |= {".raw": "raw", ".img": "raw"}
    if ext not in mapping:
        raise UsageError(f"cannot tell the {what} format from {path!r}; pass --format")
    return mapping[ext]


def describe_size(n: int) -> str:
    """``67108864`` -> ``"64 MiB"`` (exact binary units only, else bytes)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 10)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def _check_range(path: str, size: int, offset: int, length: int) -> None:
    if offset + length > size:
        raise VirtualDiskError(
            f"{path}: range [{offset}, {offset + length}) is outside the disk (virtual size {size})"
        )


def _print_info(info: Any, indent: str = "") -> None:
    rows = [
        ("image", info.path),
        ("format", f"{info.format.value} ({info.subformat.value})"),
        ("virtual size", f"{describe_size(info.virtual_size)} ({info.virtual_size} bytes)"),
        ("file size", f"{describe_size(info.file_size)} ({info.file_size} bytes)"),
        ("allocated", f"{describe_size(info.allocated_bytes)} ({info.allocated_bytes} bytes)"),
        ("block size", describe_size(info.block_size)),
        (
            "sector size",
            f"{info.logical_sector_size} logical, {info.physical_sector_size} physical",
        ),
        ("identity", str(info.identity) if info.identity else "-"),
    ]
    if info.change_token is not None:
        rows.append(("change token", str(info.change_token)))
    for key in sorted(info.details):
        value = info.details[key]
        if isinstance(value, list | dict):
            value = json.dumps(cliutil.jsonable(value))
        rows.append((key.replace("_", " "), str(value)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{indent}{key:<{width}}  {value}")
    if info.parent is not None:
        print(f"{indent}parent:")
        _print_info(info.parent, indent + "    ")


def _cmd_info(args: argparse.Namespace) -> int:
    from sitepair.vdisk import open_disk

    with open_disk(args.path, read_only=True, format=args.format) as disk:
        info = disk.info()
    if args.json:
        cliutil.print_json(info)
    else:
        _print_info(info)
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from sitepair.vdisk import create_disk

    fmt = args.format or _format_from_extension(args.path, "image")
    subformat = args.subformat or ("differencing" if args.parent else "dynamic")
    if subformat != "differencing" and args.size is None:
        raise UsageError("--size is needed (except for a differencing disk)")
    options: dict[str, Any] = {}
    for name in ("logical_sector_size", "physical_sector_size"):
        value = getattr(args, name)
        if value is not None:
            if fmt != "vhdx":
                raise UsageError(f"--{name.replace('_', '-')} applies to VHDX only")
            options[name] = value
    with create_disk(
        args.path,
        format=fmt,
        subformat=subformat,
        size=args.size,
        block_size=args.block_size,
        parent=args.parent,
        **options,
    ) as disk:
        size = disk.virtual_size
    print(f"created {args.path}: {fmt} {subformat}, {size} bytes")
    return 0


def _cmd_read(args: argparse.Namespace) -> int:
    from sitepair.vdisk import open_disk

    with open_disk(args.path, read_only=True, format=args.format) as disk:
        _check_range(args.path, disk.virtual_size, args.offset, args.length)
        out = Path(args.out).open("wb") if args.out else sys.stdout.buffer  # noqa: SIM115
        try:
            pos, end = args.offset, args.offset + args.length
            while pos < end:
                step = min(CHUNK, end - pos)
                out.write(disk.read(pos, step))
                pos += step
            out.flush()
        finally:
            if args.out:
                out.close()
    return 0


def _cmd_write(args: argparse.Namespace) -> int:
    from sitepair.vdisk import open_disk

    if (args.pattern is not None or args.zero) and args.length is None:
        raise UsageError("--length is needed with --pattern and --zero")
    if args.from_file is not None and args.length is not None:
        raise UsageError("--length does not go with --from (the file's size is used)")
    with open_disk(args.path, read_only=False, format=args.format) as disk:
        if args.from_file is not None:
            total = Path(args.from_file).stat().st_size
            _check_range(args.path, disk.virtual_size, args.offset, total)
            with Path(args.from_file).open("rb") as src:
                pos = args.offset
                while chunk := src.read(CHUNK):
                    disk.write(pos, chunk)
                    pos += len(chunk)
        elif args.zero:
            disk.write_zeroes(args.offset, args.length)
            total = args.length
        else:
            total = args.length
            _check_range(args.path, disk.virtual_size, args.offset, total)
            fill = bytes([args.pattern]) * min(CHUNK, total)
            pos, end = args.offset, args.offset + total
            while pos < end:
                step = min(len(fill), end - pos)
                disk.write(pos, fill[:step])
                pos += step
        disk.flush()
    print(f"wrote {total} bytes at offset {args.offset}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from sitepair.vdisk import open_disk
    from sitepair.vdisk.ops import compare

    with (
        open_disk(args.a, read_only=True, format=args.format_a) as a,
        open_disk(args.b, read_only=True, format=args.format_b) as b,
    ):
        where = compare(a, b)
        sizes_differ = a.virtual_size != b.virtual_size
    if where is None:
        if sizes_differ:
            print("Warning: image size mismatch!")
        print("Images are identical.")
        return EXIT_SAME
    print(f"Content mismatch at offset {where}!")
    return EXIT_DIFFERENT


def _cmd_convert(args: argparse.Namespace) -> int:
    from sitepair.vdisk import open_disk
    from sitepair.vdisk.ops import convert

    fmt = args.format or _format_from_extension(args.dst, "output")
    with open_disk(args.src, read_only=True, format=args.src_format) as src:
        convert(src, args.dst, fmt, args.subformat, args.block_size)
    print(f"converted {args.src} -> {args.dst} ({fmt} {args.subformat})")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from sitepair.vdisk.ops import merge

    merge(args.child, relink=args.relink)
    relinked = f", relinked {len(args.relink)}" if args.relink else ""
    print(f"merged {args.child} into its parent{relinked}")
    return 0


def _fail(message: str, code: str, hint: str | None = None) -> int:
    cliutil.report_error(PROG, message, hint=hint, code=code, one_line=True)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sitepair-vdisk`` console script; returns the exit status."""
    parser = build_parser()
    argcomplete.autocomplete(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    with cliutil.json_errors("--json" in argv):
        try:
            args = parser.parse_args(argv)
            return int(args.fn(args))
        except SitepairError as exc:
            return _fail(exc.message, exc.status, exc.hint)
        except BrokenPipeError:
            # The reader went away (``... | head``); silence the flush at exit too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_ERROR
        except KeyboardInterrupt:
            return _fail("interrupted", cliutil.Interrupted.status)
        except OSError as exc:
            cliutil.report_os_error(PROG, exc)
            return EXIT_ERROR
        except Exception as exc:  # the last line of defence: never a traceback
            if os.environ.get("SITEPAIR_DEBUG"):
                raise
            return _fail(
                f"internal error: {type(exc).__name__}: {exc} (set SITEPAIR_DEBUG=1 for a "
                "traceback)",
                "INTERNAL",
            )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
