"""``/v1/tasks``: submit a task, read its state and its history, cancel it.

States are replayed from the task's own stream, never from a view: what these endpoints answer is
what the write side decided, as of the request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Response, status

from broker_q.access import Permission
from broker_q.api.auth import Caller, CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import CancelRequest, TaskSubmission, TaskView, Timeline
from broker_q.domain.task import TaskState
from broker_q.errors import DomainError, TaskNotFound, ValidationError
from broker_q.rendering import status_view
from projections.cli import timeline_json
from projections.replay import timeline

__all__ = ["not_found", "router", "task_view", "visible_task"]

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])


def task_view(caller: Caller, state: TaskState) -> TaskView:
    """A task's state as ``caller`` may see it."""
    return TaskView.model_validate(caller.payloads(status_view(state), state.tenant, state.task_id))


def visible_task(caller: Caller, task_id: uuid.UUID, permission: Permission, action: str) -> TaskState:
    """The task's current state, once ``caller`` is allowed ``permission`` on its tenant (404 for a
    task of a tenant the caller cannot see, as for one that does not exist)."""
    with not_found(f"no task with id {task_id}"):
        state = caller.context.app.get_task(task_id)
    caller.authorize_record(permission, state.tenant, f"{action} task {task_id}", f"no task with id {task_id}")
    return state


@contextmanager
def not_found(message: str) -> Iterator[None]:
    """Any :class:`TaskNotFound` raised within says ``message`` and nothing else. The store's own
    message may say what the id names instead (a schedule, a workflow...), and ids derived from
    names (a schedule's, an idempotency key's) can be computed for another tenant: that must not
    tell whether that tenant has such a record."""
    try:
        yield
    except TaskNotFound:
        raise TaskNotFound(message) from None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TaskView,
             responses=errors(400, 401, 403, 409, 422, 429, 503),
             summary="Submit a task")
async def submit(body: TaskSubmission, caller: CallerDep, response: Response) -> TaskView:
    """Record a new task (the body is the AMQP task envelope, plus the queue). The same
    ``idempotency_key`` in the same tenant always names the same task: a resend answers that task."""
    app = caller.context.app
    tenant = await asyncio.to_thread(caller.tenant_for, Permission.SUBMIT, body.tenant, f"submit {body.task}")
    try:
        handle = await app.submit_async(
            body.task, body.args, body.kwargs, queue=body.queue, priority=body.priority,
            idempotency_key=body.idempotency_key, tenant=tenant, correlation_id=body.correlation_id,
            time_limit=body.time_limit, soft_time_limit=body.soft_time_limit, eta=body.eta, countdown=body.countdown,
            depends_on=body.depends_on, retry=None if body.retry is None else body.retry.override(), actor=caller.actor,
        )
    except DomainError as e:
        # At submit the domain refuses what was asked, never a state the task is in: bad input.
        raise ValidationError(str(e)) from e
    state = await asyncio.to_thread(app.get_task, handle.id)
    response.headers["Location"] = f"/v1/tasks/{handle.id}"
    return task_view(caller, state)


@router.get("/{task_id}", response_model=TaskView, responses=errors(401, 403, 404, 422, 503),
            summary="A task's current state")
def get_task(task_id: uuid.UUID, caller: CallerDep) -> TaskView:
    """The task's state as of now, replayed from its stream (authoritative, not a view)."""
    return task_view(caller, visible_task(caller, task_id, Permission.READ, "read"))


@router.get("/{task_id}/history", response_model=Timeline, responses=errors(401, 403, 404, 422, 503),
            summary="A task's events, with the time between them")
def history(task_id: uuid.UUID, caller: CallerDep) -> Timeline:
    """Every event of the task, with durations: waiting before the first start, each attempt's run
    time, the total (``broker-q replay ID --json``)."""
    with not_found(f"no task with id {task_id}"):
        told = timeline(caller.context.app.store, task_id)
    state = told.state
    caller.authorize_record(Permission.READ, state.tenant, f"read the history of task {task_id}",
                            f"no task with id {task_id}")
    found = timeline_json(told)
    hidden = not caller.sees_payloads(state.tenant)
    events = [{**row, "details": caller.event_details(row["details"], state.tenant, task_id)[0]}
              for row in found["events"]]
    return Timeline.model_validate({**found, "state": task_view(caller, state), "events": events,
                                    "payloads_hidden": hidden})


@router.post("/{task_id}/cancel", response_model=TaskView,
             responses=errors(400, 401, 403, 404, 409, 422, 503),
             summary="Cancel a task")
def cancel(task_id: uuid.UUID, body: CancelRequest, caller: CallerDep) -> TaskView:
    """The task never starts, or its running attempt is asked to stop. 409 if it is final already."""
    visible_task(caller, task_id, Permission.CANCEL, "cancel")
    return task_view(caller, caller.context.app.cancel(task_id, reason=body.reason, actor=caller.actor))
