"""The task state machine: state is a fold over a task's events; commands decide new events.

Commands are pure functions ``(state, inputs) -> event``: they check the transition and return the
event that records it, or raise :class:`~broker_q.errors.DomainError`. They never look at a clock or
a database; the caller passes ``now`` and appends the event with the expected version
``state.version + 1``. :func:`evolve` applies an event to a state and refuses any event that the
commands could not have produced, so a replay of stored events can never build an illegal state.

Lifecycle (states are lowercase words; each arrow is one event)::

    submit ─> ready ──> started ─┬─> succeeded
               ^  │      ^       ├─> retry_scheduled(due) ──┐   (started again when due)
               │  │      └───────┼──────────────────────────┘
               │  └─> deferred(due) ─> started               (no attempt spent)
               │                 └─> dead_lettered ─> replayed ─> ready
               └───────────────────────────────────────────┘
    cancelled: from any state that is not final (a running task is asked to stop)

``succeeded`` and ``cancelled`` are final. ``dead_lettered`` is final until someone replays it.

A task submitted with parents (``depends_on``) or a time to wait for (``due_at``) is ``blocked``:
``released`` (every parent succeeded) clears its parents; a blocked task with no parent left starts
when it is due, like a retry. A parent that fails for good cancels it (``upstream_failed``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from broker_q.domain.events import (
    TaskCancelled,
    TaskDeadLettered,
    TaskDeferred,
    TaskEvent,
    TaskReleased,
    TaskReplayed,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    event_id,
)
from broker_q.domain.retry import RetryOverride
from broker_q.errors import DomainError

__all__ = [
    "FINAL_STATES",
    "MAX_PRIORITY",
    "RESERVED_KEY_PREFIXES",
    "STARTABLE_STATES",
    "WAITING_STATES",
    "TaskState",
    "TaskStatus",
    "cancel",
    "client_task_id",
    "dead_letter",
    "dead_lettered_event",
    "defer",
    "deferred_event",
    "evolve",
    "is_startable",
    "release",
    "replay",
    "replay_dead_letter",
    "retry",
    "retry_scheduled_event",
    "start",
    "started_event",
    "submit",
    "succeed",
    "succeeded_event",
    "task_id_for",
]

MAX_PRIORITY = 9
"""Priorities run from 0 (lowest) to ``MAX_PRIORITY`` (highest)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")
_QUEUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")
"""Queue names become parts of AMQP queue names (255 bytes at most) and routing keys."""
_TENANT = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_IDEMPOTENCY_NS = uuid.UUID("0b9f4c1e-2a7d-5e8b-9c3f-7d6e5a4b3c21")


def task_id_for(tenant: str, idempotency_key: str | None) -> uuid.UUID:
    """The id of a new task: derived from the key when there is one, so a resend names the same task."""
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(_IDEMPOTENCY_NS, f"{len(tenant)}:{tenant}:{idempotency_key}")


RESERVED_KEY_PREFIXES = ("schedule:",)
"""Idempotency keys that broker_q derives itself (a schedule's fire): a client that took one could
make a tick's task in the scheduler's place, or keep the tick from firing."""


def client_task_id(tenant: str, idempotency_key: str | None) -> uuid.UUID:
    """:func:`task_id_for` a key a client gave: keys that broker_q reserves are refused."""
    if idempotency_key is not None and idempotency_key.startswith(RESERVED_KEY_PREFIXES):
        reserved = " or ".join(repr(prefix) for prefix in RESERVED_KEY_PREFIXES)
        raise DomainError(f"idempotency key {idempotency_key!r}: keys that begin with {reserved} are broker_q's own")
    return task_id_for(tenant, idempotency_key)


class TaskStatus(StrEnum):
    BLOCKED = "blocked"
    READY = "ready"
    STARTED = "started"
    RETRY_SCHEDULED = "retry_scheduled"
    DEFERRED = "deferred"
    SUCCEEDED = "succeeded"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED})
"""States the task leaves only by an operator's hand (a dead letter's replay), if at all."""
WAITING_STATES = frozenset({TaskStatus.RETRY_SCHEDULED, TaskStatus.DEFERRED})
"""States of a task that the scheduler will offer again at its ``due_at``."""
STARTABLE_STATES = frozenset({TaskStatus.READY, TaskStatus.STARTED, *WAITING_STATES})
"""States a ``started`` may follow (``started`` itself: a takeover from a lost worker); and
``blocked`` once no parent is left (see :func:`is_startable`)."""
MAX_PARENTS = 10_000
"""The most parents a task may wait for (a chord's callback waits for its whole group)."""


@dataclass(frozen=True, slots=True)
class TaskState:
    """A task as of its latest applied event."""

    task_id: uuid.UUID
    version: int
    status: TaskStatus
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    tenant: str
    correlation_id: uuid.UUID
    idempotency_key: str | None
    submitted_at: datetime
    max_attempts: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    retry: RetryOverride | None = None
    """The submit's changes to the task's retry policy, besides ``max_attempts``."""
    attempts: int = 0
    first_attempt: int = 1
    """The attempt the retry budget counts from: 1, or the one after a replay."""
    worker: str | None = None
    ready_at: datetime | None = None
    """When the task last became ready (submitted, replayed) or is due again (retry, deferral)."""
    due_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    timed_out: bool = False
    cancel_reason: str | None = None
    replays: int = 0
    depends_on: tuple[uuid.UUID, ...] = ()
    waiting_on: tuple[uuid.UUID, ...] = ()
    """Parents not yet known to have succeeded (all of ``depends_on`` until released)."""
    receives: str | None = None
    sealed_arguments: str | None = None
    """The arguments, sealed (``args`` and ``kwargs`` are empty then): see :class:`TaskSubmitted`."""
    sealed_result: str | None = None
    """The result, sealed (``result`` is None then): see :class:`TaskSucceeded`."""

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES


def is_startable(state: TaskState) -> bool:
    """Whether a ``started`` may follow: ready, due, taken over, or blocked on nothing but time."""
    return state.status in STARTABLE_STATES or (state.status is TaskStatus.BLOCKED and not state.waiting_on)


def submit(
    *,
    task_id: uuid.UUID,
    task: str,
    queue: str,
    args: list[Any],
    kwargs: dict[str, Any],
    priority: int,
    tenant: str,
    actor: str,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
    causation_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    retry: RetryOverride | None = None,
    due_at: datetime | None = None,
    depends_on: Iterable[uuid.UUID] = (),
    receives: str | None = None,
    seal: Callable[[list[Any], dict[str, Any]], str] | None = None,
) -> TaskSubmitted:
    """Decide the first event of a new task.

    ``retry``: changes to the task's retry policy; ``max_attempts`` is short for
    ``retry=RetryOverride(max_attempts=...)`` (give it one way, not both). The override's
    ``max_attempts`` is recorded as the event's own, the rest as its ``retry``.

    ``due_at``: not before then (an aware time). ``depends_on``: parents that must all succeed
    first; the caller checks that they exist (a task can only wait for tasks older than itself, so
    no cycle can form). ``receives``: ``result`` or ``results`` to get the parents' results first.

    ``seal``: when given, the arguments are recorded only as what it makes of them
    (``sealed_arguments``), and it is called after every check passed, so nothing is sealed for a
    task that is refused. How they are sealed is not the domain's business.
    """
    if not _NAME.fullmatch(task):
        raise DomainError(f"task name {task!r} is not a name (letters, digits, '_', '.', ':', '-'; at most 200)")
    if not _QUEUE.fullmatch(queue):
        raise DomainError(f"queue name {queue!r} is not a queue name (letters, digits, '_', '.', '-'; at most 100)")
    if not _TENANT.fullmatch(tenant):
        raise DomainError(f"tenant {tenant!r} is not a tenant name (lowercase letters, digits, '_' and '-')")
    if not 0 <= priority <= MAX_PRIORITY:
        raise DomainError(f"priority must be between 0 and {MAX_PRIORITY}, got {priority}")
    if retry is not None and retry.max_attempts is not None:
        if max_attempts is not None:
            raise DomainError("give max_attempts or retry=...(max_attempts=...), not both")
        max_attempts, retry = retry.max_attempts, replace(retry, max_attempts=None)
    check_limits(max_attempts=max_attempts, time_limit=time_limit, soft_time_limit=soft_time_limit)
    if due_at is not None and due_at.utcoffset() is None:
        raise DomainError(f"eta must be an aware datetime (with a timezone), got {due_at.isoformat()}")
    parents = list(dict.fromkeys(depends_on))
    if task_id in parents:
        raise DomainError(f"task {task_id} cannot depend on itself: a dependency cycle")
    if len(parents) > MAX_PARENTS:
        raise DomainError(f"a task may wait for at most {MAX_PARENTS} parents, got {len(parents)}")
    if receives not in (None, "result", "results"):
        raise DomainError(f"receives must be 'result', 'results' or None, got {receives!r}")
    if receives == "result" and len(parents) != 1:
        raise DomainError(f"receives='result' needs exactly one parent, got {len(parents)}")
    if receives is not None and not parents:
        raise DomainError("a task with no parents receives no results")
    sealed_arguments = None
    if seal is not None:
        sealed_arguments, args, kwargs = seal(args, kwargs), [], {}
    return TaskSubmitted(
        stream_id=task_id,
        version=1,
        timestamp=now,
        tenant=tenant,
        actor=actor,
        correlation_id=correlation_id or task_id,
        causation_id=causation_id,
        task=task,
        queue=queue,
        args=args,
        kwargs=kwargs,
        priority=priority,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        retry=(retry.to_json() or None) if retry is not None else None,
        due_at=due_at,
        depends_on=parents,
        receives=receives,
        sealed_arguments=sealed_arguments,
    )


def release(state: TaskState, *, results: list[Any], actor: str, now: datetime) -> TaskReleased:
    """Every parent succeeded: the task may run. ``results`` are the parents' results, in
    ``depends_on`` order; they are passed in front of the task's arguments as it ``receives``."""
    if state.status is not TaskStatus.BLOCKED or not state.waiting_on:
        raise DomainError(f"task {state.task_id} is {state.status} and waits for no parent: nothing to release")
    args: list[Any] | None = None
    if state.receives == "result":
        args = [results[0], *state.args]
    elif state.receives == "results":
        args = [list(results), *state.args]
    return TaskReleased(stream_id=state.task_id, version=state.version + 1, timestamp=now, tenant=state.tenant,
                        actor=actor, correlation_id=state.correlation_id, args=args)


def check_limits(*, max_attempts: int | None, time_limit: float | None, soft_time_limit: float | None) -> None:
    """Refuse retry and time-limit options that cannot mean anything."""
    if max_attempts is not None and not 1 <= max_attempts <= 1000:
        raise DomainError(f"max_attempts must be between 1 and 1000, got {max_attempts}")
    for name, value in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
        if value is not None and not 0 < value <= 86400 * 7:
            raise DomainError(f"{name} must be a number of seconds above 0 and at most a week, got {value}")
    if time_limit is not None and soft_time_limit is not None and soft_time_limit > time_limit:
        raise DomainError(f"soft_time_limit ({soft_time_limit}s) must not be over time_limit ({time_limit}s)")


def start(state: TaskState, *, worker: str, now: datetime) -> TaskStarted:
    """Begin the next attempt: when ready or due, or take over an attempt whose worker was lost."""
    if not is_startable(state):
        raise DomainError(f"task {state.task_id} is {state.status}: it cannot start")
    return started_event(
        task_id=state.task_id,
        version=state.version + 1,
        attempt=state.attempts + 1,
        worker=worker,
        tenant=state.tenant,
        correlation_id=state.correlation_id,
        now=now,
    )


def started_event(
    *,
    task_id: uuid.UUID,
    version: int,
    attempt: int,
    worker: str,
    tenant: str,
    correlation_id: uuid.UUID,
    now: datetime,
) -> TaskStarted:
    """The ``Started`` event for a task known to be ready at ``version - 1``.

    Workers use this on the happy path without reading the task back: the work message says at
    which version the task became ready, and the store's unique (stream, version) refuses the append
    if anything happened to the task since. That is the only check needed, because the only event
    that can follow ``ready`` at that version without a conflict is this one.
    """
    return TaskStarted(
        stream_id=task_id,
        version=version,
        timestamp=now,
        tenant=tenant,
        actor=worker,
        correlation_id=correlation_id,
        causation_id=_previous_event_id(task_id, version),
        attempt=attempt,
        worker=worker,
    )


def succeed(state: TaskState, *, result: Any, now: datetime) -> TaskSucceeded:
    _require_started(state, "succeed")
    return succeeded_event(state.task_id, state.version + 1, state.tenant, state.worker or "", state.correlation_id,
                           result, now)


def succeeded_event(
    task_id: uuid.UUID, version: int, tenant: str, worker: str, correlation_id: uuid.UUID, result: Any, now: datetime
) -> TaskSucceeded:
    """The outcome of the attempt that this worker started at ``version - 1``."""
    return TaskSucceeded(
        stream_id=task_id,
        version=version,
        timestamp=now,
        tenant=tenant,
        actor=worker,
        correlation_id=correlation_id,
        causation_id=_previous_event_id(task_id, version),
        result=result,
    )


def retry(state: TaskState, *, due_at: datetime, error_type: str, message: str, traceback: str | None,
          timed_out: bool = False, now: datetime) -> TaskRetryScheduled:
    """The running attempt failed and the task runs again at ``due_at``."""
    _require_started(state, "be retried")
    return retry_scheduled_event(state.task_id, state.version + 1, state.tenant, state.worker or "",
                                 state.correlation_id, due_at, error_type, message, traceback, now, timed_out=timed_out)


def retry_scheduled_event(
    task_id: uuid.UUID, version: int, tenant: str, worker: str, correlation_id: uuid.UUID, due_at: datetime,
    error_type: str, message: str, traceback: str | None, now: datetime, *, timed_out: bool = False,
) -> TaskRetryScheduled:
    """The retry of the attempt that this worker started at ``version - 1``."""
    if due_at < now:
        raise DomainError(f"a retry cannot be due before it is scheduled ({due_at} < {now})")
    return TaskRetryScheduled(
        stream_id=task_id, version=version, timestamp=now, tenant=tenant, actor=worker,
        correlation_id=correlation_id, causation_id=_previous_event_id(task_id, version), due_at=due_at,
        error_type=error_type, message=message, traceback=traceback, timed_out=timed_out,
    )


def dead_letter(state: TaskState, *, error_type: str, message: str, traceback: str | None,
                timed_out: bool = False, now: datetime) -> TaskDeadLettered:
    """The running attempt failed and the task will not run again by itself."""
    _require_started(state, "be dead-lettered")
    return dead_lettered_event(state.task_id, state.version + 1, state.tenant, state.worker or "",
                               state.correlation_id, error_type, message, traceback, now, timed_out=timed_out)


def dead_lettered_event(
    task_id: uuid.UUID, version: int, tenant: str, worker: str, correlation_id: uuid.UUID, error_type: str,
    message: str, traceback: str | None, now: datetime, *, timed_out: bool = False,
) -> TaskDeadLettered:
    """The final failure of the attempt that this worker started at ``version - 1``."""
    return TaskDeadLettered(
        stream_id=task_id, version=version, timestamp=now, tenant=tenant, actor=worker,
        correlation_id=correlation_id, causation_id=_previous_event_id(task_id, version), error_type=error_type,
        message=message, traceback=traceback, timed_out=timed_out,
    )


def defer(state: TaskState, *, due_at: datetime, reason: str, actor: str, now: datetime) -> TaskDeferred:
    """Offer the task again at ``due_at`` without starting it (no attempt is spent)."""
    if not _deferrable(state):
        raise DomainError(f"task {state.task_id} is {state.status}: only a task waiting to start can be deferred")
    return deferred_event(state.task_id, state.version + 1, state.tenant, actor, state.correlation_id, due_at,
                          reason, now)


def deferred_event(task_id: uuid.UUID, version: int, tenant: str, actor: str, correlation_id: uuid.UUID,
                   due_at: datetime, reason: str, now: datetime) -> TaskDeferred:
    """The deferral of a task known to be ready (or due) at ``version - 1``: like :func:`started_event`,
    the store's unique (stream, version) refuses it if anything happened to the task since."""
    if due_at < now:
        raise DomainError(f"a deferral cannot be due before it is decided ({due_at} < {now})")
    return TaskDeferred(
        stream_id=task_id, version=version, timestamp=now, tenant=tenant, actor=actor, correlation_id=correlation_id,
        causation_id=_previous_event_id(task_id, version), due_at=due_at, reason=reason,
    )


def replay_dead_letter(
    state: TaskState,
    *,
    reason: str,
    actor: str,
    now: datetime,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    sealed_arguments: str | None = None,
) -> TaskReplayed:
    """Send a dead letter to run again; ``args``/``kwargs``, when given, replace the task's own.

    ``sealed_arguments`` replaces them all, sealed; a task whose arguments are sealed can only be
    given new ones that way (its old ones cannot be merged with plain new ones here).
    """
    if state.status is not TaskStatus.DEAD_LETTERED:
        raise DomainError(f"task {state.task_id} is {state.status}: only a dead letter can be replayed")
    if not reason.strip():
        raise DomainError("a replay needs a reason (it is kept in the task's history)")
    _check_sealed_replay(state, args, kwargs, sealed_arguments)
    return TaskReplayed(
        stream_id=state.task_id, version=state.version + 1, timestamp=now, tenant=state.tenant, actor=actor,
        correlation_id=state.correlation_id, reason=reason, args=args, kwargs=kwargs,
        sealed_arguments=sealed_arguments,
    )


def _check_sealed_replay(state: TaskState, args: list[Any] | None, kwargs: dict[str, Any] | None,
                         sealed_arguments: str | None) -> None:
    plain = args is not None or kwargs is not None
    if sealed_arguments is not None and plain:
        raise DomainError("a replay gives new arguments either sealed or plain, not both")
    if plain and state.sealed_arguments is not None:
        raise DomainError(f"task {state.task_id} has sealed arguments: new ones must be sealed too")


def cancel(state: TaskState, *, reason: str, actor: str, now: datetime) -> TaskCancelled:
    """Stop the task for good: it never starts again, and a running attempt is asked to stop."""
    if state.is_final:
        raise DomainError(f"task {state.task_id} is {state.status}: it cannot be cancelled")
    return TaskCancelled(
        stream_id=state.task_id,
        version=state.version + 1,
        timestamp=now,
        tenant=state.tenant,
        actor=actor,
        correlation_id=state.correlation_id,
        reason=reason,
    )


def _deferrable(state: TaskState) -> bool:
    return state.status is not TaskStatus.STARTED and is_startable(state)


def _require_started(state: TaskState, verb: str) -> None:
    if state.status is not TaskStatus.STARTED:
        raise DomainError(f"task {state.task_id} is {state.status}: only a started task can {verb}")


def _previous_event_id(task_id: uuid.UUID, version: int) -> uuid.UUID:
    return event_id(task_id, version - 1)


def evolve(state: TaskState | None, event: TaskEvent) -> TaskState:
    """Apply ``event`` to ``state``; refuse an event that does not follow from it."""
    if state is None:
        if not isinstance(event, TaskSubmitted) or event.version != 1:
            raise DomainError(f"a task stream must begin with submitted at version 1, got {event.TYPE}")
        waits = bool(event.depends_on) or (event.due_at is not None and event.due_at > event.timestamp)
        return TaskState(
            task_id=event.stream_id,
            version=1,
            status=TaskStatus.BLOCKED if waits else TaskStatus.READY,
            task=event.task,
            queue=event.queue,
            args=event.args,
            kwargs=event.kwargs,
            priority=event.priority,
            tenant=event.tenant,
            correlation_id=event.correlation_id,
            idempotency_key=event.idempotency_key,
            submitted_at=event.timestamp,
            max_attempts=event.max_attempts,
            time_limit=event.time_limit,
            soft_time_limit=event.soft_time_limit,
            retry=None if event.retry is None else RetryOverride.from_json(event.retry),
            ready_at=event.timestamp if event.due_at is None else max(event.due_at, event.timestamp),
            due_at=event.due_at,
            depends_on=tuple(event.depends_on),
            waiting_on=tuple(event.depends_on),
            receives=event.receives,
            sealed_arguments=event.sealed_arguments,
        )
    if event.stream_id != state.task_id or event.version != state.version + 1:
        raise DomainError(
            f"event {event.TYPE} v{event.version} of {event.stream_id} does not follow "
            f"{state.task_id} v{state.version}"
        )
    match event:
        case TaskStarted():
            if not is_startable(state):
                raise DomainError(f"task {state.task_id} is {state.status}: it cannot start")
            if event.attempt != state.attempts + 1:
                raise DomainError(f"attempt {event.attempt} does not follow attempt {state.attempts}")
            return replace(state, version=event.version, status=TaskStatus.STARTED, attempts=event.attempt,
                           worker=event.worker, started_at=event.timestamp, due_at=None)
        case TaskSucceeded():
            _require_started(state, "succeed")
            return replace(state, version=event.version, status=TaskStatus.SUCCEEDED, result=event.result,
                           sealed_result=event.sealed_result, finished_at=event.timestamp)
        case TaskRetryScheduled():
            _require_started(state, "be retried")
            return replace(state, version=event.version, status=TaskStatus.RETRY_SCHEDULED, due_at=event.due_at,
                           ready_at=event.due_at, error_type=event.error_type, error=event.message,
                           traceback=event.traceback, timed_out=event.timed_out)
        case TaskDeadLettered():
            _require_started(state, "be dead-lettered")
            return replace(state, version=event.version, status=TaskStatus.DEAD_LETTERED,
                           error_type=event.error_type, error=event.message, traceback=event.traceback,
                           timed_out=event.timed_out, finished_at=event.timestamp)
        case TaskReleased():
            if state.status is not TaskStatus.BLOCKED or not state.waiting_on:
                raise DomainError(f"task {state.task_id} is {state.status} and waits for no parent: "
                                  "it cannot be released")
            # Still due later: an eta that blocked it at its submission, and is later than this
            # release too. An eta not after the submission never holds the task, whatever the
            # clock of the coordinator that stamps the release says.
            due = state.due_at is not None and state.due_at > max(event.timestamp, state.submitted_at)
            released = replace(state, version=event.version, status=TaskStatus.BLOCKED if due else TaskStatus.READY,
                               waiting_on=(), ready_at=state.due_at if due else event.timestamp)
            if event.sealed_arguments is not None:
                return replace(released, args=[], kwargs={}, sealed_arguments=event.sealed_arguments)
            if event.args is not None and state.sealed_arguments is not None:
                raise DomainError(f"task {state.task_id} has sealed arguments: a release cannot give it plain ones")
            return released if event.args is None else replace(released, args=event.args)
        case TaskDeferred():
            if not _deferrable(state):
                raise DomainError(f"task {state.task_id} is {state.status}: it cannot be deferred")
            return replace(state, version=event.version, status=TaskStatus.DEFERRED, due_at=event.due_at,
                           ready_at=event.due_at)
        case TaskReplayed():
            if state.status is not TaskStatus.DEAD_LETTERED:
                raise DomainError(f"task {state.task_id} is {state.status}: it cannot be replayed")
            _check_sealed_replay(state, event.args, event.kwargs, event.sealed_arguments)
            replayed = replace(state, version=event.version, status=TaskStatus.READY, first_attempt=state.attempts + 1,
                               ready_at=event.timestamp, finished_at=None, replays=state.replays + 1,
                               args=state.args if event.args is None else event.args,
                               kwargs=state.kwargs if event.kwargs is None else event.kwargs)
            if event.sealed_arguments is not None:
                return replace(replayed, args=[], kwargs={}, sealed_arguments=event.sealed_arguments)
            return replayed
        case TaskCancelled():
            if state.is_final:
                raise DomainError(f"task {state.task_id} is {state.status}: it cannot be cancelled")
            return replace(state, version=event.version, status=TaskStatus.CANCELLED, cancel_reason=event.reason,
                           finished_at=event.timestamp, due_at=None)
    raise DomainError(f"{event.TYPE} is not an event of a task's lifecycle")


def replay(events: Iterable[TaskEvent]) -> TaskState | None:
    """The state after all ``events``, in order; ``None`` for no events."""
    state: TaskState | None = None
    for event in events:
        state = evolve(state, event)
    return state
