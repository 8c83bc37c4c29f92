"""The past: the audit log searched and exported as JSON lines, and time travel (a queue's counts
and a task's state as they were at a moment), replayed from the events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from broker_q.api import audit, replay, tasks
from broker_q.api.models import QUEUE_PATTERN
from broker_q.api.params import MAX_POSITION, Tenant
from broker_q.dashboard.web import PREFIX, PageRoute, SignedIn, page
from broker_q.domain.events import TOPICS
from broker_q.errors import ValidationError

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

AUDIT_PAGE = 100
EVENT_TYPES = tuple(dict.fromkeys(kind.TYPE for kind in TOPICS.values()))
"""The types offered in the audit page's filter: every event's."""
Text = Annotated[str | None, Query(max_length=500)]
Moment = Annotated[str | None, Query(max_length=40, description="ISO 8601, or a datetime-local field's value")]


def _time(text: str | None, name: str) -> datetime | None:
    """A time from a form: ``datetime-local`` gives no offset, and the page says it means UTC."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(f"{name}: {text!r} is not a date and time") from None


def _task_id(text: str | None) -> uuid.UUID | None:
    if not text:
        return None
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise ValidationError(f"task: {text!r} is not a task id") from None


def _position(text: str | None) -> int | None:
    if not text:
        return None
    if not text.strip().isdigit() or int(text) > MAX_POSITION:
        raise ValidationError(f"position: {text!r} is not a log position")
    return int(text)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, caller: SignedIn, tenant: Tenant = None, actor: Text = None, task: Text = None,
               type: Text = None, since: Moment = None, until: Moment = None,
               after: Annotated[int | None, Query(ge=0, le=MAX_POSITION)] = None) -> Response:
    found = audit.audit_log(caller, tenant=tenant, actor=actor or None, task=_task_id(task),
                            type=[type] if type else None, since=_time(since, "since"), until=_time(until, "until"),
                            after=after, limit=AUDIT_PAGE, format="json")
    assert not isinstance(found, StreamingResponse)
    return page(request, "audit.html", caller, title="Audit", found=found, types=EVENT_TYPES,
                filters={"tenant": tenant, "actor": actor, "task": task, "type": type, "since": since, "until": until})


@router.get("/audit/export")
def audit_export(caller: SignedIn, tenant: Tenant = None, actor: Text = None, task: Text = None, type: Text = None,
                 since: Moment = None, until: Moment = None) -> Response:
    """Every record the filters match, as JSON lines (the API's export, with this session's token)."""
    found = audit.audit_log(caller, tenant=tenant, actor=actor or None, task=_task_id(task),
                            type=[type] if type else None, since=_time(since, "since"), until=_time(until, "until"),
                            after=None, limit=None, format="jsonl")
    assert isinstance(found, StreamingResponse)
    found.headers["Content-Disposition"] = 'attachment; filename="broker_q-audit.jsonl"'
    return found


@router.get("/time-travel", response_class=HTMLResponse)
def time_travel(
    request: Request,
    caller: SignedIn,
    at: Moment = None,
    position: Annotated[str | None, Query(max_length=20, description="A log position (empty: none)")] = None,
    queue: Annotated[str | None, Query(pattern=QUEUE_PATTERN)] = None,
    tenant: Tenant = None,
    task: Text = None,
) -> Response:
    """Counts per queue (or one task's state) then, beside the same now."""
    moment, then, now_state, counts = _time(at, "at"), None, None, None
    task_id, offset = _task_id(task), _position(position)
    if moment is not None or offset is not None:
        if task_id is not None:
            then = replay.state_as_of(caller, at=moment, position=offset, task=task_id, queue=None, tenant=None)
            now_state = tasks.get_task(task_id, caller)
        counts = replay.state_as_of(caller, at=moment, position=offset, task=None, queue=queue, tenant=tenant)
    return page(request, "time_travel.html", caller, title="Time travel", then=then, now_state=now_state,
                counts=counts, filters={"at": at, "position": position, "queue": queue, "tenant": tenant,
                                        "task": task})
