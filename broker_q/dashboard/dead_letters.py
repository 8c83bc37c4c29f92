"""Dead letters: grouped by exception type, replayed one at a time or a selection at once (with a
reason), and the latest replays afterwards: who sent what back, why, and what became of it."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.api import activity, queues
from broker_q.api.models import DeadLetterReplay
from broker_q.api.params import Tenant
from broker_q.dashboard.overview import LIVE_MS
from broker_q.dashboard.web import PREFIX, FormDep, PageRoute, SignedIn, field, page, redirect
from broker_q.errors import DomainError, TaskNotFound, ValidationError

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

PAGE = 200
MAX_SELECTION = 500
"""Dead letters replayed by one form at most."""


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letter_list(
    request: Request,
    caller: SignedIn,
    tenant: Tenant = None,
    task: Annotated[str | None, Query(max_length=200)] = None,
    after: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    found = queues.list_dead_letters(caller, tenant=tenant, task=task or None, since=None, after=after, limit=PAGE)
    groups: dict[str, list[Any]] = {}
    for item in found.items:
        groups.setdefault(item.error_type or "(no error)", []).append(item)
    ordered = sorted(groups.items(), key=lambda group: (-len(group[1]), group[0]))
    return page(request, "dead_letters.html", caller, title="Dead letters", tenant=tenant, task=task, groups=ordered,
                next=found.next, total=len(found.items))


@router.post("/dead-letters/replay")
def replay_selection(caller: SignedIn, fields: FormDep) -> Response:
    """Replay each task chosen (``task`` fields of ``id:version``), each at the version it was seen
    at: one replayed by someone else meanwhile is left alone and counted as refused."""
    chosen = fields.get("task", [])[:MAX_SELECTION]
    if not chosen:
        raise ValidationError("choose at least one dead letter to replay")
    reason = field(fields, "reason")
    DeadLetterReplay(reason=reason)  # a reason left empty refuses them all, before any is replayed
    replayed = refused = 0
    for value in chosen:
        task_id, _, version = value.partition(":")
        try:
            body = DeadLetterReplay(reason=reason, version=int(version) if version.isdigit() else None)
            queues.replay_dead_letter(uuid.UUID(task_id), body, caller)
            replayed += 1
        except ValueError:  # not a task id: a forged or broken form
            refused += 1
        except (DomainError, TaskNotFound):  # replayed or changed since it was shown: the others go on
            refused += 1
    return redirect(f"{PREFIX}/dead-letters/replays?replayed={replayed}&refused={refused}")


@router.get("/dead-letters/replays", response_class=HTMLResponse)
def replays(
    request: Request,
    caller: SignedIn,
    tenant: Tenant = None,
    replayed: Annotated[int | None, Query(ge=0)] = None,
    refused: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    found = activity.recent_tasks(caller, tenant=tenant, event="replayed", queue=None, before=None, limit=50)
    return page(request, "replays.html", caller, title="Replays", live=LIVE_MS, found=found, replayed=replayed,
                refused=refused)
