"""``/v1/activity``: what happened lately, for the dashboard's overview and lists.

Counted in the views (the audit view's index on type and time, the tasks view's rows), so every
number survives restarts and traces back to the events behind it:

- ``/v1/activity``: submissions and attempt outcomes per time slot over the last minutes, and the
  workers that recorded an event in that time;
- ``/v1/activity/tasks``: the tasks submitted (or replayed, dead-lettered, cancelled) most recently,
  with their state now;
- ``/v1/activity/workflows``: the workflows submitted most recently.

All need ``read``; a principal bound to a tenant sees its own tenant's only.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from broker_q.access import Permission
from broker_q.api.auth import CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import QUEUE_PATTERN, AuditRecord, TaskRow
from broker_q.api.params import Limit, Tenant
from projections.queries import activity, recent, tasks_by_id

__all__ = ["ActivitySlot", "ActivityView", "RecentTask", "RecentTasks", "RecentWorkflows", "WorkerSeen", "router"]

router = APIRouter(prefix="/v1/activity", tags=["activity"])

_SCAN_PAGES = 20
"""Pages of submissions read at most for one page of one queue's recent tasks: a queue that had few
of the latest submissions answers a short page (with ``next``) rather than a long scan."""

Cursor = Annotated[str | None, Query(max_length=200, pattern=r"^[0-9.e+\-]+/[0-9]+$",
                                     description="The `next` of the previous page.")]


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class ActivitySlot(_Response):
    start: datetime
    submitted: int
    succeeded: int
    retry_scheduled: int = Field(description="Attempts that failed and will be tried again (timeouts included).")
    dead_lettered: int = Field(description="Attempts that failed for good.")


class WorkerSeen(_Response):
    worker: str
    last_seen: datetime
    events: int = Field(description="Starts and outcomes it recorded in the time asked.")


class ActivityView(_Response):
    since: datetime
    slot_seconds: int
    slots: list[ActivitySlot] = Field(description="Oldest first; the last one is still filling.")
    workers: list[WorkerSeen] = Field(description="Workers that recorded a start or an outcome since `since`, "
                                                  "most recently seen first (at most 100).")


class RecentTask(TaskRow):
    event: AuditRecord = Field(description="The event asked for: when, by whom, and what it said.")


class RecentTasks(_Response):
    items: list[RecentTask] = Field(description="Newest event first, each task as the tasks view holds it now.")
    next: str | None = Field(description="Pass as `before` for older ones; null when there are none.")


class RecentWorkflows(_Response):
    items: list[AuditRecord] = Field(description="Each workflow's `workflow_submitted` record (its id is the "
                                                 "stream_id), newest first.")
    next: str | None = Field(description="Pass as `before` for older ones; null when there are none.")


@router.get("", response_model=ActivityView, responses=errors(401, 403, 422, 503),
            summary="Throughput, failures and workers over the last minutes")
def get_activity(
    caller: CallerDep,
    tenant: Tenant = None,
    minutes: Annotated[int, Query(ge=1, le=24 * 60, description="How far back.")] = 15,
    slot_seconds: Annotated[int, Query(ge=1, le=3600, description="The width of a slot.")] = 60,
) -> ActivityView:
    """Submissions, successes and failures per slot (slots end now, aligned on their width), and the
    workers seen in that time, from the audit view (as fresh as the projections)."""
    scope = caller.authorize(Permission.READ, tenant, "read the activity")
    slots = max(1, -(-minutes * 60 // slot_seconds))
    now = time.time()
    since = (now // slot_seconds + 1 - slots) * slot_seconds
    found = activity(caller.context.views, since=since, slot_seconds=slot_seconds, slots=slots, tenant=scope)
    return ActivityView.model_validate({
        "since": datetime.fromtimestamp(since, UTC), "slot_seconds": slot_seconds, "workers": found.workers,
        "slots": [{**slot, "start": datetime.fromtimestamp(slot["start"], UTC)} for slot in found.slots],
    })


@router.get("/tasks", response_model=RecentTasks, responses=errors(401, 403, 422, 503),
            summary="The tasks submitted (or replayed...) most recently")
def recent_tasks(
    caller: CallerDep,
    tenant: Tenant = None,
    event: Annotated[Literal["submitted", "replayed", "dead_lettered", "cancelled"],
                     Query(description="Which event: the tasks that recorded it most recently.")] = "submitted",
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN, description="Only this queue's.")] = None,
    before: Cursor = None,
    limit: Limit = 50,
) -> RecentTasks:
    """Newest first, each with its state now (from the tasks view) and the event itself (who replayed
    a dead letter and why, say). With ``queue``, a page may hold fewer than ``limit`` tasks while
    ``next`` says older ones remain."""
    scope = caller.authorize(Permission.READ, tenant, "list recent tasks")
    views = caller.context.views
    items: list[dict[str, Any]] = []
    cursor = before
    for _ in range(_SCAN_PAGES):
        records, following = recent(views, type=event, tenant=scope, limit=limit, before=cursor)
        rows = tasks_by_id(views, [str(record["task_id"]) for record in records])
        for record in records:
            row = rows.get(str(record["task_id"]))
            if row is not None and (queue is None or row["queue"] == queue):
                items.append({**row, "event": record})
                if len(items) == limit:  # the page ends here, even within the records read
                    following = record["cursor"] if record is not records[-1] or following else None
                    break
        cursor = following
        if len(items) == limit or cursor is None:
            break
    shown = [caller.payloads(item, str(item["tenant"]), uuid.UUID(str(item["id"]))) for item in items]
    return RecentTasks.model_validate({"items": shown, "next": cursor})


@router.get("/workflows", response_model=RecentWorkflows, responses=errors(401, 403, 422, 503),
            summary="The workflows submitted most recently")
def recent_workflows(caller: CallerDep, tenant: Tenant = None, before: Cursor = None,
                     limit: Limit = 50) -> RecentWorkflows:
    scope = caller.authorize(Permission.READ, tenant, "list recent workflows")
    records, following = recent(caller.context.views, type="workflow_submitted", tenant=scope, limit=limit,
                                before=before)
    return RecentWorkflows.model_validate({"items": records, "next": following})
