"""The dashboard's pages with real data: a real broker, four real agents (directory backend),
protected VMs, jobs and plans, read through the pages' HTTP routes (``pages_support``)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import urllib.request
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from broker.client import wait_job
from broker.web.api import DashboardApi
from broker.web.pages import chart, views
from broker.web.pages.chart import Series
from sitepair import pki
from sitepair.v1 import admin_pb2
from tests.protection.conftest import Sites, eventually, inventory_has
from tests.protection.test_walkthrough import MiB, make_vm, setup_pair
from tests.web.pages_support import (  # noqa: F401 - fixtures
    Dashboard,
    dashboard_fixture,
    serve_pages,
    sites,
)

STATIC = Path(__file__).resolve().parents[2] / "broker" / "web" / "static"
HOSTILE = '<script>alert("owned")</script>'


def protect(s: Sites, vm: str, host: str = "hv-a1", *, seed: int = 1) -> admin_pb2.ProtectedVm:
    """Make ``vm`` on ``host``, protect it and wait until it has a recovery point."""
    make_vm(s, host, vm, size=2 * MiB, seed=seed)
    eventually(lambda: inventory_has(s.admin, vm), what=f"{vm} in the inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=vm)))
    return eventually(  # type: ignore[return-value]
        lambda: (p := s.protected(vm)).state == "protected" and p.HasField("rpo_seconds") and p,
        what=f"{vm} protected with a point",
    )


def rows(html: str, attr: str) -> list[str]:
    return re.findall(rf'<tr {attr}="([^"]*)"', html)


def test_vm_list_and_page_show_state_rpo_and_points(dashboard: Dashboard) -> None:
    s = dashboard.sites
    setup_pair(s)
    pv = protect(s, "vm1")

    home = dashboard.get("/")
    assert home.status == 302 and home.headers["Location"] == "/vms"
    page = dashboard.get("/vms")
    assert page.status == 200
    assert rows(page.body, "data-vm") == ["vm1"]
    row = page.body.split('<tr data-vm="vm1">')[1].split("</tr>")[0]
    assert re.search(r'<td class="health">.*Normal', row)
    assert '<td class="state">Protected' in row
    assert re.search(r'<td class="rpo">\d+ (s|min)', row)
    assert 'hx-trigger="every 5s"' in page.body
    assert "This broker is a follower" not in page.body  # a broker alone on SQLite leads
    assert 'Vault <strong class="vault">test</strong>' in page.body
    assert f'name="csrf" value="{dashboard.csrf}"' in page.body  # the sign-out form

    vm = dashboard.get("/vms/vm1")
    assert vm.status == 200
    for section in ("health", "points", "cycles", "verification", "jobs"):
        assert f'<section id="{section}"' in vm.body
    latest = pv.replica_status.committed_sequence
    assert latest and f'<tr data-point="{latest}">' in vm.body
    assert 'id="cycle-chart"' in vm.body
    assert re.search(
        r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ" title="[^"]+ UTC">', vm.body
    )
    # The VM's own jobs, linked: its enable-protection job.
    jobs = s.admin.call(s.admin.stub.ListJobs, admin_pb2.ListJobsRequest())
    enable = next(j for j in jobs.jobs if j.kind == "enable-protection")
    assert f'href="/jobs/{enable.id}"' in vm.body

    missing = dashboard.get("/vms/no-such-vm")
    assert missing.status == 404 and "no-such-vm" in missing.body

    # htmx's refresh asks for the same URL and gets the table alone.
    part = dashboard.get("/vms", headers={"HX-Request": "true"})
    assert part.status == 200 and '<table id="vms">' in part.body and "<html" not in part.body


def test_health_turns_critical_with_its_reason_when_the_recovery_host_stops(
    dashboard: Dashboard,
) -> None:
    s = dashboard.sites
    setup_pair(s)
    pv = protect(s, "vm1")
    assert rows(dashboard.get("/vms?health=critical").body, "data-vm") == []
    s.hosts[pv.replica_server].stop()

    def critical_row() -> str:
        page = dashboard.get("/vms?health=critical").body
        return page.split('<tr data-vm="vm1">')[1].split("</tr>")[0] if "data-vm" in page else ""

    row = str(eventually(critical_row, what="vm1 critical on the page"))
    assert re.search(r'<td class="health">.*Critical', row)
    assert f"the replica host {pv.replica_server} has been offline for" in row
    assert rows(dashboard.get("/vms?health=normal").body, "data-vm") == []
    vm = dashboard.get("/vms/vm1").body
    assert "replica-host-offline" in vm.split('<section id="health"')[1].split("</section>")[0]


def test_a_hostile_vm_name_is_escaped_and_filters_work(dashboard: Dashboard) -> None:
    s = dashboard.sites
    setup_pair(s)
    protect(s, "vm1")
    # A host may report any name: this one's vm.json says its VM is called HOSTILE.
    make_vm(s, "hv-a2", "evil", size=2 * MiB, seed=2)
    spec = s.hosts["hv-a2"].home / "gold" / "vms" / "evil" / "vm.json"
    doc = json.loads(spec.read_text())
    doc["name"] = HOSTILE
    spec.write_text(json.dumps(doc))
    s.admin.call(s.admin.stub.RefreshServer, admin_pb2.RefreshServerRequest(server="hv-a2"))
    eventually(lambda: inventory_has(s.admin, HOSTILE), what="the hostile name in the inventory")
    s.job(s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm=doc["id"])))

    page = dashboard.get("/vms")
    assert HOSTILE not in page.body
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page.body
    assert len(rows(page.body, "data-vm")) == 2

    assert rows(dashboard.get("/vms?q=VM1").body, "data-vm") == ["vm1"]
    assert rows(dashboard.get("/vms?q=script").body, "data-vm") == [
        "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;"
    ]
    assert rows(dashboard.get("/vms?q=vm&state=protected").body, "data-vm") == ["vm1"]
    assert rows(dashboard.get("/vms?state=disabled").body, "data-vm") == []
    assert rows(dashboard.get("/vms?health=critical").body, "data-vm") == []
    bad = dashboard.get("/vms?health=purple")
    assert bad.status == 400
    assert "unknown health &#39;purple&#39;; use one of normal, warning, critical" in bad.body

    # Its link on the list leads to its page, where the name is escaped too.
    link = re.search(r'<a href="(/vms/[^"]*)">&lt;script', page.body)
    assert link is not None
    vm = dashboard.get(link.group(1))
    assert vm.status == 200 and '<section id="health"' in vm.body
    assert HOSTILE not in vm.body and "&lt;script&gt;" in vm.body


def test_job_page_and_its_event_stream(dashboard: Dashboard) -> None:
    s = dashboard.sites
    setup_pair(s)
    make_vm(s, "hv-a1", "vm1", size=8 * MiB)
    eventually(lambda: inventory_has(s.admin, "vm1"), what="vm1")
    started = s.admin.call(s.admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="vm1"))

    events = list(dashboard.stream(f"/jobs/{started.id}/events"))
    # One event per change, each the whole #job fragment; the stream ends when the job is final.
    assert len(events) >= 2  # it was running when the stream began
    assert all(e.startswith('<div id="job" data-state=') for e in events)
    assert all(a != b for a, b in itertools.pairwise(events))
    assert 'data-state="succeeded"' in events[-1].split("\n")[0]
    assert all('data-state="succeeded"' not in e.split("\n")[0] for e in events[:-1])

    done = wait_job(s.admin, started.id)
    page = dashboard.get(f"/jobs/{started.id}")
    assert page.status == 200
    assert '<div id="job" data-state="succeeded">' in page.body  # final: no event stream
    for step in done.steps:
        assert f'<li data-step="{step.index}" data-state="{step.state}">' in page.body
    assert dashboard.get("/jobs/job-nothing").status == 404
    assert dashboard.get("/jobs/job-nothing/events").status == 404


def test_event_stream_of_a_waiting_job_keeps_alive_and_stops_when_the_browser_leaves(
    dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = dashboard.sites
    monkeypatch.setattr(views, "KEEPALIVE", 0.05)
    stopped = threading.Event()
    watch = DashboardApi.watch_job

    async def watched(self: DashboardApi, job_id: str) -> AsyncGenerator[admin_pb2.Job, None]:
        try:
            async for job in watch(self, job_id):
                yield job
        finally:
            stopped.set()  # the page's watch of the job ended

    monkeypatch.setattr(DashboardApi, "watch_job", watched)
    s.hosts["hv-b2"].stop()  # its ping waits for it to come back
    a = s.admin
    ping = a.call(a.stub.PingServer, admin_pb2.PingServerRequest(server="hv-b2"))
    try:
        with urllib.request.urlopen(
            f"{dashboard.base}/jobs/{ping.id}/events", timeout=30, context=dashboard.tls
        ) as r:
            lines: list[str] = []
            while lines.count(": still watching") < 2:
                lines.append(r.readline().decode().rstrip("\n"))
        assert lines[0] == "event: job" and lines[1].startswith('data: <div id="job"')
        assert not stopped.is_set()  # still watching while the browser listens
        assert stopped.wait(10)  # the browser left: the next keepalive found out
        job = a.call(a.stub.GetJob, admin_pb2.GetJobRequest(id=ping.id))
        assert job.state in ("running", "waiting")  # not because the job ended
    finally:
        a.call(a.stub.CancelJob, admin_pb2.GetJobRequest(id=ping.id))


def test_jobs_list_filters_and_pages(dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    s = dashboard.sites
    a = s.admin
    pings = [
        wait_job(a, a.call(a.stub.PingServer, admin_pb2.PingServerRequest(server=h)).id)
        for h in ("hv-a1", "hv-a2", "hv-b1")
    ]
    page = dashboard.get("/jobs")
    assert rows(page.body, "data-job") == [j.id for j in reversed(pings)]  # newest first
    assert rows(dashboard.get("/jobs?state=failed").body, "data-job") == []
    assert rows(dashboard.get("/jobs?state=succeeded").body, "data-job") == [
        j.id for j in reversed(pings)
    ]
    assert dashboard.get("/jobs?state=sleeping").status == 400

    monkeypatch.setattr(views, "PAGE_ROWS", 2)
    first = dashboard.get("/jobs?state=succeeded")
    assert rows(first.body, "data-job") == [pings[2].id, pings[1].id]
    more = re.search(r'<a href="([^"]+)" rel="next">', first.body)
    assert more is not None
    rest = dashboard.get(more.group(1).replace("&amp;", "&"))
    assert rows(rest.body, "data-job") == [pings[0].id]
    assert 'rel="next"' not in rest.body


def test_servers_and_clouds_pages(dashboard: Dashboard) -> None:
    s = dashboard.sites
    setup_pair(s)
    servers = dashboard.get("/servers")
    assert sorted(rows(servers.body, "data-server")) == ["hv-a1", "hv-a2", "hv-b1", "hv-b2"]
    row = servers.body.split('<tr data-server="hv-a1">')[1].split("</tr>")[0]
    assert "site-a" in row and "Connected" in row
    assert re.search(r'<td class="cert"><time datetime=', row)
    version = s.admin.call(s.admin.stub.GetServer, admin_pb2.GetServerRequest(server="hv-a1"))
    assert f'<td class="version">{version.agent_version}</td>' in row
    # The cloud an operator placed the host in (the admin API's Server.cloud, also GetServer).
    assert "<td>cloud-a</td>" in row and version.cloud == "cloud-a"
    listed = s.admin.call(s.admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
    assert {x.name: x.cloud for x in listed}["hv-b2"] == "cloud-b"

    def metrics_shown() -> str:
        page = dashboard.get("/servers").body
        row = page.split('<tr data-server="hv-a1">')[1].split("</tr>")[0]
        return row if re.search(r'<td class="memory">[\d.]+ \w+ of [\d.]+ \w+</td>', row) else ""

    assert re.search(r'<td class="cpu">\d+ %', str(eventually(metrics_shown, what="metrics")))
    s.hosts["hv-a2"].stop()
    eventually(
        lambda: (
            '<span class="conn conn-disconnected">Disconnected</span>'
            in dashboard.get("/servers").body.split('<tr data-server="hv-a2">')[1].split("</tr>")[0]
        ),
        what="hv-a2 disconnected on the page",
    )
    clouds = dashboard.get("/clouds")
    assert rows(clouds.body, "data-cloud") == ["cloud-a", "cloud-b"]
    pair = clouds.body.split('<tr data-pair="cloud-a">')[1].split("</tr>")[0]
    assert "cloud-b" in pair and "5 min 0 s" in pair and "certificate" in pair


def test_plan_actions_confirm_and_start_jobs_as_the_operator(dashboard: Dashboard) -> None:
    s = dashboard.sites
    a = s.admin
    setup_pair(s)
    pv = protect(s, "vm1")
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="erp", description="the ERP"))
    a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="erp", group=1, vm="vm1"))

    assert rows(dashboard.get("/plans").body, "data-plan") == ["erp"]
    plan = dashboard.get("/plans/erp")
    actions = re.findall(r'<a class="action" data-action="([^"]+)" href="([^"]+)"', plan.body)
    assert [x for x, _ in actions] == list(views.ACTION_TEXT)
    assert ("test-failover", "/plans/erp/confirm/test-failover") in actions

    confirm = dashboard.get("/plans/erp/confirm/test-failover")
    assert confirm.status == 200
    box = confirm.body.split('<section id="confirm"')[1]
    row = box.split('<tr data-vm="vm1">')[1].split("</tr>")[0]
    assert f'<td class="from">{pv.running_on}</td>' in row
    assert f'<td class="to">{pv.replica_server}</td>' in row
    assert 'form id="confirm-form" method="post" action="/plans/erp/test-failover"' in box
    assert f'name="csrf" value="{dashboard.csrf}"' in box and 'id="confirm-button"' in box
    unplanned = dashboard.get("/plans/erp/confirm/failover-unplanned")
    assert "Cannot be undone" in unplanned.body
    assert dashboard.get("/plans/erp/confirm/explode").status == 404
    assert dashboard.get("/plans/nope/confirm/commit").status == 404

    # Without the form's token the middleware refuses; nothing starts.
    assert dashboard.post("/plans/erp/test-failover", {"point": "latest"}).status == 403
    bad = dashboard.post("/plans/erp/test-failover", {"csrf": dashboard.csrf, "point": "yesterday"})
    assert bad.status == 400

    went = dashboard.post("/plans/erp/test-failover", {"csrf": dashboard.csrf, "point": "latest"})
    assert went.status == 303
    job_id = went.headers["Location"].removeprefix("/jobs/")
    test = s.job(a.call(a.stub.GetJob, admin_pb2.GetJobRequest(id=job_id)))
    assert test.created_by == dashboard.operator.id and test.target == "plan/erp"
    assert s.protected("vm1").HasField("test_failover")

    cleaned = dashboard.post("/plans/erp/cleanup-test", {"csrf": dashboard.csrf})
    assert cleaned.status == 303
    cleanup = s.job(
        a.call(a.stub.GetJob, admin_pb2.GetJobRequest(id=cleaned.headers["Location"][6:]))
    )
    assert cleanup.created_by == dashboard.operator.id and cleanup.kind != test.kind
    assert not s.protected("vm1").HasField("test_failover")

    # An action the plan's state refuses is a page naming the problem, not a traceback.
    refused = dashboard.post("/plans/erp/resume", {"csrf": dashboard.csrf})
    assert refused.status == 409 and "Traceback" not in refused.body
    assert "recovery plan erp is not waiting for an operator" in refused.body


def test_a_revoked_operator_reads_nothing_and_starts_nothing(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    """The pages authorise every call as the admin API does: the attacker here holds a
    dashboard identity whose operator was revoked a moment ago."""
    s = dashboard.sites
    a = s.admin
    setup_pair(s)
    protect(s, "vm1")
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="erp"))
    a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="erp", group=1, vm="vm1"))
    key = pki.generate_key()
    csr = pki.make_csr(key, "mallory")
    added = a.call(a.stub.AddOperator, admin_pb2.AddOperatorRequest(name="mallory", csr_der=csr))
    cert, key_file = tmp_path / "mallory.crt", tmp_path / "mallory.key"
    cert.write_bytes(added.certificate_pem)
    pki.write_private_key(key_file, key)
    served = serve_pages(s.broker, cert, key_file)
    try:
        client = served.client
        before = client.get("/vms")
        assert before.status == 200 and '<span class="operator">mallory</span>' in before.body
        a.call(a.stub.RevokeOperator, admin_pb2.RevokeOperatorRequest(operator="mallory"))
        for path in ("/vms", "/vms/vm1", "/jobs", "/plans/erp/confirm/test-failover"):
            refused = client.get(path)
            assert refused.status == 403, path
            assert 'data-vm="vm1"' not in refused.body
        went = client.post("/plans/erp/test-failover", {"csrf": client.csrf, "point": "latest"})
        assert went.status == 403
        kinds = [j.kind for j in a.call(a.stub.ListJobs, admin_pb2.ListJobsRequest()).jobs]
        assert "plan-failover" not in kinds
    finally:
        served.stop()


def test_drill_pages(dashboard: Dashboard) -> None:
    s = dashboard.sites
    setup_pair(s)
    protect(s, "vm1")
    a = s.admin
    a.call(a.stub.CreatePlan, admin_pb2.CreatePlanRequest(name="erp"))
    a.call(a.stub.AddPlanVm, admin_pb2.AddPlanVmRequest(plan="erp", group=1, vm="vm1"))
    assert "No drills yet" in dashboard.get("/drills").body

    went = dashboard.post("/plans/erp/drill", {"csrf": dashboard.csrf})
    assert went.status == 303
    s.job(a.call(a.stub.GetJob, admin_pb2.GetJobRequest(id=went.headers["Location"][6:])))
    drills = a.call(a.stub.ListDrills, admin_pb2.ListDrillsRequest()).drills
    listed = dashboard.get("/drills")
    assert rows(listed.body, "data-drill") == [drills[0].id]
    one = dashboard.get(f"/drills/{drills[0].id}")
    assert f'<section id="drill" data-state="{drills[0].state}">' in one.body
    assert '<tr data-vm="vm1">' in one.body and drills[0].started_by == dashboard.operator.id
    assert dashboard.get("/drills/drill-nothing").status == 404
    assert dashboard.get("/drills?plan=nope").status == 404


def test_vendored_htmx_is_the_published_release() -> None:
    """The SRI value htmx's docs publish for 2.0.11's htmx.min.js (VENDORED.md)."""
    digest = hashlib.sha384((STATIC / "htmx.min.js").read_bytes()).digest()
    assert (
        base64.b64encode(digest).decode()
        == "2OatzQy1H+Zd/IIrjr1TcuDGqLXeHhbooAyJY1KdQMKnr4LZ22k31GBLdYKHmVjg"
    )


def test_cycle_chart_scales_into_its_box_and_draws_nothing_without_data() -> None:
    assert chart.line_chart([Series("lag", "lag", [])], y_label="s", x_text={}) is None
    drawn = chart.line_chart(
        [Series("lag", "lag", [(1000.0, 60.0), (4600.0, 120.0), (8200.0, 30.0)])],
        y_label="s",
        x_text={1000.0: "00:16", 4600.0: "01:16", 8200.0: "02:16"},
    )
    assert drawn is not None
    ((_, points),) = drawn.lines
    xs = [float(p.split(",")[0]) for p in points.split()]
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert xs[0] == chart.LEFT and xs[-1] == chart.WIDTH - chart.RIGHT  # the whole width
    assert min(ys) == chart.TOP  # the largest value at the top
    assert ys[2] > ys[0] > ys[1]  # 30 s lowest on the page, 120 s highest
    assert [m[3] for m in drawn.markers] == ["lag: 60 s", "lag: 120 s", "lag: 30 s"]
    assert [t for _, t in drawn.x_ticks] == ["00:16", "01:16", "02:16"]


def test_a_vm_page_charts_its_cycles_size_duration_and_lag(dashboard: Dashboard) -> None:
    """Each cycle the primary reports committed is kept once (ListCycles), and the VM page
    draws size, duration and lag over them, with the numbers in a table."""
    s = dashboard.sites
    setup_pair(s)
    protect(s, "vm1")
    a = s.admin
    for n in range(2):
        with s.hosts["hv-a1"].backend.open_writer("vm1") as w:  # something for the cycle to send
            w.write("os", n * MiB, bytes([n + 1]) * (256 << 10))
            w.flush()
        done = s.job(
            a.call(
                a.stub.ReplicationAction,
                admin_pb2.ReplicationActionRequest(vm="vm1", action="cycle"),
            )
        )
    last = json.loads(done.steps[0].message)["sequence"]
    # The history holds what the primary reported: cycles that commit within one report
    # interval of each other (these two, on demand) may be seen as the later one only.
    cycles = eventually(
        lambda: (
            (c := a.call(a.stub.ListCycles, admin_pb2.ListCyclesRequest(vm="vm1")).cycles)
            and c[0].sequence == last
            and c
        ),
        what=f"cycle {last} in the history",
    )
    assert len(cycles) >= 2
    sequences = [c.sequence for c in cycles]
    assert sequences == sorted(set(sequences), reverse=True)  # each once, newest first
    newest, previous = cycles[0], cycles[1]
    assert newest.lag_seconds == pytest.approx(
        newest.finished_at.ToSeconds() - previous.cut_at.ToSeconds(), abs=1
    )
    assert (
        a.call(a.stub.ListCycles, admin_pb2.ListCyclesRequest(vm="vm1", limit=1)).cycles[0]
        == newest
    )
    page = dashboard.get("/vms/vm1").body
    for drawn in ("cycle-size-chart", "cycle-duration-chart", "cycle-lag-chart"):
        assert f'<svg id="{drawn}"' in page
    assert rows(page, "data-cycle")[0] == str(newest.sequence)
