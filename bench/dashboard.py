#!/usr/bin/env python3
"""Dashboard benchmark: page load times with 2,000 protected VMs and 50,000 jobs in the store.

The deployment is the browser tests' (:mod:`tests.web.browser.deployment`): a real broker
(in this process, on its own event loop) serving the dashboard over HTTPS, two real agents, one
VM protected for real. The store is then seeded through the repository layer
(``store.write()``, ``insert_relationship``, ``insert_job``) with copies of that VM's
relationship (its real recovery points, cycle history and status) up to ``--vms`` protected VMs,
and with ``--jobs`` finished jobs (copies of its real enable-protection job, six steps each,
spread over 30 days, one in twenty failed), on the broker's own SQLite store while it runs.

Then, for /vms, /jobs and one VM's page (``/vms/vm-0000``), each opened once to warm the page
cache and the broker, and then ``--runs`` times (median reported):

* **TTFB, HTTP client**: an ``http.client`` HTTPS connection kept alive, with the operator's
  certificate: from sending the request to the status line and headers. The server's time.
* **TTFB, browser** and **load event, browser**: headless Chromium (Debian's, through Playwright,
  signed in with the operator's certificate, the bench's viewport 1280x800), from the page's
  Navigation Timing entry: ``responseStart - requestStart`` and ``loadEventEnd - startTime``
  (the stylesheet and scripts are fetched too; the browser cache is warm after the first load).
  These include Playwright's client-certificate relay, a local TLS hop.

Also shown: the HTML size and the rows the page rendered (pages are paged).

``--quick`` (200 VMs, 2,000 jobs, 3 runs) is a smoke test; ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import random
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_facts, median, table, wait_for_quiet, write_json

from broker.store.models import JobState, StepState
from tests.web.browser.chromium import missing
from tests.web.browser.deployment import Deployment

PAGES = {"/vms": "table#vms tbody tr", "/jobs": "table#jobs tbody tr", "/vms/vm-0000": "main"}

NAVIGATION = """() => {
  const n = performance.getEntriesByType('navigation')[0];
  return {ttfb: n.responseStart - n.requestStart, load: n.loadEventEnd - n.startTime};
}"""


#: The step a failed seeded job failed at (the initial copy); the ones after it never ran.
FAILED_STEP = 4


def step_state(index: int, failed: bool) -> StepState:
    if not failed or index < FAILED_STEP:
        return StepState.SUCCEEDED
    return StepState.FAILED if index == FAILED_STEP else StepState.SKIPPED


def seed(d: Deployment, vms: int, jobs: int) -> dict[str, float]:
    """Copies of vm-0000's relationship and job, written through the repository layer."""
    store = d.broker.ctx.store
    with store.read() as tx:
        real = tx.find_relationship("vm-0000")
        enable = next(j for j in tx.list_jobs(kind="enable-protection", limit=10))
        template = tx.get_job(enable.id)
    assert template is not None
    started = time.perf_counter()
    with store.write() as tx:
        for n in range(1, vms):
            tx.insert_relationship(
                dataclasses.replace(
                    real,
                    id=f"rel-{uuid.uuid4().hex[:12]}",
                    vm_id=str(uuid.uuid4()),
                    vm_name=f"vm-{n:04d}",
                )
            )
    seeded_vms = time.perf_counter() - started
    rng = random.Random(15)
    now = time.time()
    started = time.perf_counter()
    batch = 5000
    for first in range(0, jobs, batch):
        with store.write() as tx:
            for _ in range(first, min(jobs, first + batch)):
                job_id = f"job-{uuid.uuid4().hex[:12]}"
                created = now - rng.uniform(60, 30 * 86400)
                failed = rng.random() < 0.05
                steps = tuple(
                    dataclasses.replace(
                        s,
                        job_id=job_id,
                        started_at=created + s.index,
                        finished_at=created + s.index + 1,
                        state=step_state(s.index, failed),
                    )
                    for s in template.steps
                )
                tx.insert_job(
                    dataclasses.replace(
                        template,
                        id=job_id,
                        target=f"vm/vm-{rng.randrange(vms):04d}",
                        state=JobState.FAILED if failed else JobState.SUCCEEDED,
                        created_at=created,
                        updated_at=created + len(steps),
                        finished_at=created + len(steps),
                        error="the replica host went offline" if failed else "",
                        steps=steps,
                    )
                )
    return {"seed_vms_s": seeded_vms, "seed_jobs_s": time.perf_counter() - started}


def client_ttfb(d: Deployment, path: str, runs: int) -> tuple[list[float], int]:
    """TTFB in ms of ``runs`` GETs on one kept-alive connection, after one warm-up."""
    admin = d.home.admin_dir
    ctx = ssl.create_default_context(cafile=str(admin / "ca.crt"))
    ctx.load_cert_chain(admin / "admin.crt", admin / "admin.key")
    host, port = d.broker.ctx.bound_dashboard.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=60)
    times: list[float] = []
    size = 0
    try:
        for i in range(runs + 1):
            start = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            ttfb = (time.perf_counter() - start) * 1000
            body = resp.read()
            assert resp.status == 200, (path, resp.status)
            size = len(body)
            if i:
                times.append(ttfb)
    finally:
        conn.close()
    return times, size


def browser_times(d: Deployment, path: str, rows: str, runs: int) -> dict[str, Any]:
    ctx = d.operator_context()
    try:
        page = ctx.new_page()
        ttfb: list[float] = []
        load: list[float] = []
        shown = 0
        for i in range(runs + 1):
            response = page.goto(d.origin + path)
            assert response is not None and response.status == 200, path
            page.wait_for_function("performance.getEntriesByType('navigation')[0].loadEventEnd > 0")
            t = page.evaluate(NAVIGATION)
            shown = page.locator(rows).count()
            if i:
                ttfb.append(t["ttfb"])
                load.append(t["load"])
        return {"ttfb_ms": ttfb, "load_ms": load, "rows": shown}
    finally:
        ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="200 VMs, 2,000 jobs, 3 runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.vms, args.jobs, args.runs = 200, 2000, 3
    if (why := missing()) is not None:
        print(f"dashboard benchmark: {why}", file=sys.stderr)
        return 2
    wait_for_quiet(1.0, 300)
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        d = Deployment(Path(tmp))
        try:
            d.protected("vm-0000")
            seeded = seed(d, args.vms, args.jobs)
            print(
                f"seeded {args.vms} protected VMs in {seeded['seed_vms_s']:.1f} s and "
                f"{args.jobs} jobs in {seeded['seed_jobs_s']:.1f} s",
                file=sys.stderr,
            )
            results: dict[str, Any] = {}
            for path, rows in PAGES.items():
                server, size = client_ttfb(d, path, args.runs)
                results[path] = {"client_ttfb_ms": server, "html_bytes": size}
                results[path].update(browser_times(d, path, rows, args.runs))
        finally:
            d.close()
    header = ["page", "TTFB, HTTP client", "TTFB, browser", "load event, browser", "HTML", "rows"]
    out = []
    for path, r in results.items():
        out.append(
            [
                f"`{path}`",
                f"{median(r['client_ttfb_ms']):.0f} ms",
                f"{median(r['ttfb_ms']):.0f} ms",
                f"{median(r['load_ms']):.0f} ms",
                f"{r['html_bytes'] / 1024:.0f} KiB",
                str(r["rows"]) if path != "/vms/vm-0000" else "-",
            ]
        )
    print(
        f"\n{args.vms} protected VMs, {args.jobs} jobs; median of {args.runs} warm loads "
        f"(load at start {facts['load_1m_at_start']})\n"
    )
    print(table(header, out))
    write_json(args.json, {"machine": facts, "args": vars(args) | {"json": None}, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
