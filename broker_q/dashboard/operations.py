"""Schedules (their next fire times, paused and resumed) and circuit breakers (their states and
timelines, opened and closed by hand)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.api import breakers, schedules
from broker_q.api.breakers import Service
from broker_q.api.models import SCHEDULE_NAME_PATTERN, ForceRequest, ReasonRequest
from broker_q.api.params import Tenant
from broker_q.dashboard.overview import LIVE_MS
from broker_q.dashboard.web import PREFIX, FormDep, PageRoute, SignedIn, field, page, redirect, url

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

NEXT_FIRES = 5
Name = Annotated[str, Path(pattern=SCHEDULE_NAME_PATTERN)]


@router.get("/schedules", response_class=HTMLResponse)
def schedule_list(request: Request, caller: SignedIn, tenant: Tenant = None) -> Response:
    found = schedules.list_schedules(caller, tenant=tenant, removed=False)
    fires = {s.name: schedules.next_fires(s.name, caller, tenant=s.tenant, count=NEXT_FIRES).next for s in found}
    shown = tenant or caller.principal.tenant or caller.context.app.settings.tenant
    return page(request, "schedules.html", caller, title="Schedules", live=LIVE_MS * 5, schedules=found, fires=fires,
                tenant=shown, done=request.query_params.get("done"))


@router.post("/schedules/{name}/{action}")
def schedule_action(name: Name, action: Annotated[str, Path(pattern="^(pause|resume)$")], caller: SignedIn,
                    fields: FormDep, tenant: Tenant = None) -> Response:
    body = ReasonRequest(reason=field(fields, "reason"))
    change = schedules.pause if action == "pause" else schedules.resume
    change(name, body, caller, tenant=tenant)
    return redirect(url(f"{PREFIX}/schedules", tenant=tenant, done=f"{action}d"))


@router.get("/breakers", response_class=HTMLResponse)
def breaker_list(request: Request, caller: SignedIn) -> Response:
    found = breakers.list_breakers(caller, service=None)
    timelines = {b.service: breakers.timeline(b.service, caller)[-20:][::-1] for b in found}
    return page(request, "breakers.html", caller, title="Breakers", live=LIVE_MS, breakers=found, timelines=timelines,
                done=request.query_params.get("done"))


@router.post("/breakers/{service}/{action}")
def breaker_action(service: Service, action: Annotated[str, Path(pattern="^(open|close)$")], caller: SignedIn,
                   fields: FormDep) -> Response:
    body = ForceRequest(reason=field(fields, "reason"))
    (breakers.force_open if action == "open" else breakers.force_close)(service, body, caller)
    return redirect(f"{PREFIX}/breakers?done={'opened' if action == 'open' else 'closed'}")
