"""Templates and the words and numbers pages show: Jinja2 with autoescape on for every template.

Times are rendered in UTC as ``<time datetime=ISO title="... UTC">`` (``static/app.js`` shows
them in the browser's zone); health is always a word beside its icon, never a colour alone.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from broker.web.api import DashboardApi, Leadership

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

#: How a relationship state reads on a page.
STATE_LABELS = {
    "enabling": "Enabling",
    "initial-replication": "Initial replication",
    "protected": "Protected",
    "resync-required": "Resync required",
    "resynchronizing": "Resynchronizing",
    "failover-in-progress": "Failover in progress",
    "failed-over-test": "Test failover",
    "failed-over-planned": "Failed over (planned)",
    "failed-over-unplanned": "Failed over (unplanned)",
    "committed": "Committed",
    "reverse-replicating": "Reverse replicating",
    "disabled": "Disabled",
}
#: Health levels, their words and the icon shown beside the word (aria-hidden).
HEALTH_LABELS = {"normal": "Normal", "warning": "Warning", "critical": "Critical"}
HEALTH_ICONS = {"normal": "\u2714", "warning": "\u26a0", "critical": "\u2716"}


def timestamp_iso(ts: Timestamp | None) -> str:
    """ISO-8601 UTC of a protobuf timestamp; "" when it is unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    when = datetime.datetime.fromtimestamp(ts.seconds, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_text(iso: str) -> str:
    return iso.replace("T", " ").replace("Z", " UTC")


def size_text(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration_text(seconds: int | float) -> str:
    s = round(float(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def state_text(state: str) -> str:
    return STATE_LABELS.get(state, state.replace("-", " ").capitalize())


def health_text(health: str) -> str:
    return HEALTH_LABELS.get(health, health.capitalize() or "Unknown")


def health_icon(health: str) -> str:
    return HEALTH_ICONS.get(health, "?")


def path_part(value: str) -> str:
    """``value`` as one segment of a URL path: every character but letters, digits and ``_.-~``
    is %-escaped, a ``/`` too (Jinja's ``urlencode`` keeps it)."""
    return quote(value, safe="")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its name: hosts name their VMs anything
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        iso=timestamp_iso,
        part=path_part,
        utc=utc_text,
        size=size_text,
        duration=duration_text,
        state=state_text,
        health=health_text,
        health_icon=health_icon,
    )
    return env


TEMPLATE_ENV = web.AppKey("templates", jinja2.Environment)


async def page(
    request: web.Request, api: DashboardApi, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    """A whole page: the template inside the layout, with what the layout shows."""
    layout = {
        "vault": (await api.broker_info()).vault,
        "operator": await api.operator_name(),
        "leadership": await api.leadership(),
    }
    return _response(request, template, status, layout | values)


def error_page(
    request: web.Request, api: DashboardApi, status: int, message: str, hint: str
) -> web.Response:
    """The error page, with a layout that asks the admin API nothing: the error may be that
    it refuses this operator."""
    layout = {
        "vault": api.ctx.config.vault,
        "operator": api.operator.id,
        "leadership": Leadership(is_leader=True),  # no banner: nothing was read
    }
    values = {"message": message, "hint": hint}
    return _response(request, "error.html", status, layout | values)


def _response(
    request: web.Request, template: str, status: int, values: dict[str, Any]
) -> web.Response:
    html = (
        request.app[TEMPLATE_ENV]
        .get_template(template)
        .render(csrf=request["csrf"], path=request.path, **values)
    )
    return web.Response(text=html, content_type="text/html", status=status)


def fragment(request: web.Request, template: str, **values: Any) -> str:
    """A template without the layout (htmx swaps and the job stream)."""
    return request.app[TEMPLATE_ENV].get_template(template).render(**values)
