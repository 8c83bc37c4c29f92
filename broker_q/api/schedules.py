"""``/v1/schedules``: cron schedules of a tenant: list, define, pause, resume, remove, next fires.

A schedule is named within its tenant. Reading needs ``read``; every change needs ``schedules``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from broker_q.access import Permission
from broker_q.api.auth import Caller, CallerDep
from broker_q.api.errors import NotFound, errors
from broker_q.api.models import (
    SCHEDULE_NAME_PATTERN,
    NextFires,
    ReasonRequest,
    ScheduleRequest,
    ScheduleView,
)
from broker_q.api.params import Tenant
from broker_q.domain import schedule
from broker_q.domain.schedule import ScheduleState
from broker_q.errors import DomainError
from broker_q.schedules import Schedules, schedule_view

__all__ = ["router"]

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

Name = Annotated[str, Path(pattern=SCHEDULE_NAME_PATTERN)]


def _schedules(caller: Caller, permission: Permission, tenant: str | None, action: str) -> Schedules:
    scope = caller.tenant_for(permission, tenant, action)
    return Schedules(caller.context.app.store, tenant=scope, actor=caller.actor)


def _existing(schedules: Schedules, name: str) -> ScheduleState:
    try:
        return schedules.get(name)
    except DomainError as e:  # it never existed: the only refusal of get()
        raise NotFound(str(e)) from None


def _view(caller: Caller, state: ScheduleState) -> ScheduleView:
    row = schedule_view(state, schedule.due(state, datetime.now(UTC)).next_fire)
    return ScheduleView.model_validate(caller.payloads(row, state.tenant, None))


@router.get("", response_model=list[ScheduleView], responses=errors(401, 403, 422, 503), summary="A tenant's schedules")
def list_schedules(
    caller: CallerDep,
    tenant: Tenant = None,
    removed: Annotated[bool, Query(description="Removed schedules too.")] = False,
) -> list[ScheduleView]:
    """Every schedule of the tenant, by name, with its next fire."""
    schedules = _schedules(caller, Permission.READ, tenant, "list schedules")
    return [_view(caller, state) for state in schedules.list(removed=removed)]


@router.post("", response_model=ScheduleView, responses=errors(400, 401, 403, 409, 422, 503),
             summary="Create or change a schedule")
def define(body: ScheduleRequest, caller: CallerDep) -> ScheduleView:
    """Create the schedule, or change it to this definition; the same definition again changes nothing."""
    scope = caller.tenant_for(Permission.SCHEDULES, body.tenant, f"define schedule {body.name}")
    state = caller.context.app.schedule(
        body.name, cron=body.cron, task=body.task, args=body.args, kwargs=body.kwargs, queue=body.queue,
        priority=body.priority, timezone=body.timezone, catchup=body.catchup.value, tenant=scope, actor=caller.actor)
    return _view(caller, state)


@router.get("/{name}", response_model=ScheduleView, responses=errors(401, 403, 404, 422, 503), summary="One schedule")
def get_schedule(name: Name, caller: CallerDep, tenant: Tenant = None) -> ScheduleView:
    schedules = _schedules(caller, Permission.READ, tenant, f"read schedule {name}")
    return _view(caller, _existing(schedules, name))


@router.get("/{name}/next", response_model=NextFires, responses=errors(401, 403, 404, 422, 503),
            summary="A schedule's next fire times")
def next_fires(
    name: Name,
    caller: CallerDep,
    tenant: Tenant = None,
    count: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> NextFires:
    """The next ``count`` ticks (UTC), whether or not the schedule is paused."""
    schedules = _schedules(caller, Permission.READ, tenant, f"read schedule {name}")
    state = _existing(schedules, name)
    return NextFires(name=state.name, tenant=state.tenant, next=schedules.next(name, count))


@router.post("/{name}/pause", response_model=ScheduleView, responses=errors(400, 401, 403, 404, 409, 422, 503),
             summary="Pause a schedule")
def pause(name: Name, body: ReasonRequest, caller: CallerDep, tenant: Tenant = None) -> ScheduleView:
    """Stop the schedule from firing until it is resumed. 409 if it is not active."""
    schedules = _schedules(caller, Permission.SCHEDULES, tenant, f"pause schedule {name}")
    _existing(schedules, name)
    return _view(caller, schedules.pause(name, reason=body.reason))


@router.post("/{name}/resume", response_model=ScheduleView, responses=errors(400, 401, 403, 404, 409, 422, 503),
             summary="Resume a schedule")
def resume(name: Name, body: ReasonRequest, caller: CallerDep, tenant: Tenant = None) -> ScheduleView:
    """Let the schedule fire again; its ``catchup`` decides what happens to the ticks it missed. 409 if
    it is not paused."""
    schedules = _schedules(caller, Permission.SCHEDULES, tenant, f"resume schedule {name}")
    _existing(schedules, name)
    return _view(caller, schedules.resume(name, reason=body.reason))


@router.delete("/{name}", response_model=ScheduleView, responses=errors(401, 403, 404, 409, 422, 503),
               summary="Remove a schedule")
def remove(
    name: Name,
    caller: CallerDep,
    tenant: Tenant = None,
    reason: Annotated[str, Query(max_length=1000, description="Why (kept in the schedule's history).")] = "",
) -> ScheduleView:
    """Stop the schedule for good (one of the same name may be created later). 409 if removed already."""
    schedules = _schedules(caller, Permission.SCHEDULES, tenant, f"remove schedule {name}")
    _existing(schedules, name)
    return _view(caller, schedules.remove(name, reason=reason))
