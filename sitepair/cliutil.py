"""What every sitepair command-line tool shares: parsing, errors, JSON, tables, progress.

``run_main`` is the single place where a command's errors become a readable message on standard
error and an exit status; operators never see a traceback (set ``SITEPAIR_DEBUG=1`` to get one).
When the command line asked for ``--json``, the error is one JSON line instead
(:func:`report_error`), argparse's own refusals included (:class:`Parser`).

``print_json`` is the one encoder of every ``--json`` output (:func:`jsonable`): protobuf messages
with every field (zero values too), 64-bit integers as JSON numbers, enums by name, and the JSON
documents the wire carries as strings (``*_json`` fields) as objects.

Shell completion is argcomplete's, driven by each program's argparse tree: :func:`main` hands
the parser to it before parsing, and :func:`add_completion_command` adds ``completion SHELL``,
which prints the shell code to load.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import enum
import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import PurePath
from typing import Any, NoReturn, TextIO, cast

import argcomplete
from argcomplete.shell_integration import shellcode
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from sitepair.durations import format_size
from sitepair.errors import SitepairError

EXIT_OK = 0
EXIT_ERROR = 1
#: argparse's status for a command line it refuses.
EXIT_USAGE = 2
#: 128 + SIGINT, as a shell reports a program stopped by Ctrl-C.
EXIT_INTERRUPTED = 130

#: The shells ``completion SHELL`` prints code for.
SHELLS = ("bash", "zsh", "fish")


class Interrupted(SitepairError):
    """The operator pressed Ctrl-C; the message says what goes on without this program."""

    status = "CANCELLED"


# -- errors -------------------------------------------------------------------------------------

#: Whether the command line being run asked for ``--json`` (set by :func:`main`), so that its
#: errors, argparse's refusals included, are JSON too.
_JSON_ERRORS: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)


def report_error(
    prog: str,
    message: str,
    *,
    hint: str | None = None,
    code: str = "INTERNAL",
    one_line: bool = False,
) -> None:
    """Show an error on standard error: ``PROG: error: MESSAGE`` and ``PROG: hint: HINT`` (or
    ``PROG: error: MESSAGE (HINT)`` when ``one_line``), or under ``--json`` one line
    ``{"error": {"message": ..., "hint": ..., "code": ...}}``.

    ``code`` is the error's gRPC status name (``NOT_FOUND``, ``INVALID_ARGUMENT``, ...), the same
    a script would see calling the admin API itself; ``hint`` is null when there is none."""
    if _JSON_ERRORS.get():
        doc = {"error": {"message": message, "hint": hint, "code": code}}
        print(json.dumps(doc, sort_keys=True), file=sys.stderr)
    elif one_line:
        print(f"{prog}: error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    else:
        print(f"{prog}: error: {message}", file=sys.stderr)
        if hint:
            print(f"{prog}: hint: {hint}", file=sys.stderr)


@contextlib.contextmanager
def json_errors(wanted: bool) -> Iterator[None]:
    """Within: errors are reported as JSON (``wanted``: the command line asked for ``--json``)."""
    token = _JSON_ERRORS.set(wanted)
    try:
        yield
    finally:
        _JSON_ERRORS.reset(token)


#: The status names of the OS errors an operator causes (a wrong path, a file in the way).
_OS_ERROR_CODES = {
    FileNotFoundError: "NOT_FOUND",
    FileExistsError: "ALREADY_EXISTS",
    PermissionError: "PERMISSION_DENIED",
}


def report_os_error(prog: str, exc: OSError) -> None:
    """An OS error as the file it names and what went wrong: ``out.json: Permission denied``."""
    where = f"{exc.filename}: " if exc.filename else ""
    code = _OS_ERROR_CODES.get(type(exc), "UNKNOWN")
    report_error(prog, f"{where}{exc.strerror or exc}", code=code)


def run_main(prog: str, fn: Callable[[], int]) -> int:
    """Run a parsed command; its errors become :func:`report_error` and an exit status."""
    try:
        return fn()
    except Interrupted as exc:
        report_error(prog, exc.message, hint=exc.hint, code=exc.status)
        return EXIT_INTERRUPTED
    except SitepairError as exc:
        report_error(prog, exc.message, hint=exc.hint, code=exc.status)
        return EXIT_ERROR
    except KeyboardInterrupt:
        report_error(prog, "interrupted", code=Interrupted.status)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``... | head``); silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        report_os_error(prog, exc)
        return EXIT_ERROR
    except Exception as exc:
        if os.environ.get("SITEPAIR_DEBUG"):
            raise
        report_error(
            prog,
            f"internal error: {type(exc).__name__}: {exc}",
            hint="run with SITEPAIR_DEBUG=1 for details, and please report it",
        )
        return EXIT_ERROR


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a command line that asked for ``--json`` is one JSON
    line on standard error (exit status 2 as always). Subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        if _JSON_ERRORS.get():
            report_error(
                self.prog, message, hint=f"see `{self.prog} --help`", code="INVALID_ARGUMENT"
            )
            self.exit(EXIT_USAGE)
        super().error(message)


def main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """What each program's ``main`` does: answer a shell's completion request (argcomplete's
    protocol; it exits), parse the command line, run the command it names (``args.fn``)."""
    argcomplete.autocomplete(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    with json_errors("--json" in argv):
        args = parser.parse_args(argv)
        return run_main(prog, lambda: int(args.fn(args)))


# -- shell completion ---------------------------------------------------------------------------


def add_completion_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    prog: str,
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Add ``completion SHELL``: print the code that makes SHELL complete ``prog``'s commands
    and options (load it from the shell's startup file)."""
    sp = sub.add_parser(
        "completion",
        help=f"print shell code that completes {prog}'s commands, e.g. "
        f'eval "$({prog} completion bash)"',
        parents=list(parents),
    )
    sp.add_argument("shell", choices=SHELLS, help="the shell to print code for")

    def run(args: argparse.Namespace) -> int:
        sys.stdout.write(shellcode([prog], shell=args.shell))
        return EXIT_OK

    sp.set_defaults(fn=run)


# -- JSON ---------------------------------------------------------------------------------------

_INT64 = frozenset(
    (descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64)
)


def proto_to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready values: every field without presence is there (zero values
    too), 64-bit integers are numbers, enums are names, times are RFC 3339 strings, and a
    ``*_json`` string field holds the document it carries (null when empty)."""
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _plain_message(cast(descriptor.Descriptor, message.DESCRIPTOR), doc)
    return doc


def _plain_message(desc: descriptor.Descriptor, doc: Any) -> Any:
    if not isinstance(doc, dict) or desc.file.package == "google.protobuf":
        return doc  # a well-known type (a Timestamp): its JSON form is a string already
    for field in desc.fields:
        if field.name in doc:
            doc[field.name] = _plain_field(field, doc[field.name])
    return doc


def _plain_field(field: descriptor.FieldDescriptor, value: Any) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        return {k: _plain_value(value_field, v) for k, v in value.items()}
    if field.is_repeated:
        return [_plain_value(field, v) for v in value]
    return _plain_value(field, value)


def _plain_value(field: descriptor.FieldDescriptor, value: Any) -> Any:
    if field.cpp_type in _INT64:
        return int(value)
    if field.message_type is not None:
        return _plain_message(field.message_type, value)
    if field.type == descriptor.FieldDescriptor.TYPE_STRING and field.name.endswith("_json"):
        if not value:
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # not a document after all: shown as the broker sent it
    return value


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready values: messages (:func:`proto_to_dict`), dataclasses as objects,
    enums by value, UUIDs and paths as strings, containers element by element."""
    if isinstance(value, Message):
        return proto_to_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID | PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(jsonable(value), indent=2, sort_keys=True), file=out or sys.stdout)


# -- tables, progress, questions ----------------------------------------------------------------


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


#: A progress total from which the progress counts bytes (a disk); below it, items (the VMs a
#: policy change is applied to). Job steps do not say which they count.
BYTES_FROM = 1 << 20


class ProgressRate:
    """The rate and time left of one progress (a job step's), from successive samples of how much
    is done: the rate over the last ``window`` seconds, the time left at that rate."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._samples: list[tuple[float, int]] = []

    def sample(self, now: float, done: int, total: int) -> str:
        """Record ``done`` of ``total`` at ``now`` (monotonic seconds); return "" until a rate is
        known, then e.g. "12.5 MiB/s, 1m40s left"."""
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # the progress started over (a retried step)
        self._samples.append((now, done))
        # Keep the samples of the window and the last one before it: after a long wait for
        # an update, the rate is over that wait rather than unknown.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            del self._samples[0]
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or d1 <= d0:
            return ""
        rate = (d1 - d0) / (t1 - t0)
        shown = f"{format_size(rate)}/s" if total >= BYTES_FROM else f"{rate:.1f}/s"
        return f"{shown}, {format_eta(max(total - done, 0) / rate)} left"


def format_eta(seconds: float) -> str:
    """Time left as an operator reads it: 45s, 12m05s, 3h20m."""
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def confirm(question: str, *, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise SitepairError(f"{question} Refusing without --yes (not a terminal)")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")
