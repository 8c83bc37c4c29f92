"""``/v1/queues`` and ``/v1/dead-letters``: the tasks view, and dead letters sent to run again.

Lists come from the tasks view, so they are as fresh as the projections that keep it (``broker-q
projections run``); pages are keyset-paginated (``next`` is the ``after`` of the following page).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from broker_q.access import Permission
from broker_q.api.auth import Caller, CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import QUEUE_PATTERN, DeadLetterReplay, QueueSummary, TaskPage, TaskView
from broker_q.api.params import Limit, Tenant, Time, aware
from broker_q.api.tasks import task_view, visible_task
from broker_q.domain.task import TaskStatus
from projections.queries import Page, dead_letters, queues, tasks

__all__ = ["router"]

router = APIRouter(tags=["queues"])

Cursor = Annotated[str | None, Query(max_length=200, description="The `next` of the previous page.")]


def _page(caller: Caller, page: Page) -> TaskPage:
    items = [caller.payloads(item, item["tenant"], uuid.UUID(item["id"])) for item in page.items]
    return TaskPage.model_validate({"items": items, "next": page.next})


@router.get("/v1/queues", response_model=list[QueueSummary], responses=errors(401, 403, 422, 503),
            summary="Tasks per state and queue")
def list_queues(caller: CallerDep, tenant: Tenant = None) -> list[QueueSummary]:
    """Per tenant and queue: how many tasks are in each state, and how long the oldest ready one has waited."""
    scope = caller.authorize(Permission.READ, tenant, "list queues")
    found = queues(caller.context.views, tenant=scope)
    return [QueueSummary.model_validate(summary, from_attributes=True) for summary in found]


@router.get("/v1/queues/{queue}/tasks", response_model=TaskPage, responses=errors(401, 403, 422, 503),
            summary="A queue's tasks in one state")
def queue_tasks(
    queue: Annotated[str, Path(pattern=QUEUE_PATTERN)],
    caller: CallerDep,
    state: TaskStatus = TaskStatus.READY,
    tenant: Tenant = None,
    after: Cursor = None,
    limit: Limit = 50,
) -> TaskPage:
    """The tasks of ``queue`` in ``state``, oldest first (by the time they became ready)."""
    scope = caller.authorize(Permission.READ, tenant, f"list the tasks of queue {queue}")
    return _page(caller, tasks(caller.context.views, queue=queue, state=state.value, tenant=scope,
                               limit=limit, after=after))


@router.get("/v1/dead-letters", response_model=TaskPage, responses=errors(401, 403, 422, 503), summary="Dead letters")
def list_dead_letters(
    caller: CallerDep,
    tenant: Tenant = None,
    task: Annotated[str | None, Query(max_length=200, description="Only dead letters of this task name.")] = None,
    since: Time = None,
    after: Cursor = None,
    limit: Limit = 50,
) -> TaskPage:
    """Tasks that will not run again by themselves, most recent first."""
    scope = caller.authorize(Permission.READ, tenant, "list dead letters")
    return _page(caller, dead_letters(caller.context.views, tenant=scope, task=task, since=aware(since),
                                      limit=limit, after=after))


@router.post("/v1/dead-letters/{task_id}/replay", response_model=TaskView,
             responses=errors(400, 401, 403, 404, 409, 422, 503),
             summary="Run a dead letter again")
def replay_dead_letter(task_id: uuid.UUID, body: DeadLetterReplay, caller: CallerDep) -> TaskView:
    """Send the dead letter to run again, recording who, why and what changed (new ``args`` or
    ``kwargs`` replace its own). 409 if the task is not a dead letter, or changed since ``version``."""
    visible_task(caller, task_id, Permission.REPLAY, "replay")
    state = caller.context.app.replay_dead_letter(task_id, reason=body.reason, actor=caller.actor, args=body.args,
                                                  kwargs=body.kwargs, version=body.version)
    return task_view(caller, state)

