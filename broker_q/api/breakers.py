"""``/v1/breakers``: the circuit breakers of downstream services, shared by every tenant's tasks
(``broker-q breakers``). Reading needs ``read``; opening or closing one by hand needs ``schedules``,
as on the command line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import StringConstraints

from broker_q.access import Permission
from broker_q.api.auth import CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import BreakerEventView, BreakerView, ForceRequest
from broker_q.breakers import Breakers, breaker_view, event_view

__all__ = ["router"]

router = APIRouter(prefix="/v1/breakers", tags=["breakers"])

SERVICE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"
Service = Annotated[str, Path(pattern=SERVICE_PATTERN)]
ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_PATTERN)]


def _breakers(caller: CallerDep) -> Breakers:
    app = caller.context.app
    return Breakers(app.store, app.breaker_policies, cache_ttl=0)


@router.get("", response_model=list[BreakerView], responses=errors(401, 403, 422, 503),
            summary="Circuit breakers")
def list_breakers(
    caller: CallerDep,
    service: Annotated[list[ServiceName] | None, Query(description="Only these services' breakers (repeatable); "
                                                                "shown even if they never changed.")] = None,
) -> list[BreakerView]:
    """Every breaker that recorded something (found by reading the whole log), or those of ``service``."""
    caller.authorize(Permission.READ, None, "list breakers")
    breakers, now = _breakers(caller), datetime.now(UTC)
    return [BreakerView.model_validate(breaker_view(state, breakers.policy(state.service), now))
            for state in breakers.states(service)]


@router.get("/{service}/timeline", response_model=list[BreakerEventView], responses=errors(401, 403, 422, 503),
            summary="A breaker's events")
def timeline(service: Service, caller: CallerDep) -> list[BreakerEventView]:
    caller.authorize(Permission.READ, None, f"read the breaker of {service}")
    return [BreakerEventView.model_validate(event_view(e)) for e in _breakers(caller).timeline(service)]


@router.post("/{service}/open", response_model=BreakerView, responses=errors(400, 401, 403, 409, 422, 503),
             summary="Open a breaker until it is closed by hand")
def force_open(service: Service, body: ForceRequest, caller: CallerDep) -> BreakerView:
    return _force(caller, service, True, body.reason)


@router.post("/{service}/close", response_model=BreakerView, responses=errors(400, 401, 403, 409, 422, 503),
             summary="Close a breaker now")
def force_close(service: Service, body: ForceRequest, caller: CallerDep) -> BreakerView:
    return _force(caller, service, False, body.reason)


def _force(caller: CallerDep, service: str, open: bool, reason: str) -> BreakerView:
    caller.authorize(Permission.SCHEDULES, None, f"{'open' if open else 'close'} the breaker of {service}")
    breakers = _breakers(caller)
    breakers.force(service, open, reason, caller.actor)
    return BreakerView.model_validate(breaker_view(breakers.state(service), breakers.policy(service),
                                                   datetime.now(UTC)))
