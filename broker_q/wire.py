"""The messages broker_q exchanges over AMQP, as pydantic models (``docs/wire-format.md``).

- :class:`TaskEnvelope`: what any AMQP client publishes to the ingress exchange to submit a task.
  The minimum is ``{"task": NAME}``; routing key = queue name.
- :class:`WorkMessage`: what the relay publishes to the work exchange for a task that became ready.
  It carries everything a worker needs, including the stream version at which the task became
  ready, so that the worker appends ``started`` at the next version without reading the task.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker_q.domain.task import MAX_PRIORITY

__all__ = ["ENVELOPE_CONTENT_TYPE", "WORK_MESSAGE_TYPE", "TaskEnvelope", "WorkMessage", "envelope_json_schema"]

ENVELOPE_CONTENT_TYPE = "application/json"
WORK_MESSAGE_TYPE = "broker_q.work.v1"
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"


class TaskEnvelope(BaseModel):
    """A task submitted over AMQP by any client (published to ``broker_q.ingress``, routing key = queue)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="broker_q task envelope")

    task: str = Field(pattern=NAME_PATTERN, description="Registered task name, e.g. 'add' or 'billing.charge'.")
    args: list[Any] = Field(default_factory=list, description="Positional arguments (JSON values).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments (JSON values).")
    priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY, description="0 (lowest) to 9 (highest).")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="The same key (per tenant) always names the same task: a resend is not a second task. "
        "The AMQP message_id property is used when this is absent.",
    )
    tenant: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")
    correlation_id: uuid.UUID | None = Field(default=None, description="Shared by all tasks of one request.")
    eta: AwareDatetime | None = Field(
        default=None, description="Not to start before this time: ISO 8601 with a UTC offset, e.g. "
        "'2026-12-04T09:00:00+00:00'. The task is blocked until then.")
    countdown: float | None = Field(default=None, ge=0, le=366 * 86400,
                                    description="Not to start before this many seconds from now (not with eta).")
    depends_on: list[uuid.UUID] = Field(
        default_factory=list, max_length=10_000,
        description="Ids of tasks that must all succeed first; if one fails for good (or does not exist), "
        "this task is cancelled with the reason upstream_failed.")


class WorkMessage(BaseModel):
    """A task ready to run, published by the relay to the work exchange (routing key = queue)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: uuid.UUID
    version: int = Field(ge=1, description="Stream version at which the task became ready.")
    attempt: int = Field(ge=1, description="The attempt number this delivery starts.")
    task: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    tenant: str
    correlation_id: uuid.UUID
    first_attempt: int = Field(default=1, ge=1, description="The attempt the retry budget counts from.")
    max_attempts: int | None = Field(default=None, description="This task's own attempt budget, if it has one.")
    time_limit: float | None = Field(default=None, description="This task's own hard time limit, in seconds.")
    soft_time_limit: float | None = Field(default=None, description="This task's own soft time limit, in seconds.")


def envelope_json_schema() -> str:
    """The JSON Schema of :class:`TaskEnvelope`, as published in ``docs/wire-format.md``."""
    return json.dumps(TaskEnvelope.model_json_schema(), indent=2, sort_keys=True)
