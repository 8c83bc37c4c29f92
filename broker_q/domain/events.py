"""The events of broker_q: immutable facts, one stream per task.

Every event names its stream (``stream_id``) and its position in it (``version``, from 1). The pair
is unique in the store, which is what makes appends with an expected version safe. Each class has a
stable ``TOPIC``: the name under which it is stored, independent of where the class lives, so that
moving or renaming a class never orphans stored events.

Metadata carried by every event:

- ``timestamp``: when the event was decided (UTC, aware);
- ``tenant``: who owns the stream;
- ``actor``: who caused it (``client:<host>:<pid>``, ``worker:<id>``, ``relay``, ``system``...);
- ``correlation_id``: the id shared by everything one request set in motion (a task's own id
  unless a caller passes one through);
- ``causation_id``: the id of the event or message that directly caused this one, if any.

An event's own id is derived from its stream and version (see :func:`event_id`), so it costs no
storage and is the same wherever it is computed.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

__all__ = [
    "TOPICS",
    "AccessDenied",
    "AccessEvent",
    "BreakerClosed",
    "BreakerEvent",
    "BreakerFailureRecorded",
    "BreakerOpened",
    "BreakerProbeStarted",
    "Event",
    "IngressRejected",
    "KeyRotated",
    "KeysEvent",
    "KeysShredded",
    "QuotaExceeded",
    "ScheduleChanged",
    "ScheduleCreated",
    "ScheduleDefined",
    "ScheduleEvent",
    "ScheduleFired",
    "ScheduleIndexed",
    "SchedulePaused",
    "ScheduleRemoved",
    "ScheduleResumed",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskDeferred",
    "TaskEvent",
    "TaskReleased",
    "TaskReplayed",
    "TaskRetryScheduled",
    "TaskStarted",
    "TaskSubmitted",
    "TaskSucceeded",
    "TenantCreated",
    "TenantEvent",
    "TenantQuotaSet",
    "TokenIssued",
    "TokenRevoked",
    "WorkflowCancelled",
    "WorkflowEvent",
    "WorkflowSubmitted",
    "event_id",
    "keys_stream_id",
]

_EVENT_NS = uuid.UUID("6f1d5f3e-6a51-4d1e-9c77-0b7c1f3f2a10")
_EVENT_NS_SHA1 = hashlib.sha1(_EVENT_NS.bytes, usedforsecurity=False)
_UUID5_CLEAR = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_UUID5_SET = (0x8000 << 48) | (5 << 76)  # RFC 4122 variant, version 5


def event_id(stream_id: uuid.UUID, version: int) -> uuid.UUID:
    """The id of the event at ``version`` of ``stream_id``: deterministic, never stored.

    It is ``uuid5(_EVENT_NS, f"{stream_id.hex}:{version}")``, bit for bit (stored causation ids name
    events by it), computed from the namespace's SHA-1 state hashed once: a worker derives two per
    task, and ``uuid.uuid5`` spends most of its time around the hash rather than in it.
    """
    digest = _EVENT_NS_SHA1.copy()
    digest.update(f"{stream_id.hex}:{version}".encode())
    return uuid.UUID(int=int.from_bytes(digest.digest()[:16]) & _UUID5_CLEAR | _UUID5_SET)


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """What every stored event carries."""

    TOPIC: ClassVar[str]
    TYPE: ClassVar[str]
    """Short lowercase name used in routing keys, the CLI and the audit log."""

    stream_id: uuid.UUID
    version: int
    timestamp: datetime
    tenant: str
    actor: str
    correlation_id: uuid.UUID
    causation_id: uuid.UUID | None = None

    @property
    def id(self) -> uuid.UUID:
        return event_id(self.stream_id, self.version)


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskEvent(Event):
    """An event of a task's stream; ``stream_id`` is the task id."""

    @property
    def task_id(self) -> uuid.UUID:
        return self.stream_id


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskSubmitted(TaskEvent):
    """A task was accepted. With nothing to wait for, it is ready to run at once."""

    TOPIC = "broker_q.task.submitted"
    TYPE = "submitted"

    task: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    priority: int = 5
    idempotency_key: str | None = None
    max_attempts: int | None = None
    """Overrides the task's retry policy for this task: attempts in all, the first included."""
    time_limit: float | None = None
    """Overrides the task's hard time limit (seconds) for this task."""
    soft_time_limit: float | None = None
    """Overrides the task's soft time limit (seconds) for this task."""
    retry: dict[str, Any] | None = None
    """Overrides fields of the task's retry policy for this task, each one given replacing the
    policy's own (:class:`~broker_q.domain.retry.RetryOverride` without ``max_attempts``, which is
    the field above): ``backoff``, ``factor``, ``backoff_max``, ``jitter``, and ``retry_on`` and
    ``dont_retry_on`` as lists of qualified class names."""
    due_at: datetime | None = None
    """Not to start before this time (``eta``/``countdown``): until then the task is blocked."""
    depends_on: list[uuid.UUID] = field(default_factory=list)
    """Parent tasks that must all succeed first: until then the task is blocked."""
    receives: str | None = None
    """What the task receives from its parents when released, before its own ``args``: ``result``
    (the one parent's result) or ``results`` (the list of the parents' results, in ``depends_on``
    order); None for nothing."""
    sealed_arguments: str | None = None
    """``args`` and ``kwargs`` sealed together under the tenant's key (``docs/decisions/0008``): the
    sealed JSON object ``{"args": [...], "kwargs": {...}}``. When it is set, ``args`` and ``kwargs``
    are empty; None when the task was submitted with encryption off."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskReleased(TaskEvent):
    """Every parent of a blocked task succeeded (decided by the coordinator); it is ready, or due at
    its ``due_at``. ``args`` are the arguments it runs with when its parents' results were passed in."""

    TOPIC = "broker_q.task.released"
    TYPE = "released"

    args: list[Any] | None = None
    sealed_arguments: str | None = None
    """Instead of ``args``, when the task's arguments or its parents' results are sealed: the
    arguments it runs with, sealed for this task (``args`` is None then)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskStarted(TaskEvent):
    """A worker began attempt number ``attempt`` (from 1)."""

    TOPIC = "broker_q.task.started"
    TYPE = "started"

    attempt: int
    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskSucceeded(TaskEvent):
    """The running attempt returned ``result`` (JSON)."""

    TOPIC = "broker_q.task.succeeded"
    TYPE = "succeeded"

    result: Any = None
    sealed_result: str | None = None
    """The result sealed under the tenant's key (the sealed JSON object ``{"result": ...}``); ``result``
    is None then."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskRetryScheduled(TaskEvent):
    """The running attempt failed (or timed out) and the task will run again at ``due_at``.

    One event, not a failure and then a schedule: it carries the attempt's error. Until ``due_at``
    the task waits in the store, not in any queue or worker; the scheduler publishes it when due.
    """

    TOPIC = "broker_q.task.retry_scheduled"
    TYPE = "retry_scheduled"

    due_at: datetime
    error_type: str
    message: str
    traceback: str | None = None
    timed_out: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskDeadLettered(TaskEvent):
    """The running attempt failed and the task will not run again by itself: its last attempt, or an
    error that is not retried. It stays a dead letter until someone replays it."""

    TOPIC = "broker_q.task.dead_lettered"
    TYPE = "dead_lettered"

    error_type: str
    message: str
    traceback: str | None = None
    timed_out: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskDeferred(TaskEvent):
    """The task was not started and will be offered again at ``due_at``; no attempt was spent
    (its service's circuit breaker was open, say)."""

    TOPIC = "broker_q.task.deferred"
    TYPE = "deferred"

    due_at: datetime
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskReplayed(TaskEvent):
    """A dead letter was sent to run again by ``actor``, for ``reason``; it is ready at once.

    ``args`` and ``kwargs`` are set when the replay changed them (what is run from now on); the
    retry budget starts again from the next attempt.
    """

    TOPIC = "broker_q.task.replayed"
    TYPE = "replayed"

    reason: str
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    sealed_arguments: str | None = None
    """Instead of ``args`` and ``kwargs``, when the task's arguments are sealed: the whole arguments
    it runs with from now on, sealed (``args`` and ``kwargs`` are None then)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskCancelled(TaskEvent):
    """The task was cancelled before it reached an outcome; it will never run (again)."""

    TOPIC = "broker_q.task.cancelled"
    TYPE = "cancelled"

    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class IngressRejected(Event):
    """A message published to the ingress exchange was refused and moved to the invalid-message queue.

    Its stream is the rejected message's own (one event), so the audit trail keeps every refusal.
    The body itself is not stored (it may be large or hold secrets): its size and SHA-256 are.
    """

    TOPIC = "broker_q.ingress.rejected"
    TYPE = "ingress_rejected"

    reason: str
    queue: str
    message_id: str | None
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True, slots=True)
class KeysEvent(Event):
    """An event of a tenant's keys stream (one per tenant, :func:`keys_stream_id`): what was done to
    its payload keys, for the audit log. The keys themselves are never in an event."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyRotated(KeysEvent):
    """``key_id`` became the tenant's current key; payloads sealed under older keys still open."""

    TOPIC = "broker_q.keys.rotated"
    TYPE = "key_rotated"

    key_id: str
    generation: int
    previous_key_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class KeysShredded(KeysEvent):
    """Every key of the tenant was erased: its sealed payloads can never be opened again, and none
    are sealed anew. Its events stay, as an audit skeleton."""

    TOPIC = "broker_q.keys.shredded"
    TYPE = "keys_shredded"

    key_ids: list[str]
    reason: str = ""


_KEYS_NS = uuid.UUID("3c0e8f52-7d1b-5a49-b6e2-41f9a0d7c813")


def keys_stream_id(tenant: str) -> uuid.UUID:
    """The id of ``tenant``'s keys stream."""
    return uuid.uuid5(_KEYS_NS, tenant)


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerEvent(Event):
    """An event of a circuit breaker's stream: one stream per downstream service, shared by all workers."""

    service: str


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerFailureRecorded(BreakerEvent):
    """A task of the service failed while the breaker was closed."""

    TOPIC = "broker_q.breaker.failure_recorded"
    TYPE = "breaker_failure"

    task_id: uuid.UUID
    error_type: str


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerOpened(BreakerEvent):
    """The breaker opened: the service's tasks wait until ``until`` (forever if None, until closed by hand)."""

    TOPIC = "broker_q.breaker.opened"
    TYPE = "breaker_opened"

    until: datetime | None
    reason: str
    forced: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerProbeStarted(BreakerEvent):
    """The breaker is half open and one task, ``task_id``, runs as the probe (until ``until`` at most)."""

    TOPIC = "broker_q.breaker.probe_started"
    TYPE = "breaker_probe"

    task_id: uuid.UUID
    until: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerClosed(BreakerEvent):
    """The breaker closed: the probe succeeded, or an operator closed it."""

    TOPIC = "broker_q.breaker.closed"
    TYPE = "breaker_closed"

    reason: str
    forced: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleEvent(Event):
    """An event of a cron schedule's stream: one stream per schedule, ``uuid5`` of its tenant and name."""

    name: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleDefined(ScheduleEvent):
    """What a schedule runs and when: the whole definition, as created or as changed."""

    cron: str
    """A croniter expression: five fields, or six with seconds last."""
    task: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    priority: int = 5
    timezone: str = "UTC"
    """The IANA zone the cron expression is read in (``Europe/Paris``)."""
    catchup: str = "skip"
    """What happens to ticks that did not fire on time: ``skip``, ``once`` or ``all``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleCreated(ScheduleDefined):
    """A schedule was created (or created again after its removal): it fires from now on."""

    TOPIC = "broker_q.schedule.created"
    TYPE = "schedule_created"


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleChanged(ScheduleDefined):
    """A schedule's definition was replaced by this one."""

    TOPIC = "broker_q.schedule.changed"
    TYPE = "schedule_changed"


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulePaused(ScheduleEvent):
    """The schedule fires no more until it is resumed."""

    TOPIC = "broker_q.schedule.paused"
    TYPE = "schedule_paused"

    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleResumed(ScheduleEvent):
    """The schedule fires again; its ``catchup`` decides what happens to the ticks it missed."""

    TOPIC = "broker_q.schedule.resumed"
    TYPE = "schedule_resumed"

    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleRemoved(ScheduleEvent):
    """The schedule fires no more; its name may be used for a new schedule (its stream goes on)."""

    TOPIC = "broker_q.schedule.removed"
    TYPE = "schedule_removed"

    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleFired(ScheduleEvent):
    """The tick at ``fire_time`` fired: the task ``task_id`` was submitted in the same transaction."""

    TOPIC = "broker_q.schedule.fired"
    TYPE = "schedule_fired"

    fire_time: datetime
    task_id: uuid.UUID


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleIndexed(Event):
    """An entry of the schedule index, the one stream that names every schedule of every tenant.

    Appended with each change of a schedule's definition or status (not with its fires), so that a
    scheduler learns of every schedule and every change by reading one stream from where it stopped.
    """

    TOPIC = "broker_q.schedule.indexed"
    TYPE = "schedule_indexed"

    schedule_id: uuid.UUID
    schedule_tenant: str
    name: str
    schedule_version: int
    change: str
    """The ``TYPE`` of the schedule's event at ``schedule_version``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowEvent(Event):
    """An event of a workflow's stream: one stream per workflow (a random id), in the workflow's tenant."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowSubmitted(WorkflowEvent):
    """A workflow was recorded, in one transaction with the ``submitted`` of every one of its steps.

    ``steps`` are in an order where every step comes after its parents: each is a JSON object
    ``{"name": ..., "task_id": ..., "task": ..., "parents": [names]}`` (``task_id`` as UUID text).
    ``returns`` names the step whose result is the workflow's result, or (a list) the steps whose
    results, in that order, make the list that is.
    """

    TOPIC = "broker_q.workflow.submitted"
    TYPE = "workflow_submitted"

    steps: list[dict[str, Any]]
    returns: str | list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowCancelled(WorkflowEvent):
    """The workflow was cancelled: every step of it not final by then is cancelled after this event."""

    TOPIC = "broker_q.workflow.cancelled"
    TYPE = "workflow_cancelled"

    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessEvent(Event):
    """An event of the access stream, the one stream of every API token (``ACCESS_STREAM``).

    ``tenant`` is the tenant the token is bound to, or ``*`` for a token of every tenant.
    """

    token_id: uuid.UUID


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenIssued(AccessEvent):
    """A token was made for a principal. Only the SHA-256 of its secret is kept: the token itself
    was shown once, to whoever made it."""

    TOPIC = "broker_q.access.token_issued"
    TYPE = "token_issued"

    name: str
    roles: list[str]
    secret_sha256: str
    expires_at: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenRevoked(AccessEvent):
    """The token no longer authenticates anyone."""

    TOPIC = "broker_q.access.token_revoked"
    TYPE = "token_revoked"

    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessDenied(Event):
    """A principal was refused an action. Its stream is the refusal's own (one event)."""

    TOPIC = "broker_q.access.denied"
    TYPE = "access_denied"

    principal: str
    token_id: uuid.UUID | None
    permission: str
    action: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantEvent(Event):
    """An event of the tenants stream, the one stream of every tenant and its quotas (``TENANTS_STREAM``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantCreated(TenantEvent):
    """An admin created the tenant ``tenant``."""

    TOPIC = "broker_q.tenant.created"
    TYPE = "tenant_created"

    description: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantQuotaSet(TenantEvent):
    """The tenant's quotas, all of them as they now are (``None``: no limit)."""

    TOPIC = "broker_q.tenant.quota_set"
    TYPE = "tenant_quota_set"

    max_waiting: int | None = None
    """Tasks of the tenant waiting (blocked, ready or scheduled for a retry) at most."""
    submit_rate: float | None = None
    """Submissions per second, on average (a token bucket)."""
    submit_burst: int | None = None
    """Submissions at once above the rate (the bucket's size); the rate rounded up when not given."""
    max_payload_bytes: int | None = None
    """Bytes of a task's arguments (args and kwargs as JSON) at most."""


@dataclass(frozen=True, kw_only=True, slots=True)
class QuotaExceeded(Event):
    """A submission was refused over a tenant's quota. Its stream is the refusal's own (one event)."""

    TOPIC = "broker_q.tenant.quota_exceeded"
    TYPE = "quota_exceeded"

    quota: str
    limit: float
    task: str
    message: str


TOPICS: dict[str, type[Event]] = {
    cls.TOPIC: cls
    for cls in (TaskSubmitted, TaskStarted, TaskSucceeded, TaskRetryScheduled, TaskDeadLettered, TaskDeferred,
                TaskReplayed, TaskCancelled, TaskReleased, IngressRejected, BreakerFailureRecorded, BreakerOpened,
                BreakerProbeStarted, BreakerClosed,
                ScheduleCreated, ScheduleChanged, SchedulePaused, ScheduleResumed, ScheduleRemoved, ScheduleFired,
                ScheduleIndexed, WorkflowSubmitted, WorkflowCancelled, KeyRotated, KeysShredded,
                TokenIssued, TokenRevoked, AccessDenied, TenantCreated, TenantQuotaSet, QuotaExceeded)
}
"""Every stored topic and the class that reads it. A renamed topic stays here, mapped to its class."""
