"""The dashboard: web pages on the HTTP API, served by ``broker-q api`` under ``/ui``.

Server-rendered HTML (Jinja2 templates), a stylesheet and a small script, all in this package: no
build step, no CDN. Each page calls the API's own endpoint functions as the principal of the
session's token, so it shows and allows exactly what the API would, and a refusal is recorded in
the audit log the same way. One module per area, like :mod:`broker_q.api`:

- :mod:`~broker_q.dashboard.session`: sign in with a token (kept in an HttpOnly cookie), sign out;
- :mod:`~broker_q.dashboard.overview`: queues, throughput and failure rate, workers, projection lag;
- :mod:`~broker_q.dashboard.tasks`: the task list and one task's page, cancel and replay;
- :mod:`~broker_q.dashboard.dead_letters`: dead letters grouped by error, replayed in a batch;
- :mod:`~broker_q.dashboard.workflows`: the latest workflows, one workflow's graph;
- :mod:`~broker_q.dashboard.operations`: schedules and breakers, paused, resumed, opened, closed;
- :mod:`~broker_q.dashboard.history`: the audit log (and its export), time travel;

and around them :mod:`~broker_q.dashboard.web` (templates, errors as pages, forms and their CSRF
tokens), :mod:`~broker_q.dashboard.charts` and :mod:`~broker_q.dashboard.graph` (layouts drawn as SVG).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

__all__ = ["install"]

STATIC = Path(__file__).parent / "static"


def install(api: FastAPI) -> None:
    """Serve the dashboard's pages and static files under ``/ui`` of ``api`` (made by ``create_api``)."""
    from broker_q.dashboard import dead_letters, history, operations, overview, session, tasks, workflows

    for module in (session, overview, tasks, dead_letters, workflows, operations, history):
        api.include_router(module.router)
    api.mount("/ui/static", StaticFiles(directory=STATIC), name="dashboard-static")
