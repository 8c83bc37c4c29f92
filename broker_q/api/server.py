"""The API application: :func:`create_api` builds it for an App, :func:`serve` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from broker_q import dashboard
from broker_q.api import activity, admin, audit, breakers, health, queues, replay, schedules, tasks, workflows
from broker_q.api.context import Context
from broker_q.api.errors import install_error_handlers
from broker_q.app import App

__all__ = ["create_api", "serve"]

_DESCRIPTION = """\
The HTTP API of broker_q: submit tasks, read their states and histories, the queues, dead letters,
schedules, workflows, the audit log and the events, and replay any of it as of a past moment.

Every endpoint but `/healthz` and `/readyz` needs an API token: `Authorization: Bearer <token>`.
Errors are `{"error": {"type": ..., "message": ...}}`: 401 without a valid token, 403 when the
token's roles or tenant do not allow the action (the refusal is in the audit log), 404 for an
unknown id (or one of a tenant the token cannot see), 409 when the record's state forbids the
action, 422 for invalid input, 503 when the store or RabbitMQ does not answer.
"""


def create_api(app: App, *, public_metrics: bool | None = None) -> FastAPI:
    """The HTTP API of ``app`` (its store, its settings, its registered tasks).

    ``public_metrics``: serve ``/metrics`` without a token; by default the setting
    ``api_public_metrics`` (``BROKER_Q_API_PUBLIC_METRICS``) says.
    """
    context = Context(app, app.settings.api_public_metrics if public_metrics is None else public_metrics)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(context.close)

    api = FastAPI(title="broker_q", version="1", description=_DESCRIPTION, lifespan=lifespan)
    api.state.context = context
    install_error_handlers(api)
    for module in (tasks, queues, schedules, workflows, audit, replay, breakers, admin, health, activity):
        api.include_router(module.router)
    dashboard.install(api)
    return api


def serve(app: App, *, host: str = "127.0.0.1", port: int = 8000, public_metrics: bool | None = None) -> None:
    """Serve the API of ``app`` until SIGINT or SIGTERM (in-flight requests finish first)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_api(app, public_metrics=public_metrics), host=host, port=port,
                                           log_level="info"))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # SIGTERM is how the API is meant to stop. uvicorn shuts down gracefully, then raises the signal
    # again for the handler that was there before it: this one, which makes it a normal exit (status
    # 0, as for every other broker-q process) instead of death by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
