"""The dashboard in headless Chromium against a real broker and two real agents (issue 15).

Each test drives the browser as an operator would (links, buttons, the confirmation form) and
checks what the page shows against the broker's own answer over the admin API. "Without
reloading" is checked by a mark left in the page's JavaScript state: it survives htmx swaps and
server-sent events, and is gone after any navigation or reload.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from sitepair import pki
from sitepair.v1 import admin_pb2
from tests.protection.conftest import eventually
from tests.web.browser.chromium import missing, tls_refusal
from tests.web.browser.deployment import OPERATOR, VAULT, Deployment, screenshot_dir
from tests.web.browser.tls_server import TestCa

if (why := missing()) is not None:
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import BrowserContext, Page, expect

#: Long enough for a throttled initial copy, a test failover, or a host turning Critical.
LIVE = 45_000


def mark_document(page: Page) -> None:
    page.evaluate("window.sitepairTestMark = 'still here'")


def same_document(page: Page) -> bool:
    return bool(page.evaluate("window.sitepairTestMark === 'still here'"))


def reveals_nothing(html: str) -> None:
    for secret in (VAULT, OPERATOR, "hv-a1", "hv-b1", "web1", "cloud-a", "erp"):
        assert secret not in html, secret


# -- signing in ---------------------------------------------------------------------------------


def test_an_operator_signs_in_with_the_admin_certificate(
    deployment: Deployment, operator: BrowserContext
) -> None:
    page = operator.new_page()
    response = page.goto(deployment.origin + "/")
    assert response is not None and response.status == 200
    assert page.url == deployment.origin + "/vms"
    expect(page.locator(".who .vault")).to_have_text(VAULT)
    expect(page.locator(".who .operator")).to_have_text(OPERATOR)
    nav = page.locator("nav[aria-label=Main] a")
    expect(nav).to_have_text(["Servers", "Clouds", "VMs", "Jobs", "Plans", "Drills"])
    expect(page.locator("table#vms")).to_be_visible()
    # The certificate alone signs this browser in: no session cookie was needed or made.
    assert [c["name"] for c in operator.cookies()] == []
    # The servers page shows both real agents connected.
    page.get_by_role("link", name="Servers").click()
    for host in ("hv-a1", "hv-b1"):
        expect(page.locator(f'table#servers tr[data-server="{host}"]')).to_be_visible()


def test_an_operator_signs_in_through_the_cli_s_login_link(deployment: Deployment) -> None:
    url = deployment.login_url()  # `sitepair-broker operators login --browser --json`
    assert url.startswith(deployment.origin + "/login?token=")
    browser = deployment.chromium.context()  # no certificate: the link is the only way in
    stranger = deployment.chromium.context()
    try:
        page = browser.new_page()
        page.goto(url)
        assert page.url == deployment.origin + "/vms"
        expect(page.locator(".who .operator")).to_have_text(OPERATOR)
        (session,) = browser.cookies()
        assert session["name"] == "sitepair_session"
        assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"

        # The link was for one sign-in: a second browser opening it gets the sign-in page only.
        other = stranger.new_page()
        refused = other.goto(url)
        assert refused is not None and refused.status == 401
        assert "not valid" in other.inner_text("main")
        reveals_nothing(other.content())
        assert stranger.cookies() == []
    finally:
        browser.close()
        stranger.close()


def test_signing_out_ends_the_session(deployment: Deployment) -> None:
    browser = deployment.chromium.context()
    try:
        page = browser.new_page()
        page.goto(deployment.login_url())
        expect(page.locator(".who .operator")).to_have_text(OPERATOR)
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("main#signin")).to_be_visible()
        again = page.goto(deployment.origin + "/vms")
        assert again is not None and again.status == 401
        reveals_nothing(page.content())
    finally:
        browser.close()


def test_a_browser_without_a_valid_certificate_gets_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.protected("web1")  # there is something to hide
    anonymous = deployment.chromium.context()
    try:
        page = anonymous.new_page()
        for path in ("/", "/vms", "/vms/web1", "/servers", "/jobs", "/plans", "/drills"):
            response = page.goto(deployment.origin + path)
            assert response is not None and response.status == 401, path
            assert "operators login --browser" in page.inner_text("main#signin")
            reveals_nothing(page.content())
    finally:
        anonymous.close()

    # The same operator name and vault, certified by a CA that is not the vault's.
    forger = TestCa(tmp_path / "forger", VAULT)
    forged = forger.issue(OPERATOR, pki.Role.ADMIN)
    ctx = deployment.chromium.operator(deployment.origin, forged.cert, forged.key)
    try:
        refusal = tls_refusal(ctx.new_page(), deployment.origin + "/vms")
        reveals_nothing(refusal)
    finally:
        ctx.close()


# -- live pages ---------------------------------------------------------------------------------


def test_a_vm_goes_from_initial_replication_to_protected_without_a_reload(
    deployment: Deployment, operator: BrowserContext
) -> None:
    deployment.start_protecting("web2")
    eventually(
        lambda: deployment.sites.protected("web2").state == "initial-replication",
        what="web2 in initial replication",
    )
    page = operator.new_page()
    page.goto(deployment.origin + "/vms")
    mark_document(page)
    row = page.locator('table#vms tr[data-vm="web2"]')
    expect(row.locator("td.state")).to_have_text("Initial replication")
    expect(row.locator("td.rpo")).to_have_text("no point yet")

    expect(row.locator("td.state")).to_have_text("Protected", timeout=LIVE)
    expect(row.locator("td.rpo")).to_have_text(re.compile(r"^\d+ (s|min)"))
    expect(row.locator("td.health")).to_contain_text("Normal")
    assert same_document(page)
    assert deployment.sites.protected("web2").state == "protected"


def test_a_job_s_steps_update_live_without_a_reload(
    deployment: Deployment, operator: BrowserContext
) -> None:
    job = deployment.start_protecting("web3")
    page = operator.new_page()
    page.goto(f"{deployment.origin}/jobs/{job.id}")
    mark_document(page)
    copy = page.locator("ol#steps > li", has_text="Initial replication")
    expect(page.locator("#job")).to_have_attribute("data-state", "running")
    expect(copy).to_have_attribute("data-state", "running", timeout=LIVE)

    expect(page.locator("#job")).to_have_attribute("data-state", "succeeded", timeout=LIVE)
    done = deployment.sites.job(job)
    assert [s.state for s in done.steps] == ["succeeded"] * len(done.steps)
    for step in done.steps:
        li = page.locator(f'ol#steps > li[data-step="{step.index}"]')
        expect(li).to_have_attribute("data-state", "succeeded")
        expect(li.locator(".step-name")).to_have_text(step.name)
    expect(page.locator("#job .created-by")).to_have_text(done.created_by)
    assert same_document(page)


# -- actions ------------------------------------------------------------------------------------


def run_plan_action(page: Page, d: Deployment, action: str) -> admin_pb2.Job:
    """From the plan page: the action's link, its confirmation, the job page until it ends."""
    page.goto(d.origin + "/plans/erp")
    page.locator(f'a.action[data-action="{action}"]').click()
    expect(page).to_have_url(f"{d.origin}/plans/erp/confirm/{action}")
    confirm = page.locator("#confirm")
    expect(confirm).to_contain_text("web1")
    page.locator("button#confirm-button").click()
    expect(page).to_have_url(re.compile(re.escape(d.origin) + r"/jobs/[^/]+$"))
    expect(page.locator("#job")).to_have_attribute("data-state", "succeeded", timeout=LIVE)
    job_id = page.url.rsplit("/", 1)[1]
    job: admin_pb2.Job = d.admin.call(d.admin.stub.GetJob, admin_pb2.GetJobRequest(id=job_id))
    return job


def test_a_test_failover_and_its_cleanup_from_the_plan_page(
    deployment: Deployment, operator: BrowserContext
) -> None:
    pv = deployment.protected("web1")
    deployment.plan("erp", "web1")
    page = operator.new_page()

    page.goto(deployment.origin + "/plans/erp/confirm/test-failover")
    confirm = page.locator("#confirm")  # names the VM and both of its hosts
    expect(confirm.locator('tr[data-vm="web1"]')).to_contain_text(pv.running_on)
    expect(confirm.locator('tr[data-vm="web1"]')).to_contain_text(pv.replica_server)

    test = run_plan_action(page, deployment, "test-failover")
    assert test.state == "succeeded" and test.target == "plan/erp"
    assert test.created_by == OPERATOR  # the dashboard's action is recorded as the operator's
    assert deployment.sites.protected("web1").HasField("test_failover")

    cleanup = run_plan_action(page, deployment, "cleanup-test")
    assert cleanup.state == "succeeded" and cleanup.created_by == OPERATOR
    assert cleanup.id != test.id
    assert not deployment.sites.protected("web1").HasField("test_failover")


# -- in the operator's zone, by keyboard --------------------------------------------------------


def test_times_are_shown_in_the_browser_s_zone_with_utc_on_hover(deployment: Deployment) -> None:
    deployment.protected("web1")
    tokyo = deployment.operator_context(timezone_id="Asia/Tokyo", locale="en-US")
    try:
        page = tokyo.new_page()
        page.goto(deployment.origin + "/vms/web1")
        when = page.locator("section#points time").first
        expect(when).to_contain_text("GMT+9")  # app.js: the browser's zone (UTC+9, no DST)
        stamp = dt.datetime.fromisoformat(str(when.get_attribute("datetime")))
        local = stamp.astimezone(dt.timezone(dt.timedelta(hours=9)))
        assert local.strftime("%I:%M:%S") in when.inner_text()
        title = str(when.get_attribute("title"))
        assert title.endswith(" UTC") and stamp.strftime("%H:%M:%S") in title
    finally:
        tokyo.close()


def test_the_keyboard_reaches_every_section_with_a_visible_focus(
    deployment: Deployment, operator: BrowserContext
) -> None:
    page = operator.new_page()
    page.goto(deployment.origin + "/vms")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to the content"
    focus = """() => {
        const e = document.activeElement, s = getComputedStyle(e);
        return [e.textContent.trim(), s.outlineStyle, s.outlineWidth];
    }"""
    for label in ("Servers", "Clouds", "VMs", "Jobs", "Plans", "Drills"):
        page.keyboard.press("Tab")
        name, style, width = page.evaluate(focus)
        assert name == label
        assert style != "none" and width != "0px", (label, style, width)
    page.keyboard.press("Enter")
    expect(page).to_have_url(deployment.origin + "/drills")


def test_a_phone_sized_screen_scrolls_tables_not_pages(
    deployment: Deployment, operator: BrowserContext
) -> None:
    """On a phone (390 px wide) the nav wraps and stays whole, and a wide table scrolls inside
    its own box: the page itself never needs scrolling sideways."""
    deployment.protected("web1")
    page = operator.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    for path, hook in (
        ("/vms", "table#vms"),
        ("/vms/web1", "section#points"),
        ("/servers", "table#servers"),
    ):
        page.goto(deployment.origin + path)
        expect(page.locator(hook)).to_be_visible()
        assert page.evaluate(overflow) <= 0, path
        for label in ("Servers", "Clouds", "VMs", "Jobs", "Plans", "Drills"):
            box = page.get_by_role("link", name=label, exact=True).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, label


# -- the main pages, as pictures ----------------------------------------------------------------


def test_screenshots_of_each_main_page(
    deployment: Deployment, operator: BrowserContext, tmp_path: Path
) -> None:
    deployment.protected("web1")
    deployment.plan("erp", "web1")
    jobs = deployment.admin.call(deployment.admin.stub.ListJobs, admin_pb2.ListJobsRequest())
    enable = next(j for j in jobs.jobs if j.kind == "enable-protection" and j.target == "vm/web1")
    out = screenshot_dir(tmp_path)
    page = operator.new_page()
    shots = {
        "servers": ("/servers", "table#servers"),
        "clouds": ("/clouds", "table#pairs"),
        "vms": ("/vms", "table#vms"),
        "vm": ("/vms/web1", "#cycle-chart"),
        "jobs": ("/jobs", "table#jobs"),
        "job": (f"/jobs/{enable.id}", "ol#steps"),
        "plans": ("/plans", "table#plans"),
        "plan": ("/plans/erp", 'a.action[data-action="test-failover"]'),
        "confirm": ("/plans/erp/confirm/test-failover", "form#confirm-form"),
        "drills": ("/drills", "main"),
    }
    for name, (path, hook) in shots.items():
        response = page.goto(deployment.origin + path)
        assert response is not None and response.status == 200, path
        expect(page.locator(hook).first).to_be_visible()
        page.screenshot(path=out / f"{name}.png")
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- health -------------------------------------------------------------------------------------


def test_health_turns_critical_with_its_reason_when_the_recovery_agent_stops(
    deployment: Deployment, operator: BrowserContext, tmp_path: Path
) -> None:
    pv = deployment.protected("web1")
    page = operator.new_page()
    page.goto(deployment.origin + "/vms")
    mark_document(page)
    row = page.locator('table#vms tr[data-vm="web1"]')
    expect(row.locator("td.health")).to_contain_text("Normal")

    recovery = deployment.hosts[pv.replica_server]
    recovery.stop()
    try:
        expect(row.locator("td.health")).to_contain_text("Critical", timeout=LIVE)
        expect(row.locator("td.reasons")).to_contain_text(
            f"the replica host {pv.replica_server} has been offline for"
        )
        assert same_document(page)
        page.screenshot(path=screenshot_dir(tmp_path) / "vms-critical.png")
        assert deployment.sites.protected("web1").health == "critical"
    finally:
        recovery.start()
