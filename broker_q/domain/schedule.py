"""Cron schedules: a schedule is a fold over its stream; firing is a pure decision on that state and a time.

A schedule lives in the stream :func:`schedule_id` names (``uuid5`` of its tenant and name), so every
process names the same stream without asking anyone. Its events say what it runs and when
(``schedule_created``, ``schedule_changed``), whether it fires (``schedule_paused``,
``schedule_resumed``, ``schedule_removed``), and every tick that fired (``schedule_fired``).
:func:`evolve` refuses any event the commands could not have produced.

Firing is decided here and written by the caller. :func:`due` says which ticks are due at ``now``;
:func:`fire` returns, for each, the ``schedule_fired`` event at the schedule's next version and the
``submitted`` event of its task, whose id is derived from the schedule and the tick
(:func:`fired_task_id`). The caller appends them in one transaction: two schedulers deciding the same
tick conflict in the store, on both streams, and one fire stands.

Ticks are croniter's, computed from a start in the schedule's timezone (a ``zoneinfo`` zone), so a
daylight-saving change does what croniter does with an aware start. In Europe/Paris, a daily
``30 2 * * *`` fires at 03:00 CEST on the day of the spring gap (02:30 does not exist that day) and
twice on the day of the autumn overlap (02:30 CEST, then 02:30 CET); an hourly ``0 * * * *`` skips
the hour that does not exist and fires twice at 02:00 in autumn. The unit tests pin the instants.

**Catchup.** A schedule owes the ticks after ``since`` (its last fire, or its creation or last change
if later) up to ``now``. A tick at most ``grace`` old is on time; an older one was missed, because no
scheduler ran or because the schedule was paused. ``catchup`` decides what is fired:

- ``skip``: only the ticks on time;
- ``once``: the latest tick owed, once, standing for all the missed ones;
- ``all``: every tick owed, oldest first, but at most :data:`MAX_CATCHUP` of them (the latest).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from broker_q.domain.breaker import SYSTEM_TENANT
from broker_q.domain.events import (
    ScheduleChanged,
    ScheduleCreated,
    ScheduleDefined,
    ScheduleEvent,
    ScheduleFired,
    ScheduleIndexed,
    SchedulePaused,
    ScheduleRemoved,
    ScheduleResumed,
    TaskSubmitted,
)
from broker_q.domain.task import submit, task_id_for
from broker_q.errors import DomainError, ValidationError

__all__ = [
    "DEFAULT_GRACE",
    "INDEX_ID",
    "MAX_CATCHUP",
    "Catchup",
    "Due",
    "ScheduleDefinition",
    "ScheduleState",
    "ScheduleStatus",
    "create_or_change",
    "define",
    "due",
    "evolve",
    "fire",
    "fire_key",
    "fired_task_id",
    "index_entry",
    "pause",
    "remove",
    "replay",
    "resume",
    "schedule_id",
    "upcoming",
]

MAX_CATCHUP = 1000
"""The most ticks one catch-up fires (``catchup="all"``): a schedule that missed more fires the latest
1,000 and forgets the older ones, so that a per-second schedule down for a day cannot flood its queue
with 86,400 tasks, nor one transaction with twice as many events."""
DEFAULT_GRACE = timedelta(seconds=10)
"""How late a tick may fire and still count as on time (schedulers wake a few milliseconds late)."""
INDEX_ID = uuid.uuid5(uuid.UUID("9d4c2b1e-7f3a-5c6d-8e9f-0a1b2c3d4e5f"), "schedules")
"""The stream of the schedule index (:class:`~broker_q.domain.events.ScheduleIndexed`), tenant ``system``."""

_SCHEDULE_NS = uuid.UUID("5e2f8a61-3b9c-5d47-a1e0-6c8b7d9f0e23")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")
_UNSTABLE_FIELD = re.compile(r"(^|,)[HR](?=$|[(/,])")
"""croniter's ``H`` (hashed) and ``R`` (random) fields: not the same ticks in every process."""
_JUST_AFTER = timedelta(microseconds=1)
"""croniter's ``get_prev`` is strict: asking from just after ``now`` makes a tick at ``now`` due."""


def schedule_id(tenant: str, name: str) -> uuid.UUID:
    """The stream id of ``tenant``'s schedule ``name``: the same in every process, for ever."""
    _check_name(name)
    return uuid.uuid5(_SCHEDULE_NS, f"{len(tenant)}:{tenant}:{name}")


def fire_key(schedule: uuid.UUID, fire_time: datetime) -> str:
    """The idempotency key of the task fired for ``fire_time``: ``schedule:<id>:<UTC ISO time>``."""
    return f"schedule:{schedule}:{fire_time.astimezone(UTC).isoformat()}"


def fired_task_id(tenant: str, schedule: uuid.UUID, fire_time: datetime) -> uuid.UUID:
    """The id of the task fired for ``fire_time``: whoever fires the tick names the same task."""
    return task_id_for(tenant, fire_key(schedule, fire_time))


class Catchup(StrEnum):
    SKIP = "skip"
    ONCE = "once"
    ALL = "all"


class ScheduleStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class ScheduleDefinition:
    """What a schedule submits and when; build it with :func:`define`, which checks every part."""

    cron: str
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    timezone: str
    catchup: Catchup


def define(
    *,
    cron: str,
    task: str,
    queue: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    priority: int,
    timezone: str = "UTC",
    catchup: str = "skip",
    tenant: str,
    now: datetime,
) -> ScheduleDefinition:
    """A checked definition; :class:`~broker_q.errors.ValidationError` says what is wrong with it.

    ``cron`` has five fields, or six with seconds last (croniter's order), or seven with a year. It
    must fire at least once after ``now``. ``timezone`` is an IANA name. ``task``, ``queue``,
    ``priority`` and ``tenant`` must be what a submit would accept.
    """
    if catchup not in Catchup.__members__.values():
        raise ValidationError(f"catchup must be one of {', '.join(c.value for c in Catchup)}, got {catchup!r}")
    zone = _zone(timezone)
    _check_cron(cron, zone, now)
    try:  # the task a fire would submit, decided once now, so that a schedule never holds one that cannot be
        submit(task_id=uuid.UUID(int=0), task=task, queue=queue, args=list(args), kwargs=dict(kwargs or {}),
               priority=priority, tenant=tenant, actor="schedule", now=now)
    except DomainError as e:
        raise ValidationError(str(e)) from e
    return ScheduleDefinition(cron=cron, task=task, queue=queue, args=list(args), kwargs=dict(kwargs or {}),
                              priority=priority, timezone=timezone, catchup=Catchup(catchup))


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValidationError(f"schedule name {name!r} is not a name (letters, digits, '_', '.', ':', '-'; "
                              "at most 200)")


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"unknown timezone {timezone!r}: use an IANA name such as 'Europe/Paris' or 'UTC'") \
            from None


def _check_cron(cron: str, zone: ZoneInfo, now: datetime) -> None:
    if not isinstance(cron, str) or len(cron) > 200:
        raise ValidationError(f"cron must be a cron expression of at most 200 characters, got {cron!r:.80}")
    if any(_UNSTABLE_FIELD.search(field) for field in cron.upper().split()):
        raise ValidationError(f"cron {cron!r}: H and R fields are not supported (every scheduler must compute the "
                              "same ticks)")
    try:
        croniter(cron, now.astimezone(zone)).get_next(datetime)
    except CroniterBadDateError:
        raise ValidationError(f"cron {cron!r} never fires after {now.isoformat()}") from None
    except (CroniterError, ValueError, TypeError, KeyError) as e:
        raise ValidationError(f"cron {cron!r} is not a cron expression (five fields, or six with seconds last): "
                              f"{e}") from None


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """A schedule as of its latest applied event."""

    schedule_id: uuid.UUID
    tenant: str
    name: str
    version: int
    status: ScheduleStatus
    definition: ScheduleDefinition
    since: datetime
    """Ticks after this instant are owed: the last fire, or the creation or last change if later."""
    created_at: datetime
    changed_at: datetime
    """When its definition or status last changed."""
    changed_by: str
    reason: str = ""
    """Why it was last paused, resumed or removed."""
    last_fire: datetime | None = None
    last_task_id: uuid.UUID | None = None
    fires: int = 0
    """Ticks fired since it was (last) created."""

    @property
    def active(self) -> bool:
        return self.status is ScheduleStatus.ACTIVE


# -- commands -------------------------------------------------------------------------------------


def create_or_change(state: ScheduleState | None, definition: ScheduleDefinition, *, tenant: str, name: str,
                     actor: str, now: datetime) -> list[ScheduleEvent]:
    """Create the schedule, or change it to ``definition``; nothing if it is defined so already.

    A removed schedule is created again. A paused one is changed and stays paused.
    """
    stream = schedule_id(tenant, name)
    if state is not None and state.schedule_id != stream:
        raise DomainError(f"schedule {state.tenant}/{state.name} is not {tenant}/{name}")
    if state is not None and state.status is not ScheduleStatus.REMOVED and state.definition == definition:
        return []
    cls = ScheduleCreated if state is None or state.status is ScheduleStatus.REMOVED else ScheduleChanged
    return [cls(stream_id=stream, version=(state.version if state else 0) + 1, timestamp=now, tenant=tenant,
                actor=actor, correlation_id=stream, name=name, cron=definition.cron, task=definition.task,
                queue=definition.queue, args=definition.args, kwargs=definition.kwargs,
                priority=definition.priority, timezone=definition.timezone, catchup=definition.catchup.value)]


def pause(state: ScheduleState | None, *, reason: str = "", actor: str, now: datetime) -> SchedulePaused:
    state = _existing(state, "paused")
    if state.status is not ScheduleStatus.ACTIVE:
        raise DomainError(f"schedule {state.name} is {state.status}: only an active schedule can be paused")
    return SchedulePaused(**_meta(state, now, actor), reason=reason)


def resume(state: ScheduleState | None, *, reason: str = "", actor: str, now: datetime) -> ScheduleResumed:
    state = _existing(state, "resumed")
    if state.status is not ScheduleStatus.PAUSED:
        raise DomainError(f"schedule {state.name} is {state.status}: only a paused schedule can be resumed")
    return ScheduleResumed(**_meta(state, now, actor), reason=reason)


def remove(state: ScheduleState | None, *, reason: str = "", actor: str, now: datetime) -> ScheduleRemoved:
    state = _existing(state, "removed")
    return ScheduleRemoved(**_meta(state, now, actor), reason=reason)


def _existing(state: ScheduleState | None, verb: str) -> ScheduleState:
    if state is None or state.status is ScheduleStatus.REMOVED:
        name = "" if state is None else f" {state.name!r}"
        raise DomainError(f"there is no schedule{name} to be {verb}")
    return state


def _meta(state: ScheduleState, now: datetime, actor: str, offset: int = 1) -> dict[str, Any]:
    # The stream id is the correlation id: everything a schedule does belongs to the schedule's story.
    return {"stream_id": state.schedule_id, "version": state.version + offset, "timestamp": now,
            "tenant": state.tenant, "actor": actor, "correlation_id": state.schedule_id, "name": state.name}


def fire(state: ScheduleState, fire_times: Sequence[datetime], *, actor: str,
         now: datetime) -> list[ScheduleFired | TaskSubmitted]:
    """The events that fire ``fire_times`` (from :func:`due`, in order): per tick, ``schedule_fired`` at
    the schedule's next version and the ``submitted`` of its task, caused by that fire.

    Append them in one transaction: a fire without its task, or a task without its fire, never exists.
    """
    events: list[ScheduleFired | TaskSubmitted] = []
    definition = state.definition
    for fire_time in fire_times:
        fire_time = fire_time.astimezone(UTC)
        key = fire_key(state.schedule_id, fire_time)
        task_id = task_id_for(state.tenant, key)
        fired = ScheduleFired(**_meta(state, now, actor), fire_time=fire_time, task_id=task_id)
        state = evolve(state, fired)
        events.append(fired)
        events.append(submit(task_id=task_id, task=definition.task, queue=definition.queue,
                             args=list(definition.args), kwargs=dict(definition.kwargs), priority=definition.priority,
                             tenant=state.tenant, actor=actor, now=now, causation_id=fired.id, idempotency_key=key))
    return events


def index_entry(event: ScheduleEvent, index_version: int, *, actor: str, now: datetime) -> ScheduleIndexed:
    """The index's record of ``event`` (a change of definition or status), at ``index_version``."""
    return ScheduleIndexed(stream_id=INDEX_ID, version=index_version, timestamp=now, tenant=SYSTEM_TENANT, actor=actor,
                           correlation_id=event.stream_id, causation_id=event.id, schedule_id=event.stream_id,
                           schedule_tenant=event.tenant, name=event.name, schedule_version=event.version,
                           change=event.TYPE)


# -- time ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Due:
    """What a schedule should fire at a given time, and when it fires next."""

    fires: tuple[datetime, ...] = ()
    """The ticks to fire now, in order (UTC)."""
    next_fire: datetime | None = None
    """The first tick after now (UTC); None if the schedule is not active or will never fire again."""


def due(state: ScheduleState | None, now: datetime, *, grace: timedelta = DEFAULT_GRACE,
        limit: int = MAX_CATCHUP) -> Due:
    """The ticks ``state`` should fire at ``now`` under its catchup rule, and its next tick after ``now``."""
    if state is None or state.status is not ScheduleStatus.ACTIVE:
        return Due()
    definition = state.definition
    zone = ZoneInfo(definition.timezone)
    catchup = definition.catchup
    most = 1 if catchup is Catchup.ONCE else limit
    oldest = now - grace if catchup is Catchup.SKIP else None
    ticks: list[datetime] = []
    latest: datetime | None = None
    backwards = croniter(definition.cron, (now + _JUST_AFTER).astimezone(zone))
    try:
        while len(ticks) < most:
            tick = backwards.get_prev(datetime).astimezone(UTC)
            latest = latest or tick
            if tick <= state.since or (oldest is not None and tick < oldest):
                break
            ticks.append(tick)
    except CroniterBadDateError:  # no tick before now (a year field, say)
        pass
    anchor = state.since if latest is None else max(state.since, latest)
    return Due(tuple(reversed(ticks)), _next_after(definition, zone, anchor))


def upcoming(state: ScheduleState, count: int, after: datetime) -> list[datetime]:
    """The next ``count`` ticks after ``after`` (and after the last fire), UTC, whatever the status."""
    definition = state.definition
    zone = ZoneInfo(definition.timezone)
    forwards = croniter(definition.cron, max(after, state.since).astimezone(zone))
    ticks: list[datetime] = []
    try:
        while len(ticks) < count:
            ticks.append(forwards.get_next(datetime).astimezone(UTC))
    except CroniterBadDateError:
        pass
    return ticks


def _next_after(definition: ScheduleDefinition, zone: ZoneInfo, after: datetime) -> datetime | None:
    try:
        return croniter(definition.cron, after.astimezone(zone)).get_next(datetime).astimezone(UTC)
    except CroniterBadDateError:
        return None


# -- the fold -------------------------------------------------------------------------------------


def evolve(state: ScheduleState | None, event: ScheduleEvent) -> ScheduleState:
    """Apply ``event`` to ``state``; refuse an event that does not follow from it."""
    expected = 1 if state is None else state.version + 1
    if event.version != expected or (state is not None and (event.stream_id != state.schedule_id
                                                            or event.name != state.name)):
        where = "a new schedule" if state is None else f"schedule {state.name} v{state.version}"
        raise DomainError(f"{event.TYPE} v{event.version} of schedule {event.name} does not follow {where}")
    if isinstance(event, ScheduleCreated):
        if event.stream_id != schedule_id(event.tenant, event.name):
            raise DomainError(f"schedule {event.tenant}/{event.name} does not live in stream {event.stream_id}")
        if state is not None and state.status is not ScheduleStatus.REMOVED:
            raise DomainError(f"schedule {event.name} exists already: it can be changed, not created")
        return ScheduleState(schedule_id=event.stream_id, tenant=event.tenant, name=event.name, version=event.version,
                             status=ScheduleStatus.ACTIVE, definition=_definition(event), since=event.timestamp,
                             created_at=event.timestamp, changed_at=event.timestamp, changed_by=event.actor)
    if state is None:
        raise DomainError(f"a schedule stream must begin with schedule_created, got {event.TYPE}")
    if state.status is ScheduleStatus.REMOVED:
        raise DomainError(f"schedule {state.name} is removed: only a schedule_created can follow")
    match event:
        case ScheduleChanged():
            # A changed schedule fires from its change on: ticks owed under the old definition are forgotten.
            return _changed(state, event, state.status, definition=_definition(event),
                            since=max(state.since, event.timestamp), reason=state.reason)
        case SchedulePaused():
            if state.status is not ScheduleStatus.ACTIVE:
                raise DomainError(f"schedule {state.name} is {state.status}: it cannot be paused")
            return _changed(state, event, ScheduleStatus.PAUSED, reason=event.reason)
        case ScheduleResumed():
            if state.status is not ScheduleStatus.PAUSED:
                raise DomainError(f"schedule {state.name} is {state.status}: it cannot be resumed")
            return _changed(state, event, ScheduleStatus.ACTIVE, reason=event.reason)
        case ScheduleRemoved():
            return _changed(state, event, ScheduleStatus.REMOVED, reason=event.reason)
        case ScheduleFired():
            if state.status is not ScheduleStatus.ACTIVE:
                raise DomainError(f"schedule {state.name} is {state.status}: it cannot fire")
            if event.fire_time <= state.since:
                raise DomainError(f"schedule {state.name} cannot fire {event.fire_time.isoformat()}: it owes only "
                                  f"ticks after {state.since.isoformat()}")
            if event.task_id != fired_task_id(state.tenant, state.schedule_id, event.fire_time):
                raise DomainError(f"the task of a fire of schedule {state.name} must be the one its tick names")
            return replace(state, version=event.version, since=event.fire_time, last_fire=event.fire_time,
                           last_task_id=event.task_id, fires=state.fires + 1)
    raise DomainError(f"{event.TYPE} is not an event of a schedule")


def _definition(event: ScheduleDefined) -> ScheduleDefinition:
    return ScheduleDefinition(cron=event.cron, task=event.task, queue=event.queue, args=event.args,
                              kwargs=event.kwargs, priority=event.priority, timezone=event.timezone,
                              catchup=Catchup(event.catchup))


def _changed(state: ScheduleState, event: ScheduleEvent, status: ScheduleStatus, *, reason: str,
             definition: ScheduleDefinition | None = None, since: datetime | None = None) -> ScheduleState:
    return replace(state, version=event.version, status=status, definition=definition or state.definition,
                   since=since or state.since, changed_at=event.timestamp, changed_by=event.actor, reason=reason)


def replay(events: Iterable[ScheduleEvent], state: ScheduleState | None = None) -> ScheduleState | None:
    """The state after ``events`` in order, from ``state`` (None: the stream's beginning)."""
    for event in events:
        state = evolve(state, event)
    return state
