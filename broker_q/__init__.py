"""broker_q: an event-sourced distributed task queue on RabbitMQ.

Every change of a task's state is an immutable event in an event store; a relay publishes the
events to RabbitMQ; workers run handlers and record the outcomes. See ``README.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker_q.app import App, TaskDefinition, TaskHandle
    from broker_q.canvas import Signature, chain, chord, dag, group
    from broker_q.domain.retry import Retry, RetryOverride, RetryPolicy
    from broker_q.domain.task import TaskState, TaskStatus
    from broker_q.errors import (
        BrokerQError,
        BrokerUnavailable,
        ConcurrencyConflict,
        ConfigurationError,
        DecryptionError,
        DomainError,
        KeysShredded,
        PayloadCorrupted,
        PermissionDenied,
        QuotaExceeded,
        SerializationError,
        StoreError,
        StoreUnavailable,
        TaskCancelled,
        TaskFailed,
        TaskNotFound,
        Unauthenticated,
        UnknownKey,
        UnknownTask,
        ValidationError,
    )
    from broker_q.limits import AttemptCancelled, SoftTimeLimitExceeded, TimeLimitExceeded
    from broker_q.middleware import Middleware
    from broker_q.settings import Settings
    from broker_q.threads import cancelled
    from broker_q.workflows import WorkflowHandle

__all__ = [
    "App",
    "AttemptCancelled",
    "BrokerQError",
    "BrokerUnavailable",
    "ConcurrencyConflict",
    "ConfigurationError",
    "DecryptionError",
    "DomainError",
    "KeysShredded",
    "Middleware",
    "PayloadCorrupted",
    "PermissionDenied",
    "QuotaExceeded",
    "Retry",
    "RetryOverride",
    "RetryPolicy",
    "SerializationError",
    "Settings",
    "Signature",
    "SoftTimeLimitExceeded",
    "StoreError",
    "StoreUnavailable",
    "TaskCancelled",
    "TaskDefinition",
    "TaskFailed",
    "TaskHandle",
    "TaskNotFound",
    "TaskState",
    "TaskStatus",
    "TimeLimitExceeded",
    "Unauthenticated",
    "UnknownKey",
    "UnknownTask",
    "ValidationError",
    "WorkflowHandle",
    "cancelled",
    "chain",
    "chord",
    "dag",
    "group",
]

# Importing the package imports nothing else: ``import broker_q.domain`` must not pull in the store,
# the broker client or pydantic, so the names below are loaded on first use.
_WHERE = {
    "App": "broker_q.app",
    "TaskDefinition": "broker_q.app",
    "TaskHandle": "broker_q.app",
    "Retry": "broker_q.domain.retry",
    "RetryOverride": "broker_q.domain.retry",
    "RetryPolicy": "broker_q.domain.retry",
    "AttemptCancelled": "broker_q.limits",
    "SoftTimeLimitExceeded": "broker_q.limits",
    "TimeLimitExceeded": "broker_q.limits",
    "Middleware": "broker_q.middleware",
    "TaskState": "broker_q.domain.task",
    "TaskStatus": "broker_q.domain.task",
    "Settings": "broker_q.settings",
    "cancelled": "broker_q.threads",
    "Signature": "broker_q.canvas",
    "chain": "broker_q.canvas",
    "chord": "broker_q.canvas",
    "dag": "broker_q.canvas",
    "group": "broker_q.canvas",
    "WorkflowHandle": "broker_q.workflows",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'broker_q' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE.get(name, "broker_q.errors")), name)
    globals()[name] = value
    return value
