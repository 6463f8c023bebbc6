"""The dashboard's pages (docs/dashboard-pages.md): every route but sign-in and sign-out.

``add_routes(app)`` is called by ``broker.web.server.create_app``; the authentication middleware
has set ``request["operator"]`` and ``request["csrf"]`` before any handler here runs, and refused
a POST without the right CSRF token. Handlers (:mod:`broker.web.pages.views`) read and act only
through :class:`broker.web.api.DashboardApi`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from broker.web.pages import views
from broker.web.pages.render import TEMPLATE_ENV, environment

STATIC = Path(__file__).resolve().parent.parent / "static"


def add_routes(app: web.Application) -> None:
    app[TEMPLATE_ENV] = environment()
    get = [
        ("/", views.home),
        ("/servers", views.servers),
        ("/clouds", views.clouds),
        ("/vms", views.vms),
        ("/vms/{name:.+}", views.vm),  # a VM name may hold a "/" (%2F in its links)
        ("/jobs", views.jobs),
        ("/jobs/{id}", views.job),
        ("/jobs/{id}/events", views.job_events),
        ("/plans", views.plans),
        ("/plans/{name}", views.plan),
        ("/plans/{name}/confirm/{action}", views.confirm),
        ("/drills", views.drills),
        ("/drills/{id}", views.drill),
    ]
    for path, handler in get:
        app.router.add_get(path, handler)
    app.router.add_post("/plans/{name}/{action}", views.run_action)
    app.router.add_static("/static", STATIC)
