"""broker_q: an event-sourced distributed task queue on RabbitMQ.

Every change of a task's state is an immutable event in an event store; a relay publishes the
events to RabbitMQ; workers run handlers and record the outcomes. See ``README.md``.
"""

from broker_q.app import App, TaskDefinition, TaskHandle
from broker_q.domain.task import TaskState, TaskStatus
from broker_q.errors import (
    BrokerQError,
    BrokerUnavailable,
    ConcurrencyConflict,
    ConfigurationError,
    DomainError,
    SerializationError,
    StoreError,
    StoreUnavailable,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    UnknownTask,
    ValidationError,
)
from broker_q.settings import Settings

__all__ = [
    "App",
    "BrokerQError",
    "BrokerUnavailable",
    "ConcurrencyConflict",
    "ConfigurationError",
    "DomainError",
    "SerializationError",
    "Settings",
    "StoreError",
    "StoreUnavailable",
    "TaskCancelled",
    "TaskDefinition",
    "TaskFailed",
    "TaskHandle",
    "TaskNotFound",
    "TaskState",
    "TaskStatus",
    "UnknownTask",
    "ValidationError",
]
