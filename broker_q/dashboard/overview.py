"""The overview: per tenant and queue, tasks in each state and the oldest waiting one; throughput
and failure rate over the last minutes; the workers seen lately; how far the views lag behind."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.api import activity, health, queues
from broker_q.api.params import Tenant
from broker_q.dashboard.charts import SERIES, throughput_chart
from broker_q.dashboard.web import PREFIX, PageRoute, SignedIn, page, redirect

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

MINUTES = 15
"""How far back the overview's chart goes (a bar a minute)."""
LIVE_MS = 3000
"""How often the live parts of a page are fetched again."""
STATES = ("blocked", "ready", "started", "retry_scheduled", "deferred", "succeeded", "dead_lettered", "cancelled")


@router.get("", include_in_schema=False)
def to_overview() -> Response:
    return redirect(f"{PREFIX}/")


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, caller: SignedIn, tenant: Tenant = None) -> Response:
    summaries = queues.list_queues(caller, tenant=tenant)
    seen = activity.get_activity(caller, tenant=tenant, minutes=MINUTES, slot_seconds=60)
    tenants = sorted({s.tenant for s in summaries})
    per_tenant = {}
    if tenant is None and len(tenants) > 1:
        for name in tenants[:20]:
            chart = throughput_chart(activity.get_activity(caller, tenant=name, minutes=MINUTES, slot_seconds=60).slots)
            per_tenant[name] = chart
    return page(request, "overview.html", caller, title="Overview", live=LIVE_MS, tenant=tenant, tenants=tenants,
                queues=summaries, states=STATES, activity=seen, chart=throughput_chart(seen.slots), series=SERIES,
                per_tenant=per_tenant, views=health.views(caller), minutes=MINUTES)
