"""The handlers of the dashboard's pages. Each reads through :class:`DashboardApi` only, shows at
most one bounded page of any list (with a "more" link that carries the admin API's page token),
and turns an admin API error into a page that says what went wrong and what to do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from broker.services.admin_checks import JOB_STATES
from broker.store.models import RelationshipState
from broker.web.api import PLAN_ACTIONS, DashboardApi
from broker.web.pages.chart import Series, line_chart
from broker.web.pages.render import (
    duration_text,
    error_page,
    fragment,
    page,
    timestamp_iso,
    utc_text,
)
from sitepair.errors import InvalidArgument, NotFound, SitepairError
from sitepair.v1 import admin_pb2

#: Rows a list page shows before its "more" link.
PAGE_ROWS = 100
#: HTTP status of each admin API error status.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
VM_STATES = tuple(s.value for s in RelationshipState)
HEALTHS = ("normal", "warning", "critical")
#: A recovery point the confirmation form may name: a keyword or a cycle sequence.
POINT = re.compile(r"latest|latest-app-consistent|[0-9]{1,19}")
#: What each plan action does, for its confirmation page.
ACTION_TEXT = {
    "test-failover": (
        "Test failover",
        "Starts a test copy of every VM of the plan on its recovery host, from the chosen "
        "recovery point, with no network. Production replication goes on untouched.",
        "",
    ),
    "cleanup-test": (
        "Clean up the test failover",
        "Stops and deletes the test VMs the plan's test failover made on the recovery hosts.",
        "The test VMs and whatever was written into them are deleted.",
    ),
    "failover-planned": (
        "Planned failover",
        "Shuts every VM of the plan down where it runs, sends its last changes, and starts it "
        "on its recovery host. No data is lost.",
        "The VMs stop on their primary hosts and run on the recovery hosts from then on.",
    ),
    "failover-unplanned": (
        "Unplanned failover",
        "Starts every VM of the plan on its recovery host from the chosen recovery point, "
        "without the primary hosts. The epoch rises, so a returning primary is fenced.",
        "What the primaries wrote after the chosen point is lost; they must resynchronize "
        "in reverse to be used again.",
    ),
    "commit": (
        "Commit the failover",
        "Keeps the failed-over VMs as they are and discards every other recovery point.",
        "The other recovery points are deleted: the failover can no longer be cancelled.",
    ),
    "resume": (
        "Resume the plan",
        "Goes on with the plan where it waits for an operator (a manual action is done).",
        "",
    ),
    "drill": (
        "Drill",
        "A test failover of the whole plan with proof that each test VM holds exactly the "
        "recovery point's data, the plan's checks, and then the cleanup.",
        "",
    ),
}
#: Seconds between keepalive comments of a job's event stream while the job does not change.
KEEPALIVE = 15.0
#: Actions whose confirmation asks which recovery point to use.
POINT_ACTIONS = ("test-failover", "failover-unplanned")

Handler = Callable[[web.Request, DashboardApi], Awaitable[web.StreamResponse]]


def handled(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Give the handler the operator's API; turn admin API errors into an error page."""

    @functools.wraps(fn)
    async def handle(request: web.Request) -> web.StreamResponse:
        api = DashboardApi.for_request(request)
        try:
            return await fn(request, api)
        except SitepairError as exc:
            status = HTTP_STATUS.get(exc.status, 500)
            return error_page(request, api, status, exc.message, exc.hint or "")

    return handle


def _more(request: web.Request, token: str) -> str:
    """The URL of the next page: this page's query with ``after`` set to the admin token."""
    if not token:
        return ""
    query = {k: v for k, v in request.query.items() if k != "after"}
    query["after"] = token
    return f"{request.path}?{urlencode(query)}"


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str:
    value = request.query.get(name, "")
    if value and value not in allowed:
        raise InvalidArgument(
            f"unknown {name} {value[:64]!r}; use one of {', '.join(allowed)}",
            hint="clear the filter to see everything",
        )
    return value


# -- pages --------------------------------------------------------------------------------------


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/vms")


@handled
async def servers(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    resp = await api.servers(page_token=request.query.get("after", ""), page_size=PAGE_ROWS)
    return await page(
        request,
        api,
        "servers.html",
        servers=resp.servers,
        more=_more(request, resp.next_page_token),
    )


@handled
async def clouds(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    return await page(
        request,
        api,
        "clouds.html",
        clouds=(await api.clouds()).clouds,
        pairs=(await api.pairs()).pairs,
    )


@handled
async def vms(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    q = request.query.get("q", "").strip().casefold()
    health = _choice(request, "health", HEALTHS)
    state = _choice(request, "state", VM_STATES)

    def keep(vm: admin_pb2.ProtectedVm) -> bool:
        return (
            (not q or q in vm.vm_name.casefold())
            and (not health or vm.health == health)
            and (not state or vm.state == state)
        )

    found = await api.protected(
        keep, page_token=request.query.get("after", ""), page_size=PAGE_ROWS
    )
    values: dict[str, Any] = {
        "vms": found.items,
        "more": _more(request, found.next_page_token),
        "self_url": request.path_qs,
        "filters": {"q": request.query.get("q", ""), "health": health, "state": state},
        "healths": HEALTHS,
        "states": VM_STATES,
    }
    if request.headers.get("HX-Request") == "true":
        return web.Response(
            text=fragment(request, "vms_table.html", **values), content_type="text/html"
        )
    return await page(request, api, "vms.html", **values)


@dataclasses.dataclass(frozen=True)
class PointRow:
    sequence: int
    cut_at: str
    app_consistent: bool
    #: Seconds since the point before it: the replica's lag just before this point landed.
    interval: float | None


@handled
async def vm(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    pv = await api.protected_vm(request.match_info["name"])
    replica = pv.replica_status
    # The additional (hourly) points, and the latest committed state, the point failovers use
    # by default, when it is not one of them.
    points = [(p.sequence, p.cut_at.ToSeconds(), p.app_consistent) for p in replica.points]
    if replica.committed_sequence and all(n != replica.committed_sequence for n, _, _ in points):
        points.append((replica.committed_sequence, replica.last_cut_at.ToSeconds(), False))
    points.sort()
    rows: list[PointRow] = []
    for i, (sequence, cut_at, app_consistent) in enumerate(points):
        interval = float(cut_at - points[i - 1][1]) if i else None
        iso = timestamp_iso(Timestamp(seconds=cut_at))
        rows.append(PointRow(sequence, iso, app_consistent, interval))
    lag = [
        (float(cut_at), r.interval, r.cut_at)
        for (_, cut_at, _), r in zip(points, rows, strict=True)
        if r.interval is not None
    ]
    chart = line_chart(
        [Series("lag before the point", "lag", [(x, y) for x, y, _ in lag])],
        y_label="s",
        x_text={x: utc_text(iso)[11:16] for x, _, iso in lag},
    )
    return await page(
        request,
        api,
        "vm.html",
        vm=pv,
        points=list(reversed(rows)),
        chart=chart,
        jobs=await api.vm_jobs(pv.vm_name),
        has_rpo=pv.HasField("rpo_seconds"),
    )


@dataclasses.dataclass(frozen=True)
class StepView:
    step: admin_pb2.JobStep
    #: "about 2 min left" for a running step with progress (at its rate so far); "" otherwise.
    eta: str


def _step_views(job: admin_pb2.Job, now: float) -> list[StepView]:
    out = []
    for s in job.steps:
        eta = ""
        started = s.started_at.ToSeconds()
        if s.state == "running" and s.progress_total and s.progress_done and started:
            per_second = s.progress_done / max(now - started, 1.0)
            left = max(s.progress_total - s.progress_done, 0) / per_second
            eta = f"about {duration_text(left)} left"
        out.append(StepView(s, eta))
    return out


def _job_values(request: web.Request, api: DashboardApi, job: admin_pb2.Job) -> dict[str, Any]:
    final = job.state in ("succeeded", "failed", "cancelled")
    return {
        "job": job,
        "steps": _step_views(job, api.ctx.clock.now()),
        "events": "" if final else f"/jobs/{quote(job.id, safe='')}/events",
    }


@handled
async def jobs(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    state = _choice(request, "state", JOB_STATES)
    resp = await api.jobs(
        state=state, page_token=request.query.get("after", ""), page_size=PAGE_ROWS
    )
    return await page(
        request,
        api,
        "jobs.html",
        jobs=resp.jobs,
        more=_more(request, resp.next_page_token),
        state=state,
        states=JOB_STATES,
    )


@handled
async def job(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    found = await api.job(request.match_info["id"])
    return await page(request, api, "job.html", **_job_values(request, api, found))


@handled
async def job_events(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    """Server-sent events: the re-rendered ``#job`` after every change it shows; ends when the
    job is final. While nothing changes, a comment every :data:`KEEPALIVE` seconds finds a
    browser that went away (the write fails), so an abandoned stream of a job that waits for
    hours stops watching at once instead of when the job ends."""
    job_id = request.match_info["id"]
    await api.job(job_id)  # an unknown job is a 404 page, before the stream starts
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await resp.prepare(request)
    changes = api.watch_job(job_id)
    pending: asyncio.Task[admin_pb2.Job] | None = None
    sent = ""
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(changes))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
            if not done:
                await resp.write(b": still watching\n\n")
                continue
            try:
                current = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            html = fragment(request, "job_fragment.html", **_job_values(request, api, current))
            if html == sent:
                continue  # a change the page does not show (the job's update time)
            sent = html
            data = "".join(f"data: {line}\n" for line in html.splitlines())
            await resp.write(f"event: job\n{data}\n".encode())
        await resp.write_eof()
    except SitepairError as exc:
        with contextlib.suppress(ConnectionResetError):
            await resp.write(f"event: failure\ndata: {exc.message.splitlines()[0]}\n\n".encode())
            await resp.write_eof()
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # the generator stops before it is closed
        await changes.aclose()
    return resp


@handled
async def plans(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    return await page(request, api, "plans.html", plans=(await api.plans()).plans)


@handled
async def plan(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    found = await api.plan(request.match_info["name"])
    return await page(
        request, api, "plan.html", plan=found, actions=PLAN_ACTIONS, texts=ACTION_TEXT
    )


def _action(request: web.Request) -> str:
    action = request.match_info["action"]
    if action not in PLAN_ACTIONS:
        raise NotFound(f"no plan action {action[:64]!r}; the actions are {', '.join(PLAN_ACTIONS)}")
    return action


@handled
async def confirm(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    action = _action(request)
    found = await api.plan(request.match_info["name"])
    groups = [
        (g.index, [await api.protected_vm(rid) for rid in g.relationship_ids]) for g in found.groups
    ]
    title, what, irreversible = ACTION_TEXT[action]
    return await page(
        request,
        api,
        "confirm.html",
        plan=found,
        action=action,
        title=title,
        what=what,
        irreversible=irreversible,
        groups=groups,
        asks_point=action in POINT_ACTIONS,
    )


@handled
async def run_action(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    action = _action(request)
    form = await request.post()
    point = str(form.get("point", "") or "latest") if action in POINT_ACTIONS else ""
    if point and not POINT.fullmatch(point):
        raise InvalidArgument(
            f"recovery point {point[:64]!r} is not latest, latest-app-consistent or a sequence"
        )
    started = await api.run_plan_action(request.match_info["name"], action, point=point)
    raise web.HTTPSeeOther(f"/jobs/{quote(started.id, safe='')}")


@handled
async def drills(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    plan_name = request.query.get("plan", "")
    resp = await api.drills(
        plan=plan_name, page_token=request.query.get("after", ""), page_size=PAGE_ROWS
    )
    return await page(
        request,
        api,
        "drills.html",
        drills=resp.drills,
        plan=plan_name,
        more=_more(request, resp.next_page_token),
    )


@handled
async def drill(request: web.Request, api: DashboardApi) -> web.StreamResponse:
    return await page(request, api, "drill.html", drill=await api.drill(request.match_info["id"]))
