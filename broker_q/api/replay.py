"""``/v1/events`` and ``/v1/state``: answers replayed from the events themselves, never from a view
(:mod:`projections.replay`). Both need ``read``; a principal bound to a tenant sees its own events only.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from broker_q.access import Permission
from broker_q.api.auth import CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import QUEUE_PATTERN, EventPage, StateAsOf
from broker_q.api.params import MAX_POSITION, Limit, Tenant, Time, aware
from broker_q.api.tasks import not_found, task_view
from broker_q.errors import ValidationError
from projections.cli import event_json
from projections.replay import events, queue_counts_at, task_state_at

__all__ = ["router"]

router = APIRouter(tags=["replay"])

_NEVER_SHOWN = ("secret_sha256",)
"""Fields of events that the API never shows: a token's hash is of no use to anyone reading events
(it cannot be turned back into the token, but it has no business leaving the store either)."""
Position = Annotated[int | None, Query(ge=0, le=MAX_POSITION, description="A log position.")]


@router.get("/v1/events", response_model=EventPage, responses=errors(401, 403, 422, 503),
            summary="Recorded events, filtered")
def list_events(
    caller: CallerDep,
    from_position: Annotated[int | None, Query(ge=0, le=MAX_POSITION,
                                               description="First log position (inclusive).")] = None,
    to_position: Annotated[int | None, Query(ge=0, le=MAX_POSITION,
                                             description="Last log position (inclusive).")] = None,
    since: Time = None,
    until: Time = None,
    type: Annotated[list[str] | None, Query(description="Only these event types (repeatable).")] = None,
    task: Annotated[uuid.UUID | None, Query(description="Only this task's events.")] = None,
    tenant: Tenant = None,
    limit: Limit = 100,
) -> EventPage:
    """Events in log order with their positions (``broker-q events``). The log is scanned from
    ``from_position``: a filter that matches little reads much of it."""
    scope = caller.authorize(Permission.READ, tenant, "read events")
    found = list(events(caller.context.app.store, from_position=from_position, to_position=to_position,
                        since=aware(since), until=aware(until), types=type, task=task, tenant=scope, limit=limit))
    items = []
    for recorded in found:
        row = event_json(recorded)
        for name in _NEVER_SHOWN:
            row["details"].pop(name, None)
        row["details"], row["payloads_hidden"] = caller.event_details(row["details"], recorded.event.tenant,
                                                                      recorded.event.stream_id)
        items.append(row)
    return EventPage.model_validate({"items": items, "next": found[-1].position + 1 if len(found) == limit else None})


@router.get("/v1/state", response_model=StateAsOf, responses=errors(401, 403, 404, 422, 503),
            summary="A task's state, or the counts per queue, as of a time or a position")
def state_as_of(
    caller: CallerDep,
    at: Time = None,
    position: Position = None,
    task: Annotated[uuid.UUID | None, Query(description="One task's state instead of the counts.")] = None,
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN, description="Count only this queue's tasks.")] = None,
    tenant: Tenant = None,
) -> StateAsOf:
    """Exactly one of ``at`` and ``position``. Replayed from the log (``broker-q state``): the counts
    read the log up to that moment."""
    moment = {"time": aware(at), "position": position}
    store = caller.context.app.store
    if task is not None:
        if queue is not None or tenant is not None:
            raise ValidationError("queue and tenant filter the counts: they do not apply with task")
        with not_found(f"no task with id {task}"):
            now = caller.context.app.get_task(task)
        caller.authorize_record(Permission.READ, now.tenant, f"read the past states of task {task}",
                                f"no task with id {task}")
        then = task_state_at(store, task, at=aware(at), position=position)
        return StateAsOf.model_validate({"as_of": moment, "task": None if then is None else task_view(caller, then)})
    scope = caller.authorize(Permission.READ, tenant, "count tasks as of a moment")
    counts = queue_counts_at(store, at=aware(at), position=position, queue=queue, tenant=scope)
    rows = [{"tenant": t, "queue": q, "counts": per_status, "total": sum(per_status.values())}
            for (t, q), per_status in counts.items()]
    return StateAsOf.model_validate({"as_of": moment, "queues": rows})
