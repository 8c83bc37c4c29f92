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
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator

from broker_q.domain.retry import RetryOverride
from broker_q.domain.task import MAX_PRIORITY
from broker_q.errors import DomainError

__all__ = [
    "ENVELOPE_CONTENT_TYPE",
    "WORK_BATCH_TYPE",
    "WORK_MESSAGE_TYPE",
    "RetryOptions",
    "TaskEnvelope",
    "WorkMessage",
    "envelope_json_schema",
]

ENVELOPE_CONTENT_TYPE = "application/json"
WORK_MESSAGE_TYPE = "broker_q.work.v1"
WORK_BATCH_TYPE = "broker_q.work-batch.v1"
"""A JSON array of work messages of one route and priority (``docs/decisions/0014-work-batches.md``)."""
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"
ClassName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*(\.([A-Za-z_]\w*|<locals>))+$",
                                             max_length=300)]
_NAMES = ("Qualified class names, e.g. 'builtins.ValueError' or 'myapp.errors.Throttled'; an error matches a "
          "name when its class or one of its bases has it.")


class RetryOptions(BaseModel):
    """Changes to the task's retry policy for this one task: each field given replaces the policy's own."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="broker_q retry options")

    max_attempts: int | None = Field(default=None, ge=1, le=1000, description="Attempts in all, the first included.")
    backoff: float | None = Field(default=None, ge=0, le=7 * 86400, description="Seconds before the first retry.")
    factor: float | None = Field(default=None, ge=1, le=100, description="Each retry waits this many times longer.")
    backoff_max: float | None = Field(default=None, ge=0, le=7 * 86400, description="The longest wait, in seconds.")
    jitter: bool | None = Field(default=None, description="Draw each wait from [wait / 2, wait].")
    retry_on: list[ClassName] | None = Field(default=None, max_length=100, description=f"Errors retried. {_NAMES}")
    dont_retry_on: list[ClassName] | None = Field(
        default=None, max_length=100, description=f"Errors never retried, even when also in retry_on. {_NAMES}")

    def override(self) -> RetryOverride:
        return RetryOverride.from_json(self.model_dump(exclude_none=True))


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
    retry: RetryOptions | None = Field(
        default=None, description="Changes to the task's retry policy for this task; each field given replaces "
        "the policy's own.")


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
    retry: RetryOverride | None = Field(default=None, description="This task's own changes to its retry policy.")
    sealed_arguments: str | None = Field(
        default=None, description="args and kwargs sealed under the tenant's key (args and kwargs are empty then).")

    @field_validator("retry", mode="plain")
    @classmethod
    def _retry(cls, value: Any) -> RetryOverride | None:
        if value is None or isinstance(value, RetryOverride):
            return value
        try:
            return RetryOverride.from_json(value)
        except (DomainError, TypeError) as e:
            raise ValueError(str(e)) from e

    @field_serializer("retry")
    def _retry_json(self, value: RetryOverride | None) -> dict[str, Any] | None:
        return None if value is None else value.to_json()


def envelope_json_schema() -> str:
    """The JSON Schema of :class:`TaskEnvelope`, as published in ``docs/wire-format.md``."""
    return json.dumps(TaskEnvelope.model_json_schema(), indent=2, sort_keys=True)
