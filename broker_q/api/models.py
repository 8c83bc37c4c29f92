"""The bodies the HTTP API takes and returns, as pydantic models (they make its OpenAPI schemas).

Responses are built from the same JSON-ready dicts the command line prints (``broker_q.rendering``,
``projections.cli``, ``projections.queries``...), validated into these models. Task arguments,
keyword arguments and results are shown only to principals with the ``read_payloads`` permission:
for the others they are ``null`` (or left out of event details) and ``payloads_hidden`` is true.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker_q.domain.access import Role
from broker_q.domain.schedule import Catchup, ScheduleStatus
from broker_q.domain.task import MAX_PRIORITY, TaskStatus
from broker_q.domain.workflow import WorkflowOutcome
from broker_q.wire import TaskEnvelope

__all__ = [
    "AuditPage",
    "AuditRecord",
    "BreakerEventView",
    "BreakerView",
    "CancelRequest",
    "Check",
    "DeadLetterReplay",
    "ErrorBody",
    "ErrorDetail",
    "EventPage",
    "EventRecord",
    "ForceRequest",
    "Health",
    "NextFires",
    "QueueCount",
    "QueueSummary",
    "Quota",
    "QuotaChange",
    "Readiness",
    "ReasonRequest",
    "ScheduleRequest",
    "ScheduleView",
    "StateAsOf",
    "TaskPage",
    "TaskRow",
    "TaskSubmission",
    "TaskView",
    "TenantRequest",
    "TenantView",
    "Timeline",
    "TokenCreated",
    "TokenRequest",
    "TokenView",
    "ViewState",
    "WorkflowView",
]

QUEUE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,62}$"
SCHEDULE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"
_HIDDEN = "True when arguments and results were left out: they need the read_payloads permission."
_UNREADABLE = ("Why arguments and results are null although the caller may read them: they are sealed and "
               "cannot be opened (the tenant's keys were shredded, say).")


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(_Response):
    type: str = Field(description="What kind of error, in snake case: not_found, permission_denied, "
                                  "validation_error, domain_error, store_unavailable...")
    message: str = Field(description="What went wrong, for people.")
    details: list[dict[str, Any]] | None = Field(default=None, description="Each invalid field (validation).")


class ErrorBody(_Response):
    """Every 4xx and 5xx answer of the API."""

    error: ErrorDetail


# -- tasks ----------------------------------------------------------------------------------------


class TaskSubmission(TaskEnvelope):
    """A task to record: the AMQP envelope (``docs/wire-format.md``), with the queue in the body
    (over AMQP it is the routing key) and the per-task limits of ``broker-q submit``."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="TaskSubmission")

    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN,
                              description="The queue; defaults to the task's own (or the default queue).")
    time_limit: float | None = Field(default=None, gt=0, le=7 * 86400,
                                     description="Hard time limit in seconds, overriding the task's own.")
    soft_time_limit: float | None = Field(default=None, gt=0, le=7 * 86400,
                                          description="Soft time limit in seconds, overriding the task's own.")


class TaskView(_Response):
    """A task's state, replayed from its own stream: always current."""

    id: uuid.UUID
    task: str
    state: TaskStatus
    queue: str
    tenant: str
    priority: int
    attempts: int
    version: int = Field(description="The version of the task's stream: the number of its events.")
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    result: Any = None
    payloads_hidden: bool = Field(default=False, description=_HIDDEN)
    payloads_unreadable: str | None = Field(default=None, description=_UNREADABLE)
    error: str | None = None
    traceback: str | None = None
    worker: str | None = None
    submitted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ReasonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(default="", max_length=1000, description="Why (kept in the history).")


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(default="cancelled by an operator", min_length=1, max_length=1000,
                        description="Why (kept in the task's history).")


class TimelineEvent(_Response):
    version: int
    time: datetime
    type: str
    actor: str
    details: dict[str, Any] = Field(description="The event's own fields; args, kwargs and result only with "
                                                "the read_payloads permission.")
    since_previous_seconds: float
    since_submit_seconds: float


class TimelineAttempt(_Response):
    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None = Field(description="The type of the event that ended it; null while it runs.")
    run_seconds: float | None


class TimelineTotals(_Response):
    waiting_seconds: float | None = Field(description="From submit to the first start; null if it never started.")
    attempts: list[TimelineAttempt]
    total_seconds: float | None = Field(description="From submit to the final event; null while not final.")


class Timeline(_Response):
    """A task's whole history with the time between its events (``broker-q replay ID --json``)."""

    id: uuid.UUID
    state: TaskView
    events: list[TimelineEvent]
    totals: TimelineTotals
    payloads_hidden: bool = Field(default=False, description=_HIDDEN)
    payloads_unreadable: str | None = Field(default=None, description=_UNREADABLE)


class DeadLetterReplay(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(min_length=1, max_length=1000, description="Why (kept in the task's history).")
    args: list[Any] | None = Field(default=None, description="Positional arguments that replace the task's own.")
    kwargs: dict[str, Any] | None = Field(default=None, description="Keyword arguments that replace the task's own.")
    version: int | None = Field(default=None, ge=1, description="The version at which the dead letter was seen: "
                                "if the task changed since, nothing is replayed (409).")


# -- views ----------------------------------------------------------------------------------------


class QueueSummary(_Response):
    tenant: str
    queue: str
    counts: dict[str, int] = Field(description="Tasks in each state (states with none are left out).")
    oldest_waiting_seconds: float | None = Field(description="How long the oldest ready task has waited.")


class TaskRow(_Response):
    """A task as the tasks view holds it (as fresh as the projections)."""

    id: uuid.UUID
    tenant: str
    queue: str
    task: str
    state: TaskStatus
    priority: int
    attempts: int
    version: int
    worker: str | None
    correlation_id: uuid.UUID
    submitted_at: datetime
    ready_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any = None
    payloads_hidden: bool = Field(default=False, description=_HIDDEN)
    payloads_unreadable: str | None = Field(default=None, description=_UNREADABLE)
    error_type: str | None
    error: str | None
    traceback: str | None
    position: int = Field(description="The log position of the last event the view applied to it.")


class TaskPage(_Response):
    items: list[TaskRow]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class AuditRecord(_Response):
    position: int
    time: datetime
    tenant: str
    actor: str
    stream_id: uuid.UUID
    task_id: uuid.UUID | None
    type: str
    summary: str


class AuditPage(_Response):
    items: list[AuditRecord]
    next: int | None = Field(description="Pass as `after` for the next page; null on the last page.")


class EventRecord(_Response):
    position: int
    id: uuid.UUID
    stream_id: uuid.UUID
    version: int
    time: datetime
    type: str
    tenant: str
    actor: str
    correlation_id: uuid.UUID
    causation_id: uuid.UUID | None
    details: dict[str, Any]
    payloads_hidden: bool = Field(default=False, description=_HIDDEN)
    payloads_unreadable: str | None = Field(default=None, description=_UNREADABLE)


class EventPage(_Response):
    items: list[EventRecord]
    next: int | None = Field(description="Pass as `from_position` for the next page; null on the last page.")


class QueueCount(_Response):
    tenant: str
    queue: str
    counts: dict[TaskStatus, int]
    total: int


class AsOf(_Response):
    time: datetime | None
    position: int | None


class StateAsOf(_Response):
    """A task's state, or the task counts per queue, as of a time or a log position, replayed from
    the events (``broker-q state``)."""

    as_of: AsOf
    task: TaskView | None = Field(default=None, description="With `task`: its state then; null if it did "
                                                            "not exist yet.")
    queues: list[QueueCount] | None = Field(default=None, description="Without `task`: the counts per queue.")


# -- schedules ------------------------------------------------------------------------------------


class ScheduleRequest(BaseModel):
    """A cron schedule to create, or to change to this definition (the same definition changes nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SCHEDULE_NAME_PATTERN)
    cron: str = Field(min_length=1, max_length=200,
                      description="Five fields (minute hour day month weekday), or six with seconds last.")
    task: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY)
    timezone: str = Field(default="UTC", min_length=1, max_length=100, description="An IANA name.")
    catchup: Catchup = Field(default=Catchup.SKIP, description="Ticks missed while no scheduler ran: skip them, "
                                                               "fire the latest once, or fire all.")
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)


class ScheduleView(_Response):
    id: uuid.UUID
    name: str
    tenant: str
    status: ScheduleStatus
    cron: str
    timezone: str
    catchup: Catchup
    task: str
    queue: str
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    payloads_hidden: bool = Field(default=False, description=_HIDDEN)
    payloads_unreadable: str | None = Field(default=None, description=_UNREADABLE)
    priority: int
    next_fire: datetime | None
    last_fire: datetime | None
    last_task_id: uuid.UUID | None
    fires: int
    changed_at: datetime | None
    changed_by: str | None
    reason: str | None
    version: int


class NextFires(_Response):
    name: str
    tenant: str
    next: list[AwareDatetime] = Field(description="The next ticks (UTC), whether or not the schedule is paused.")


# -- workflows ------------------------------------------------------------------------------------


class CriticalPath(_Response):
    steps: list[str]
    seconds: float


class WorkflowStepView(_Response):
    name: str
    task_id: uuid.UUID
    task: str
    state: TaskStatus
    parents: list[str]
    waiting_for: list[str]
    attempts: int
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_seconds: float
    error: str | None
    cancel_reason: str | None


class WorkflowView(_Response):
    """A workflow's steps, what blocks each blocked step, and its critical path (``broker-q workflow ID``)."""

    id: uuid.UUID
    tenant: str
    state: WorkflowOutcome
    finished: bool
    submitted_at: datetime | None
    cancel_reason: str | None
    critical_path: CriticalPath
    steps: list[WorkflowStepView]


# -- administration -------------------------------------------------------------------------------


class TokenRequest(BaseModel):
    """A new API token. It is answered once: only the hash of its secret is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.@:\-]{1,100}$", description="Who or what will hold it.")
    roles: list[Role] = Field(min_length=1, max_length=len(Role))
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN,
                               description="The one tenant it may act on; none: every tenant (admins only).")
    expires_in_seconds: float | None = Field(default=None, ge=1, le=10 * 366 * 86400,
                                             description="It stops working this long after it is made (default never).")


class TokenView(_Response):
    """What is known of a token: never its secret, nor the hash of it."""

    id: uuid.UUID
    name: str
    roles: list[Role]
    tenant: str | None = Field(description="null: every tenant")
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    active: bool


class TokenCreated(TokenView):
    token: str = Field(description="The token, shown this once: send it as `Authorization: Bearer <token>`.")


class Quota(_Response):
    """A tenant's quotas; null: no limit."""

    max_waiting: int | None = Field(default=None, description="Tasks waiting (blocked, ready, retrying) at most.")
    submit_rate: float | None = Field(default=None, description="Submissions a second, on average.")
    submit_burst: int | None = Field(default=None, description="Submissions at once above the rate.")
    max_payload_bytes: int | None = Field(default=None, description="Bytes of a task's args and kwargs (as JSON).")


class QuotaChange(BaseModel):
    """The quotas to change (null: no limit); those left out stay as they are, unless ``clear``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_waiting: int | None = Field(default=None, ge=1, le=2**62)
    submit_rate: float | None = Field(default=None, gt=0, le=1e9, allow_inf_nan=False)
    submit_burst: int | None = Field(default=None, ge=1, le=2**62)
    max_payload_bytes: int | None = Field(default=None, ge=1, le=2**62)
    clear: bool = Field(default=False, description="Every quota not given here goes back to no limit.")


class TenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TENANT_PATTERN)
    description: str = Field(default="", max_length=500)


class TenantView(_Response):
    name: str
    created_at: datetime | None = Field(description="null for a tenant given a quota without being created.")
    description: str
    quota: Quota


class BreakerView(_Response):
    """A downstream service's circuit breaker (``broker-q breakers``)."""

    service: str
    status: str
    until: datetime | None
    forced: bool
    probe: uuid.UUID | None
    failures_in_window: int
    window: float
    changed_at: datetime | None
    changed_by: str | None
    reason: str | None
    version: int


class BreakerEventView(_Response):
    version: int
    time: datetime
    type: str
    actor: str
    what: str


class ForceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(min_length=1, max_length=1000, description="Why (kept in the breaker's history).")


class ViewState(_Response):
    """A view's position in the event log, and how far it is behind (``broker-q projections status``)."""

    name: str
    generation: int
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    updated_at: datetime | None
    rebuilding: dict[str, int] | None


# -- health ---------------------------------------------------------------------------------------


class Health(_Response):
    status: str = "ok"


class Check(_Response):
    ok: bool
    error: str | None = None


class Readiness(_Response):
    status: str = Field(description="ready, or unavailable (with status 503)")
    checks: dict[str, Check] = Field(description="store and broker: whether each answered, and if not, why.")
