"""Replay: queries answered from the events themselves, never from a view.

Every function here reads an :class:`~broker_q.store.port.EventStore` and folds events with the
domain's own :func:`~broker_q.domain.task.evolve`, so its answers cannot drift from what the write
side decided, and they hold for any moment of the past, not only for now. They never write.

What "as of" means
==================

*As of position* ``p`` is exact: everything recorded at a log position ``<= p``.

*As of time* ``T`` means: for each task, the longest prefix of its stream (in version order) whose
events all have a ``timestamp <= T``. Versions are consecutive, so a task whose version ``v`` is
stamped after ``T`` is frozen at ``v - 1`` even if a later version carries an earlier stamp (the
clocks of two hosts disagree): a state is only ever built by applying events in order.

A timestamp is taken before its event commits, so the log is ordered by commit, not by time: an event
stamped before ``T`` may sit after one stamped after ``T``. :func:`task_state_at` reads the task's
whole stream and needs no assumption. A query over the log (:func:`queue_counts_at`, and
:func:`events` with ``until``) scans it in pages and stops at the first event stamped more than
``skew`` after ``T`` (default :data:`CLOCK_SKEW`, 60 s). That loses nothing as long as every event
commits before any event stamped more than ``skew`` later than itself: true when the writers' clocks
agree, and each append commits after taking its stamp, within ``skew`` in total. A store outage
during which the group-commit writer keeps retrying the same events can break that bound;
``skew=None`` scans the whole log instead (to its end when the query began) and is always exact.

Every scan stops at the log's last position as it was when the query began, so a query answers
about one snapshot and terminates while writers keep appending.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker_q.domain.events import TOPICS, Event, TaskEvent, TaskStarted, TaskSubmitted
from broker_q.domain.task import TaskState, TaskStatus, evolve, replay
from broker_q.errors import TaskNotFound, ValidationError
from broker_q.store.port import EventStore, Recorded

__all__ = [
    "CLOCK_SKEW",
    "EVENT_TYPES",
    "PAGE_SIZE",
    "Attempt",
    "QueueCounts",
    "Timeline",
    "TimelineRow",
    "details",
    "events",
    "queue_counts_at",
    "task_state_at",
    "timeline",
]

CLOCK_SKEW = timedelta(seconds=60)
"""How far past ``T`` a scan "as of time ``T``" reads before it stops (see the module docstring)."""

PAGE_SIZE = 1000
"""Events read from the log per query: the most a scan holds in memory at once."""

EVENT_TYPES = frozenset(cls.TYPE for cls in TOPICS.values())
"""Every event ``TYPE`` a store can hold: the names that :func:`events` filters on."""

QueueCounts = dict[tuple[str, str], dict[TaskStatus, int]]
"""``{(tenant, queue): {status: number of tasks}}``, every status present (zeros included)."""

_METADATA = frozenset(
    {"stream_id", "version", "timestamp", "tenant", "actor", "correlation_id", "causation_id"}
)


def details(event: Event) -> dict[str, Any]:
    """The fields that are the event's own (not the metadata every event has); JSON-native values."""
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event) if f.name not in _METADATA}


# -- the raw range ------------------------------------------------------------------------------


def events(
    store: EventStore,
    *,
    from_position: int | None = None,
    to_position: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Collection[str] | None = None,
    task: uuid.UUID | None = None,
    tenant: str | None = None,
    limit: int | None = None,
    skew: timedelta | None = CLOCK_SKEW,
    page_size: int = PAGE_SIZE,
) -> Iterator[Recorded]:
    """The recorded events that pass every filter given, in log order, with their positions.

    - ``from_position``/``to_position``: positions, both inclusive;
    - ``since``/``until``: aware datetimes, both inclusive, compared with each event's ``timestamp``
      (past ``until`` the scan stops as the module docstring says, ``skew`` included);
    - ``types``: event ``TYPE`` names (:data:`EVENT_TYPES`); ``None`` means every type;
    - ``task``: one stream id. Its events are still found in the log, so that they keep their
      positions, but the stream is read first: an unknown id yields nothing without a scan, and the
      scan stops at the stream's last event;
    - ``tenant``: the owner of the events;
    - ``limit``: the most events yielded.

    The log is read ``page_size`` events at a time, up to its last position when the iteration began.
    Raises :class:`~broker_q.errors.ValidationError` for a bad argument, before reading anything.
    """
    _check_positions(from_position=from_position, to_position=to_position)
    _check_aware(since=since, until=until)
    if limit is not None and limit < 0:
        raise ValidationError(f"limit must be at least 0, got {limit}")
    _check_page_size(page_size)
    if isinstance(types, str):
        raise ValidationError(f"types is a collection of type names, not the string {types!r}")
    wanted = None if types is None else frozenset(types)
    if wanted is not None and wanted - EVENT_TYPES:
        unknown = ", ".join(sorted(wanted - EVENT_TYPES))
        raise ValidationError(f"unknown event type {unknown}: the types are {', '.join(sorted(EVENT_TYPES))}")
    return _events(store, from_position, to_position, since, until, wanted, task, tenant, limit, skew, page_size)


def _events(
    store: EventStore,
    from_position: int | None,
    to_position: int | None,
    since: datetime | None,
    until: datetime | None,
    types: frozenset[str] | None,
    task: uuid.UUID | None,
    tenant: str | None,
    limit: int | None,
    skew: timedelta | None,
    page_size: int,
) -> Iterator[Recorded]:
    if limit == 0:
        return
    end = _end(store, to_position)
    last_version: int | None = None
    if task is not None:
        stream = store.read_stream(task)
        if not stream:
            return
        last_version = stream[-1].version
    stop_after = _stop_after(until, skew)
    yielded = 0
    for recorded in _scan(store, after=max((from_position or 0) - 1, 0), end=end, page_size=page_size):
        event = recorded.event
        if stop_after is not None and event.timestamp > stop_after:
            return
        if task is not None and event.stream_id != task:
            continue
        if (
            (types is None or event.TYPE in types)
            and (tenant is None or event.tenant == tenant)
            and (since is None or event.timestamp >= since)
            and (until is None or event.timestamp <= until)
        ):
            yield recorded
            yielded += 1
            if yielded == limit:
                return
        if last_version is not None and event.version >= last_version:
            return  # the stream's last event when the query began: the rest of the log has none of it


# -- one task -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One event of a task's history, with the time it took to get there."""

    version: int
    time: datetime
    type: str
    actor: str
    details: dict[str, Any]
    since_previous: timedelta
    """Time since the previous event (zero for the first). Negative if two hosts' clocks disagree."""
    since_submit: timedelta


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of the task, from its ``started`` event to the event that ended it."""

    number: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    """``None`` while the attempt is running."""
    outcome: str | None
    """The ``TYPE`` of the event that ended it (``succeeded``, ``failed``, ``cancelled``, or ``started``
    when another worker took the task over); ``None`` while it runs."""

    @property
    def run_time(self) -> timedelta | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class Timeline:
    """A task's whole history and what it adds up to. Durations need no clock: they are between events."""

    task_id: uuid.UUID
    state: TaskState
    """The state after the last event."""
    rows: list[TimelineRow]
    attempts: list[Attempt]
    waiting: timedelta | None
    """From submit to the first start; ``None`` if the task never started."""
    total: timedelta | None
    """From submit to the final event; ``None`` while the task is not final."""


def timeline(store: EventStore, task_id: uuid.UUID) -> Timeline:
    """The history of one task, from its stream.

    Raises :class:`~broker_q.errors.TaskNotFound` if no task has that id, and
    :class:`~broker_q.errors.DomainError` if the stored stream is not a legal history.
    """
    history = _task_stream(store, task_id)
    state = replay(history)
    assert state is not None  # _task_stream returns at least the submitted event
    submitted_at = history[0].timestamp
    rows: list[TimelineRow] = []
    attempts: list[Attempt] = []
    previous = submitted_at
    for event in history:
        rows.append(TimelineRow(version=event.version, time=event.timestamp, type=event.TYPE, actor=event.actor,
                                details=details(event), since_previous=event.timestamp - previous,
                                since_submit=event.timestamp - submitted_at))
        previous = event.timestamp
        if attempts and attempts[-1].ended_at is None:
            attempts[-1] = dataclasses.replace(attempts[-1], ended_at=event.timestamp, outcome=event.TYPE)
        if isinstance(event, TaskStarted):
            attempts.append(Attempt(number=event.attempt, worker=event.worker, started_at=event.timestamp,
                                    ended_at=None, outcome=None))
    return Timeline(
        task_id=task_id,
        state=state,
        rows=rows,
        attempts=attempts,
        waiting=attempts[0].started_at - submitted_at if attempts else None,
        total=state.finished_at - submitted_at if state.finished_at is not None else None,
    )


def task_state_at(
    store: EventStore, task_id: uuid.UUID, *, at: datetime | None = None, position: int | None = None
) -> TaskState | None:
    """The task's state as of time ``at`` or log position ``position`` (exactly one of them).

    ``None`` if the task did not exist yet then. Raises :class:`~broker_q.errors.TaskNotFound` if it
    does not exist now either, and :class:`~broker_q.errors.ValidationError` unless exactly one of
    ``at`` (an aware datetime) and ``position`` (at least 0) is given.
    """
    _check_moment(at, position)
    if at is not None:
        prefix: list[TaskEvent] = []
        for event in _task_stream(store, task_id):
            if event.timestamp > at:
                break
            prefix.append(event)
        return replay(prefix)
    _task_stream(store, task_id)  # an unknown id is an error, not "did not exist yet"
    recorded = events(store, task=task_id, to_position=position)
    return replay(r.event for r in recorded if isinstance(r.event, TaskEvent))


def _task_stream(store: EventStore, task_id: uuid.UUID) -> list[TaskEvent]:
    stream = store.read_stream(task_id)
    if not stream:
        raise TaskNotFound(f"no task with id {task_id}")
    history = [e for e in stream if isinstance(e, TaskEvent)]
    if len(history) != len(stream):
        raise TaskNotFound(f"{task_id} is the id of a {stream[0].TYPE} record, not of a task")
    return history


# -- every task ---------------------------------------------------------------------------------


def queue_counts_at(
    store: EventStore,
    *,
    at: datetime | None = None,
    position: int | None = None,
    queue: str | None = None,
    tenant: str | None = None,
    skew: timedelta | None = CLOCK_SKEW,
    page_size: int = PAGE_SIZE,
) -> QueueCounts:
    """How many tasks were in each state, per tenant and queue, as of ``at`` or ``position``.

    Exactly one of ``at`` (aware) and ``position`` must be given, else
    :class:`~broker_q.errors.ValidationError`. ``queue`` and ``tenant`` keep only those tasks. The
    log is folded with :func:`~broker_q.domain.task.evolve` in pages of ``page_size``: memory grows
    with the number of tasks, not of events. Keys are sorted; a (tenant, queue) appears once it has
    a task, with every status counted (zeros included). Events that are not a task's are skipped.
    """
    _check_moment(at, position)
    _check_page_size(page_size)
    end = _end(store, position)
    stop_after = _stop_after(at, skew)
    states: dict[uuid.UUID, TaskState] = {}
    ignored: set[uuid.UUID] = set()  # another queue's tasks, or frozen at a version stamped after ``at``
    for recorded in _scan(store, after=0, end=end, page_size=page_size):
        event = recorded.event
        if stop_after is not None and event.timestamp > stop_after:
            break
        if not isinstance(event, TaskEvent) or (tenant is not None and event.tenant != tenant):
            continue
        task_id = event.stream_id
        if task_id in ignored:
            continue
        if (at is not None and event.timestamp > at) or (
            queue is not None and isinstance(event, TaskSubmitted) and event.queue != queue
        ):
            ignored.add(task_id)
            continue
        states[task_id] = _slim(evolve(states.get(task_id), event))
    counts: QueueCounts = {}
    for state in states.values():
        per_status = counts.setdefault((state.tenant, state.queue), dict.fromkeys(TaskStatus, 0))
        per_status[state.status] += 1
    return dict(sorted(counts.items()))


def _slim(state: TaskState) -> TaskState:
    # The fold keeps one state per task: drop what it never reads (arguments, results, tracebacks
    # can be large) so that memory grows with the number of tasks, not with their payloads.
    if (state.args or state.kwargs or state.result is not None or state.traceback is not None or state.error
            or state.sealed_arguments is not None or state.sealed_result is not None):
        return dataclasses.replace(state, args=[], kwargs={}, result=None, traceback=None, error=None,
                                   sealed_arguments=None, sealed_result=None)
    return state


# -- reading the log ----------------------------------------------------------------------------


def _scan(store: EventStore, *, after: int, end: int, page_size: int) -> Iterator[Recorded]:
    while after < end:
        page = store.read_log(after, page_size, to_position=end)
        yield from page
        if len(page) < page_size:
            return
        after = page[-1].position


def _stop_after(moment: datetime | None, skew: timedelta | None) -> datetime | None:
    """Where a scan as of ``moment`` stops (``None``: at the log's end); a moment within ``skew`` of
    the last time a datetime holds has no stop before it."""
    if moment is None or skew is None:
        return None
    try:
        return moment + skew
    except OverflowError:
        return None


def _end(store: EventStore, to_position: int | None) -> int:
    last = store.max_position()
    return last if to_position is None else min(last, to_position)


def _check_moment(at: datetime | None, position: int | None) -> None:
    if (at is None) == (position is None):
        raise ValidationError("give exactly one of a time (at) and a log position")
    _check_aware(at=at)
    _check_positions(position=position)


def _check_aware(**times: datetime | None) -> None:
    for name, value in times.items():
        if value is not None and value.utcoffset() is None:
            raise ValidationError(f"{name} must be a timezone-aware datetime, got {value.isoformat()}")


def _check_positions(**positions: int | None) -> None:
    for name, value in positions.items():
        if value is not None and value < 0:
            raise ValidationError(f"{name} must be at least 0, got {value}")


def _check_page_size(page_size: int) -> None:
    if page_size < 1:
        raise ValidationError(f"page_size must be at least 1, got {page_size}")
