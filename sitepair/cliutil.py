"""What every sitepair command-line tool shares: error handling, tables, JSON, progress bars.

``run_main`` is the single place where a command's errors become one readable line on standard
error and an exit status; operators never see a traceback (set ``SITEPAIR_DEBUG=1`` to get one).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from sitepair.errors import SitepairError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def run_main(prog: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except SitepairError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"{prog}: hint: {exc.hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("SITEPAIR_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc} "
            "(run with SITEPAIR_DEBUG=1 for details, and please report it)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def proto_to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any, out: TextIO | None = None) -> None:
    if isinstance(value, Message):
        value = proto_to_dict(value)
    elif isinstance(value, list) and value and isinstance(value[0], Message):
        value = [proto_to_dict(v) for v in value]
    print(json.dumps(value, indent=2, sort_keys=True, default=str), file=out or sys.stdout)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    cells = [
        [str(c) for c in headers],
        *[[("-" if c in (None, "") else str(c)) for c in r] for r in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    if not rows:
        print("(none)", file=out)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    frac = min(max(done / total, 0.0), 1.0)
    filled = round(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}%"


def confirm(question: str, *, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise SitepairError(f"{question} Refusing without --yes (not a terminal)")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")
