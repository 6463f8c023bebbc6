"""The web dashboard the broker serves (issue 15; docs/dashboard.md).

An aiohttp application on the broker's own event loop, HTTPS only, off unless ``[dashboard]
enabled``. The server core (:mod:`broker.web.server`, :mod:`broker.web.auth`,
:mod:`broker.web.tls`) serves it, signs operators in and refuses everyone else before any page
runs; the pages (:mod:`broker.web.pages`) read and act through :mod:`broker.web.api`, that is
through the admin API's own handlers.

What the core hands every page handler it lets through:

* ``request.app[CONTEXT]``: the broker's :class:`~broker.services.context.BrokerContext`;
* ``request[OPERATOR]`` (``"operator"``): the signed-in operator's :class:`sitepair.pki.Identity`
  (role admin, authorised for this request as the admin API authorises a call);
* ``request[CSRF]`` (``"csrf"``): the token every form that POSTs carries as
  ``<input type="hidden" name="csrf" value="...">`` (or a script sends as the
  ``X-CSRF-Token`` header); a POST without it is refused before its handler runs.
"""

from __future__ import annotations

from aiohttp import web

from broker.services.context import BrokerContext

#: The broker's context, in the application.
CONTEXT = web.AppKey("context", BrokerContext)
#: The request keys the authentication middleware sets (plain strings: the pages' contract).
OPERATOR = "operator"
CSRF = "csrf"
#: The form field and the header that carry the CSRF token.
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
#: The session cookie a login token turns into.
SESSION_COOKIE = "sitepair_session"
