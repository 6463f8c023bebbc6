"""The few pages the server core answers with itself: sign in, refused, errors.

Plain HTML without scripts or styles (the Content-Security-Policy allows neither inline), and
shown to anyone who reaches the port: the sign-in and refusal pages name no vault, operator,
host or VM, only how to sign in. The stable hooks (``main#signin``, ``main#refused``,
``main#error[data-status]``) are what tests look for.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

from sitepair.errors import SitepairError

#: HTTP status of each SitepairError status (the same mapping the admin API's gRPC codes mean).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_SIGN_IN = (
    "<p>Sign in with your operator certificate (the <code>admin.crt</code> and "
    "<code>admin.key</code> of your sitepair profile, imported into this browser), or run</p>"
    "<pre>sitepair-broker operators login --browser</pre>"
    "<p>and open the link it prints within a minute.</p>"
)


def _html(status: int, title: str, main_id: str, body: str) -> web.Response:
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} - sitepair</title></head>"
        f'<body><main id="{main_id}" data-status="{status}"><h1>{escape(title)}</h1>'
        f"{body}</main></body></html>\n"
    )
    return web.Response(status=status, text=text, content_type="text/html")


def sign_in(*, status: int = 401, note: str = "") -> web.Response:
    """How to sign in (401 when a page was asked for without a way in)."""
    extra = f"<p>{escape(note)}</p>" if note else ""
    return _html(status, "Sign in", "signin", extra + _SIGN_IN)


def refused(reason: str) -> web.Response:
    """403. ``reason`` is one of this module's fixed sentences, never an error's text."""
    return _html(403, "Refused", "refused", f"<p>{escape(reason)}</p>")


#: The refusals, in words that reveal nothing about the vault.
NOT_AN_OPERATOR = (
    "This certificate or session does not let you operate this vault: it is not an operator's, "
    "or the operator was revoked. Sign in again with a valid operator profile."
)
BAD_ORIGIN = "This form was sent from another site. Open the dashboard itself and try again."
BAD_CSRF = (
    "This form is out of date or did not come from the dashboard. Reload the page and try again."
)


def error(exc: SitepairError) -> web.Response:
    """What a signed-in operator sees when an action fails: the same message and hint the
    admin API would give."""
    status = HTTP_STATUS.get(exc.status, 500)
    hint = f'<p class="hint">{escape(exc.hint)}</p>' if exc.hint else ""
    return _html(status, "Not done", "error", f"<p>{escape(exc.message)}</p>{hint}")


def internal(reference: str) -> web.Response:
    body = f"<p>The broker failed unexpectedly (reference {escape(reference)} in its log).</p>"
    return _html(500, "Internal error", "error", body)
