"""Who gets into the dashboard, against a real broker over real HTTPS, the tests as attackers.

Ways in: the operator's certificate (mutual TLS) and a session from a one-time login token.
Everything else gets nothing: no certificate, another CA's, an agent's, a revoked operator's,
a used or expired token, a forged or ended session; and a POST must carry the CSRF token and
come from the dashboard's own origin.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.ca import write_operator_profile
from broker.cli_servers import dashboard_url
from broker.dashboard_logins import LOGIN_LIFETIME
from broker.web import SESSION_COOKIE
from sitepair import pki
from sitepair.clock import ManualClock
from sitepair.errors import PermissionDenied
from sitepair.v1 import admin_pb2
from tests.support import dashboard as support
from tests.support.brokers import BrokerThread, make_home, python_env
from tests.support.dashboard import Dashboard, client_context, fetch, write_identity

dashboard = support.dashboard

#: What the 401 and 403 pages must not name.
SECRETS = ("bluevault", "local-admin", "bob", "hv-1", "site-a")


def _names_nothing(text: str) -> None:
    for word in SECRETS:
        assert word not in text, word


# -- certificates ------------------------------------------------------------------------------


def test_an_operator_certificate_is_accepted(dashboard: Dashboard) -> None:
    reply = fetch(f"{dashboard.url}/whoami", dashboard.admin())
    assert reply.status == 200
    assert reply.json()["operator"] == "local-admin"
    # Signed in by certificate, /login goes straight to the dashboard.
    login = fetch(f"{dashboard.url}/login", dashboard.admin())
    assert login.status == 303 and login.headers["Location"] == "/"


def test_without_a_certificate_or_session_a_page_gets_401_naming_nothing(
    dashboard: Dashboard,
) -> None:
    for path in ("/whoami", "/", "/vms", "/static/app.css", "/fail"):
        reply = fetch(f"{dashboard.url}{path}", dashboard.anonymous())
        assert reply.status == 401, path
        assert 'id="signin"' in reply.text and "operators login --browser" in reply.text
        _names_nothing(reply.text)
    post = fetch(f"{dashboard.url}/echo", dashboard.anonymous(), method="POST", data={})
    assert post.status == 401


def test_a_certificate_of_another_ca_is_refused_in_the_handshake(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    # Same vault name and role, but signed by a CA the vault does not trust.
    other_key, other_ca = pki.create_ca("bluevault", now=time.time())
    identity = pki.Identity(vault="bluevault", role=pki.Role.ADMIN, id="local-admin")
    cert, key = write_identity(tmp_path / "forged", other_key, other_ca, identity)
    browser = client_context(dashboard.ca_pem, cert, key)
    with pytest.raises(aiohttp.ClientError):
        fetch(f"{dashboard.url}/whoami", browser)


def test_an_agent_certificate_is_refused_with_403(dashboard: Dashboard, tmp_path: Path) -> None:
    ca = dashboard.broker.ctx.ca
    agent = pki.Identity(vault="bluevault", role=pki.Role.AGENT, id="hv-1", site="site-a")
    cert, key = write_identity(tmp_path / "agent", ca.key, ca.cert, agent)
    reply = fetch(f"{dashboard.url}/whoami", client_context(dashboard.ca_pem, cert, key))
    assert reply.status == 403
    assert 'id="refused"' in reply.text
    _names_nothing(reply.text)
    # A presented certificate decides alone: no way around it through the sign-in page.
    login = fetch(f"{dashboard.url}/login?token=x", client_context(dashboard.ca_pem, cert, key))
    assert login.status == 403


def _add_operator(d: Dashboard, name: str, folder: Path) -> Path:
    key = pki.generate_key()
    with d.broker.admin() as admin:
        resp = admin.call(
            admin.stub.AddOperator,
            admin_pb2.AddOperatorRequest(name=name, csr_der=pki.make_csr(key, name)),
        )
    write_operator_profile(
        folder,
        key=key,
        cert=pki.load_cert_pem(resp.certificate_pem),
        ca_pem=resp.ca_pem,
        vault=resp.vault,
        addresses=list(resp.control_addresses),
    )
    return folder


def test_a_revoked_operator_is_refused_at_once_by_certificate_and_by_session(
    dashboard: Dashboard, tmp_path: Path
) -> None:
    bob = _add_operator(dashboard, "bob", tmp_path / "bob")
    bob_browser = support.operator_context(bob)
    assert fetch(f"{dashboard.url}/whoami", bob_browser).json()["operator"] != "local-admin"
    session = dashboard.sign_in(bob)
    by_session = fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=session)
    assert by_session.status == 200
    with dashboard.broker.admin() as admin:
        admin.call(admin.stub.RevokeOperator, admin_pb2.RevokeOperatorRequest(operator="bob"))
    by_cert = fetch(f"{dashboard.url}/whoami", bob_browser)
    assert by_cert.status == 403 and 'id="refused"' in by_cert.text
    _names_nothing(by_cert.text)
    by_session = fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=session)
    assert by_session.status == 403
    # Nor does bob get a new login token: the admin API refuses him.
    with pytest.raises(PermissionDenied):
        dashboard.login_token(bob)
    # Another operator signs in on the same browser, whose cookie is still bob's.
    token = dashboard.login_token()
    replaced = fetch(f"{dashboard.url}/login?token={token}", dashboard.anonymous(), cookie=session)
    assert replaced.status == 303 and replaced.cookie(SESSION_COOKIE)


# -- login tokens and sessions -----------------------------------------------------------------


def test_a_login_token_signs_in_once_with_a_strict_session_cookie(dashboard: Dashboard) -> None:
    token = dashboard.login_token()
    first = fetch(f"{dashboard.url}/login?token={token}", dashboard.anonymous())
    assert first.status == 303 and first.headers["Location"] == "/"
    (line,) = [c for c in first.set_cookies if c.startswith(f"{SESSION_COOKIE}=")]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in line.split(";")[1:]}
    assert "httponly" in flags and "secure" in flags
    assert flags["samesite"] == "SameSite=Strict"
    assert flags["path"] == "Path=/"
    assert flags["max-age"] == f"Max-Age={8 * 3600}"
    secret = first.cookie(SESSION_COOKIE)
    assert secret and token not in line
    signed_in = fetch(
        f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=f"{SESSION_COOKIE}={secret}"
    )
    assert signed_in.status == 200 and signed_in.json()["operator"] == "local-admin"

    again = fetch(f"{dashboard.url}/login?token={token}", dashboard.anonymous())
    assert again.status == 401 and again.cookie(SESSION_COOKIE) is None
    assert "used already" in again.text
    _names_nothing(again.text)


@pytest.mark.parametrize("token", ["", "x", "A" * 43, "A" * 5000, "../../etc/passwd", "%00"])
def test_forged_tokens_and_cookies_get_nothing(dashboard: Dashboard, token: str) -> None:
    login = fetch(f"{dashboard.url}/login?token={token}", dashboard.anonymous())
    assert login.status == 401 and not login.set_cookies
    cookie = f"{SESSION_COOKIE}={token or 'none'}"
    page = fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=cookie)
    assert page.status == 401


def test_the_store_holds_only_hashes_of_tokens_and_sessions(dashboard: Dashboard) -> None:
    token = dashboard.login_token()
    cookie = fetch(f"{dashboard.url}/login?token={token}", dashboard.anonymous()).cookie(
        SESSION_COOKIE
    )
    assert cookie
    dump = b"\n".join(
        dashboard.home.database.with_suffix(suffix).read_bytes()
        for suffix in (".db", ".db-wal")
        if dashboard.home.database.with_suffix(suffix).exists()
    )
    assert token.encode() not in dump and cookie.encode() not in dump


@pytest.fixture
def clocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Dashboard, ManualClock]]:
    """A dashboard whose broker reads the time from a clock the test moves (TLS uses the real
    time, so the clock starts now)."""
    clock = ManualClock(start=time.time())
    home = make_home(tmp_path / "broker", vault="bluevault", clock=clock)
    d = support.start_dashboard(home, monkeypatch, clock=clock)
    yield d, clock
    d.stop()


def test_a_login_token_expires_after_a_minute(clocked: tuple[Dashboard, ManualClock]) -> None:
    d, clock = clocked
    token = d.login_token()
    clock.advance(LOGIN_LIFETIME + 1)
    reply = fetch(f"{d.url}/login?token={token}", d.anonymous())
    assert reply.status == 401 and reply.cookie(SESSION_COOKIE) is None


def test_a_session_ends_after_its_lifetime(clocked: tuple[Dashboard, ManualClock]) -> None:
    d, clock = clocked
    session = d.sign_in()
    clock.advance(8 * 3600 - 60)
    assert fetch(f"{d.url}/whoami", d.anonymous(), cookie=session).status == 200
    clock.advance(61)
    assert fetch(f"{d.url}/whoami", d.anonymous(), cookie=session).status == 401


def test_logout_ends_the_session(dashboard: Dashboard) -> None:
    session = dashboard.sign_in()
    csrf = fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=session).json()["csrf"]
    out = fetch(
        f"{dashboard.url}/logout",
        dashboard.anonymous(),
        method="POST",
        data={"csrf": csrf},
        cookie=session,
    )
    assert out.status == 303 and out.headers["Location"] == "/login"
    (cleared,) = out.set_cookies
    assert cleared.startswith(f'{SESSION_COOKIE}="";') and "Max-Age=0" in cleared
    assert fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=session).status == 401


# -- forms: CSRF and Origin --------------------------------------------------------------------


def test_a_post_needs_the_csrf_token_of_its_way_in(dashboard: Dashboard) -> None:
    url = f"{dashboard.url}/echo"
    admin = dashboard.admin()
    csrf = fetch(f"{dashboard.url}/whoami", admin).json()["csrf"]
    assert fetch(url, admin, method="POST", data={"what": "x"}).status == 403
    wrong = fetch(url, admin, method="POST", data={"csrf": csrf[:-2] + "AA", "what": "x"})
    assert wrong.status == 403 and 'id="refused"' in wrong.text
    assert fetch(url, admin, method="POST", data={"csrf": csrf, "what": "x"}).text == "done x"
    by_header = fetch(url, admin, method="POST", headers={"X-CSRF-Token": csrf}, data={})
    assert by_header.status == 200
    # A session's token is its own: the certificate's does not pass for it, nor the reverse.
    session = dashboard.sign_in()
    own = fetch(f"{dashboard.url}/whoami", dashboard.anonymous(), cookie=session).json()["csrf"]
    assert own != csrf
    anon = dashboard.anonymous()
    crossed = fetch(url, anon, method="POST", data={"csrf": csrf}, cookie=session)
    assert crossed.status == 403
    assert fetch(url, anon, method="POST", data={"csrf": own}, cookie=session).status == 200


def test_a_post_from_another_origin_is_refused(dashboard: Dashboard) -> None:
    url = f"{dashboard.url}/echo"
    admin = dashboard.admin()
    csrf = fetch(f"{dashboard.url}/whoami", admin).json()["csrf"]
    for origin in ("https://evil.example", "null", dashboard.url.replace("https", "http")):
        reply = fetch(url, admin, method="POST", data={"csrf": csrf}, headers={"Origin": origin})
        assert reply.status == 403, origin
    same = fetch(url, admin, method="POST", data={"csrf": csrf}, headers={"Origin": dashboard.url})
    assert same.status == 200


# -- the CLI -----------------------------------------------------------------------------------


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in python_env().items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "--home", str(home), "operators", "login", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_operators_login_browser_prints_a_link_that_signs_in(dashboard: Dashboard) -> None:
    done = _cli(dashboard.home.root, "--browser", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["url"].startswith(f"{dashboard.url}/login?token=")
    assert doc["expires_at"].endswith("Z") or "+00:00" in doc["expires_at"]
    reply = fetch(doc["url"], dashboard.anonymous())
    assert reply.status == 303 and reply.cookie(SESSION_COOKIE)

    text = _cli(dashboard.home.root, "--browser", "--no-open")
    assert text.returncode == 0, text.stderr
    assert f"{dashboard.url}/login?token=" in text.stdout and "within a minute" in text.stdout

    bare = _cli(dashboard.home.root)
    assert bare.returncode != 0 and "--browser" in bare.stderr
    assert "Traceback" not in bare.stderr


def test_operators_login_says_when_the_dashboard_is_off(tmp_path: Path) -> None:
    home = make_home(tmp_path / "broker")
    broker = BrokerThread(home)
    try:
        done = _cli(home.root, "--browser")
        assert done.returncode != 0
        assert "does not serve the web dashboard" in done.stderr
        assert "[dashboard] enabled = true" in done.stderr and "Traceback" not in done.stderr
    finally:
        broker.stop()


def test_the_url_of_a_dashboard_on_every_address_uses_the_host_dialed() -> None:
    assert dashboard_url("0.0.0.0:9443", "broker.example:8443", "T") == (
        "https://broker.example:9443/login?token=T"
    )
    assert dashboard_url("[::]:9443", "[2001:db8::1]:8443", "T") == (
        "https://[2001:db8::1]:9443/login?token=T"
    )
    assert dashboard_url("10.0.0.5:9443", "other:8443", "T") == (
        "https://10.0.0.5:9443/login?token=T"
    )
