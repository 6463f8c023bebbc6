"""The dashboard's HTTPS server: the aiohttp application and its life inside the broker.

:func:`create_app` builds the application: the error and authentication middlewares
(:mod:`broker.web.auth`), the security headers on every response, the sign-in routes, and the
pages (:func:`add_page_routes`). :class:`DashboardServer` serves it on ``[dashboard] listen``
on the broker's own event loop (the one grpc.aio runs on), with the TLS of
:mod:`broker.web.tls`, and stops with the broker.

aiohttp's access log is off: a sign-in URL carries its login token in the query string, and a
log line per page view is noise. Refusals are logged by :mod:`broker.web.auth`; every response
is counted by status in ``sitepair_dashboard_requests_total`` (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import uuid

from aiohttp import web
from prometheus_client import Counter

from broker.home import BrokerHome
from broker.services.context import BrokerContext
from broker.web import CONTEXT, notices
from broker.web.auth import Authenticator, Handler
from broker.web.tls import DashboardTls
from sitepair import addresses
from sitepair.errors import ConfigError, InvalidArgument, SitepairError
from sitepair.logsafe import clipped, shown

log = logging.getLogger("sitepair.broker.web")

#: Sent with every response. No inline script or style anywhere: templates link their files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the
    # dashboard's own forms, which the CSRF defence must refuse; no Referer leaves the site.
    "Referrer-Policy": "same-origin",
}
#: Static files (scripts, styles) may be cached; pages never are.
STATIC_PREFIX = "/static/"
#: The largest request body: the dashboard's forms are a few fields.
MAX_REQUEST_BYTES = 64 * 1024
#: How long open requests (event streams) may run on once the broker shuts down.
SHUTDOWN_GRACE = 5.0


def add_page_routes(app: web.Application) -> None:
    """Every page's route: ``broker.web.pages.add_routes`` (the pages' own package, looked up
    by name so that the server core stands, and is type-checked, without it)."""
    importlib.import_module("broker.web.pages").add_routes(app)


def create_app(ctx: BrokerContext) -> web.Application:
    """The dashboard application of the broker ``ctx`` belongs to."""
    auth = Authenticator(ctx)
    app = web.Application(middlewares=[_errors, auth.middleware], client_max_size=MAX_REQUEST_BYTES)
    app[CONTEXT] = ctx
    app.on_response_prepare.append(_security_headers)
    auth.add_routes(app)
    add_page_routes(app)
    return app


async def _security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith(STATIC_PREFIX):
        response.headers["Cache-Control"] = "no-store"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A failed action shows the admin API's message and hint; anything unexpected a
    reference into the log, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except SitepairError as exc:
        log.info(
            "dashboard action refused",
            extra={
                "fields": {
                    "path": shown(request.path),
                    "status": exc.status,
                    "error": clipped(str(exc)),
                }
            },
        )
        return notices.error(exc)
    except Exception as exc:  # the one place unexpected errors end
        ref = uuid.uuid4().hex[:12]
        log.error(
            "dashboard request failed unexpectedly",
            exc_info=exc,
            extra={"fields": {"path": shown(request.path), "ref": ref}},
        )
        return notices.internal(ref)


class DashboardServer:
    """The dashboard, served by the broker while it runs."""

    def __init__(
        self, ctx: BrokerContext, home: BrokerHome, *, requests: Counter | None = None
    ) -> None:
        self.ctx = ctx
        self.home = home
        self.requests = requests
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Bind and serve; returns the bound HOST:PORT. ConfigError if it cannot listen or
        its certificate cannot be used."""
        config = self.ctx.config.dashboard
        try:
            host, port = addresses.check_host_port(
                config.listen, "[dashboard] listen", allow_zero=True
            )
        except InvalidArgument as exc:
            raise ConfigError(exc.message, hint=exc.hint) from exc
        tls = DashboardTls(config, self.home, self.ctx.ca, self.ctx.server_cert)
        ssl_context = await asyncio.to_thread(tls.context)
        app = create_app(self.ctx)
        if self.requests is not None:
            app.on_response_prepare.append(self._count)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"the dashboard cannot listen on {config.listen}: {exc.strerror or exc}",
                hint="is the port in use? change [dashboard] listen in broker.toml",
            ) from exc
        bound = addresses.join(host, int(runner.addresses[0][1]))
        log.info(
            "dashboard serving",
            extra={"fields": {"address": bound, "certificate": str(tls.cert_path)}},
        )
        return bound

    async def _count(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        assert self.requests is not None
        self.requests.labels(str(response.status)).inc()

    async def stop(self) -> None:
        """Stop listening; open requests get :data:`SHUTDOWN_GRACE` to finish (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
