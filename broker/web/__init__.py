"""The broker's web dashboard (issue 15).

STAND-IN for the core helper's module (branch ``webcore``): only the app key the contract
(``/tmp/h/dashboard.md``) defines, so the pages can be built and tested before core lands. The
lead's merge takes core's file.
"""

from __future__ import annotations

from aiohttp import web

from broker.services.context import BrokerContext

#: The broker's components, set by ``broker.web.server.create_app``.
CONTEXT = web.AppKey("context", BrokerContext)
