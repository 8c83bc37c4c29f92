"""Workflows: the latest submitted, and one workflow's DAG with each step's state and what blocks it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.api import activity, workflows
from broker_q.api.models import CancelRequest
from broker_q.api.params import Tenant
from broker_q.dashboard.graph import layout
from broker_q.dashboard.overview import LIVE_MS
from broker_q.dashboard.web import PREFIX, FormDep, PageRoute, SignedIn, field, page, redirect
from broker_q.errors import ValidationError

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)


@router.get("/workflows", response_class=HTMLResponse)
def workflow_list(
    request: Request,
    caller: SignedIn,
    tenant: Tenant = None,
    id: Annotated[str | None, Query(max_length=100)] = None,
    before: Annotated[str | None, Query(max_length=200, pattern=r"^[0-9.e+\-]+/[0-9]+$")] = None,
) -> Response:
    if id:  # the "open by id" form
        try:
            return redirect(f"{PREFIX}/workflows/{uuid.UUID(id.strip())}")
        except ValueError:
            raise ValidationError(f"{id!r} is not a workflow id") from None
    found = activity.recent_workflows(caller, tenant=tenant, before=before, limit=50)
    return page(request, "workflows.html", caller, title="Workflows", found=found, tenant=tenant)


@router.get("/workflows/{workflow_id}", response_class=HTMLResponse)
def workflow_page(request: Request, workflow_id: uuid.UUID, caller: SignedIn) -> Response:
    status = workflows.get_workflow(workflow_id, caller)
    return page(request, "workflow.html", caller, title="Workflow", live=LIVE_MS, workflow=status,
                graph=layout(status.steps), done=request.query_params.get("done"))


@router.post("/workflows/{workflow_id}/cancel")
def cancel(workflow_id: uuid.UUID, caller: SignedIn, fields: FormDep) -> Response:
    reason = field(fields, "reason") or "cancelled from the dashboard"
    workflows.cancel_workflow(workflow_id, CancelRequest(reason=reason), caller)
    return redirect(f"{PREFIX}/workflows/{workflow_id}?done=cancelled")
