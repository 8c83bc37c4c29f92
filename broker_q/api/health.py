"""``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/views``: for the orchestrator, Prometheus and operators.

``/healthz`` says the process answers; ``/readyz`` that the event store and RabbitMQ answer too
(503, naming which does not). Neither needs a token: they reveal nothing but that. ``/metrics``
serves the projection metrics (:mod:`projections.metrics`) to principals with ``read``: a principal
bound to a tenant gets that tenant's series only. With ``public_metrics`` (``broker-q api
--public-metrics``, or ``BROKER_Q_API_PUBLIC_METRICS=1``) it needs no token, for a Prometheus that
scrapes without one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from broker_q.access import Permission
from broker_q.amqp.connection import connect
from broker_q.api.auth import Caller, CallerDep, authenticated, bearer
from broker_q.api.context import Context
from broker_q.api.errors import errors
from broker_q.api.models import Check, Health, Readiness, ViewState
from broker_q.errors import BrokerQError

__all__ = ["CHECK_TIMEOUT", "router"]

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0
"""Seconds each readiness check may take before it counts as failed."""


@router.get("/healthz", response_model=Health, summary="The process answers")
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, summary="The event store and RabbitMQ answer",
            responses={503: {"model": Readiness, "description": "The store or the broker does not answer"}})
async def readyz(request: Request) -> Any:
    context: Context = request.app.state.context
    store, broker = await asyncio.gather(_check_store(context), _check_broker(context))
    ready = store is None and broker is None
    body = Readiness(status="ready" if ready else "unavailable",
                     checks={"store": Check(ok=store is None, error=store),
                             "broker": Check(ok=broker is None, error=broker)})
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def _check_store(context: Context) -> str | None:
    """``None`` if the store answers a read, else why not."""
    def read() -> None:
        context.app.store.max_position()

    try:
        await asyncio.wait_for(asyncio.to_thread(read), CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g}s"
    except BrokerQError as e:
        return str(e)
    except Exception as e:  # a driver's error that no adapter translated: not ready all the same
        log.warning("the store check failed", exc_info=e)
        return f"{type(e).__name__}: {e}"
    return None


async def _check_broker(context: Context) -> str | None:
    """``None`` if RabbitMQ takes a connection, else why not."""
    try:
        connection = await connect(context.app.settings.amqp_url, timeout=CHECK_TIMEOUT, name="broker_q-api-readyz")
    except BrokerQError as e:
        return str(e)
    await connection.close()
    return None


def _metrics_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller | None:
    """The caller of ``/metrics``: none needed when the metrics are public."""
    context: Context = request.app.state.context
    return None if context.public_metrics else authenticated(request, credentials)


@router.get("/metrics", summary="Prometheus metrics of the views",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "The text exposition format"},
                       **errors(401, 403, 503)})
def metrics(request: Request, caller: Annotated[Caller | None, Depends(_metrics_caller)]) -> Response:
    context: Context = request.app.state.context
    registry = context.metrics()
    if caller is not None:
        tenant = caller.authorize(Permission.READ, None, "read metrics")
        if tenant is not None:
            registry = _of_tenant(registry, tenant)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/views", response_model=list[ViewState], responses=errors(401, 403, 503),
            summary="Each view's position and lag")
def views(caller: CallerDep) -> list[ViewState]:
    """Each view's position in the event log, how far it is behind (events and seconds), and its
    last update (``broker-q projections status``)."""
    caller.authorize(Permission.READ, None, "read the views' status")
    return [ViewState.model_validate(asdict(view)) for view in caller.context.view_status()]


class _TenantSeries(Collector):
    """The series of one tenant (and those of no tenant: the projections' positions and lags)."""

    def __init__(self, registry: CollectorRegistry, tenant: str) -> None:
        self._registry = registry
        self._tenant = tenant

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if s.labels.get("tenant", self._tenant) == self._tenant]
            yield kept


def _of_tenant(registry: CollectorRegistry, tenant: str) -> CollectorRegistry:
    filtered = CollectorRegistry(auto_describe=False)
    filtered.register(_TenantSeries(registry, tenant))
    return filtered
