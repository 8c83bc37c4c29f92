"""Tasks: the list (by queue and state, or the latest submitted), one task's page (arguments for
those who may read them, result or error with its traceback, the history as a timeline), and its
cancel and replay buttons."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.access import Permission
from broker_q.api import activity, queues, tasks, workflows
from broker_q.api.models import QUEUE_PATTERN, CancelRequest, DeadLetterReplay, TaskPage
from broker_q.api.params import Tenant
from broker_q.dashboard.overview import LIVE_MS, STATES
from broker_q.dashboard.web import PREFIX, FormDep, PageRoute, SignedIn, field, page, redirect
from broker_q.domain.task import TaskStatus
from broker_q.errors import TaskNotFound

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

PAGE = 50


@router.get("/tasks", response_class=HTMLResponse)
def task_list(
    request: Request,
    caller: SignedIn,
    tenant: Tenant = None,
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
    state: TaskStatus | None = None,
    after: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """With a queue and a state: that list, oldest first (the queue view's order). Otherwise the
    latest submitted tasks, newest first, each in its state now."""
    summaries = queues.list_queues(caller, tenant=tenant)
    names = sorted({s.queue for s in summaries} | ({queue} if queue else set()))
    counts: dict[str, int] = {}
    for summary in summaries:
        if queue is None or summary.queue == queue:
            for name, count in summary.counts.items():
                counts[name] = counts.get(name, 0) + count
    found: TaskPage | activity.RecentTasks
    if state is not None and queue is not None:
        found = queues.queue_tasks(queue, caller, state=state, tenant=tenant, after=after, limit=PAGE)
    else:
        found = activity.recent_tasks(caller, tenant=tenant, event="submitted", queue=queue, before=after, limit=PAGE)
    return page(request, "tasks.html", caller, title="Tasks", live=LIVE_MS, tenant=tenant, queue=queue,
                state=None if state is None else state.value, queues=names, states=STATES, counts=counts,
                tenants=sorted({s.tenant for s in summaries}), found=found, needs_queue=state is not None and not queue)


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task_page(request: Request, task_id: uuid.UUID, caller: SignedIn) -> Response:
    state = tasks.visible_task(caller, task_id, Permission.READ, "read")
    told = tasks.history(task_id, caller)
    try:
        workflow = workflows.get_workflow(state.correlation_id, caller)
    except TaskNotFound:  # the task is no workflow's step
        workflow = None
    parents = told.events[0].details.get("depends_on") or []
    return page(request, "task.html", caller, title=f"Task {told.state.task}", live=LIVE_MS, task=told.state,
                timeline=told, workflow=workflow, parents=parents, done=request.query_params.get("done"))


@router.post("/tasks/{task_id}/cancel")
def cancel(task_id: uuid.UUID, caller: SignedIn, fields: FormDep) -> Response:
    reason = field(fields, "reason") or "cancelled from the dashboard"
    tasks.cancel(task_id, CancelRequest(reason=reason), caller)
    return redirect(f"{PREFIX}/tasks/{task_id}?done=cancelled")


@router.post("/tasks/{task_id}/replay")
def replay(task_id: uuid.UUID, caller: SignedIn, fields: FormDep) -> Response:
    version = field(fields, "version")
    queues.replay_dead_letter(task_id, DeadLetterReplay(reason=field(fields, "reason"),
                                                        version=int(version) if version.isdigit() else None), caller)
    return redirect(f"{PREFIX}/tasks/{task_id}?done=replayed")
