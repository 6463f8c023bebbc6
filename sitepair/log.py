"""Structured logs: one JSON object per line, or readable text for a terminal.

Code logs an event name as the message and its facts as ``extra={"fields": {...}}``::

    log.info("server registered", extra={"fields": {"server": name, "site": site}})

Secrets (registration secrets, private keys) are never passed to a logger; tests check the
broker's log for them.

A daemon configures logging from its ``[log]`` section with :func:`configure`, which it calls
again on SIGHUP: the level and format change, and the log file is reopened (so logrotate's
``create`` mode works as well as the built-in size-based rotation, ``max_bytes``/``backups``).
:func:`check` validates a ``[log]`` section when the configuration is loaded, so a bad level is a
clear configuration error rather than a ``ValueError`` at start-up.

gRPC's Python loggers (``grpc``, ``grpc._cython`` ...) propagate to the root logger, so their
lines are formatted like ours. gRPC's C core writes its own lines straight to the process's
standard error, unformatted, and cannot be routed here; :func:`quiet_grpc_core` turns them off
unless the operator asked for them with ``GRPC_VERBOSITY`` (docs/operations.md, "Logs").
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from sitepair.errors import ConfigError

#: The levels ``[log] level`` accepts.
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")
#: Defaults of ``[log] max_bytes`` and ``backups``: at most ~600 MiB of logs per daemon.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5
#: The smallest rotation size accepted: smaller rotates every few seconds on a busy broker.
MIN_MAX_BYTES = 64 * 1024

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(fields_of(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LogSettings(Protocol):
    """A ``[log]`` section, as the broker's and the agent's configurations both hold it."""

    @property
    def level(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def file(self) -> str: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def backups(self) -> int: ...


def check(settings: LogSettings, where: str) -> None:
    """Refuse a ``[log]`` section that cannot work, naming the setting and what it accepts."""
    if settings.level.lower() not in LEVELS:
        raise ConfigError(
            f"{where} level must be one of {', '.join(LEVELS)}, not {settings.level!r}"
        )
    if settings.format not in FORMATS:
        raise ConfigError(f'{where} format must be "json" or "text"')
    if settings.max_bytes != 0 and settings.max_bytes < MIN_MAX_BYTES:
        raise ConfigError(
            f"{where} max_bytes must be 0 (never rotate) or at least {MIN_MAX_BYTES}, "
            f"not {settings.max_bytes}"
        )
    if settings.backups < 0 or (settings.max_bytes and settings.backups < 1):
        raise ConfigError(
            f"{where} backups must be at least 1 when max_bytes rotates the file, "
            f"not {settings.backups}"
        )


def configure(settings: LogSettings) -> None:
    """Set up (or, on SIGHUP, set up again) a daemon's logging from its ``[log]`` section."""
    setup(
        level=settings.level,
        json_format=settings.format == "json",
        file=Path(settings.file) if settings.file else None,
        max_bytes=settings.max_bytes,
        backups=settings.backups,
    )


def quiet_grpc_core(env: MutableMapping[str, str] | None = None) -> None:
    """Keep gRPC's C core from writing unformatted lines to standard error.

    Call it before ``grpc`` is imported: the C core reads ``GRPC_VERBOSITY`` once, then. An
    operator who sets ``GRPC_VERBOSITY`` (and ``GRPC_TRACE``) gets the C core's lines as usual.
    """
    env = os.environ if env is None else env
    env.setdefault("GRPC_VERBOSITY", "NONE")


def setup(
    *,
    level: str = "info",
    json_format: bool = True,
    file: Path | None = None,
    stream: TextIO | None = None,
    max_bytes: int = 0,
    backups: int = 0,
) -> None:
    """Configure the root logger for a daemon (idempotent: replaces, and closes, earlier
    handlers, so calling it again reopens the log file). ``max_bytes`` > 0 rotates the file
    at that size, keeping ``backups`` old files (``FILE.1`` is the newest)."""
    root = logging.getLogger()
    # The new handler first: a file that cannot be opened leaves the old handlers working.
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's own Python loggers propagate here; they are chatty at INFO about transient
    # connection states, so they say only warnings, unless the daemon itself logs debug.
    logging.getLogger("grpc").setLevel(min(logging.WARNING, root.level))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
