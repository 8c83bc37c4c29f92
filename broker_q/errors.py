"""The exceptions a broker_q user can catch.

Every error raised by broker_q derives from :class:`BrokerQError`. Errors of the libraries underneath
(sqlite3, psycopg, aiormq, eventsourcing) are translated at the adapter that meets them and never
leak past it::

    BrokerQError
    ├── ConfigurationError        bad settings, bad store URL, unknown app reference
    ├── ValidationError           a task spec or message that can never be accepted
    │   └── SerializationError    arguments or a result that is not JSON
    ├── UnknownTask               no handler is registered under that name
    ├── TaskNotFound              no task has that id
    ├── DomainError               an illegal state transition (raised by the domain)
    ├── StoreError
    │   ├── ConcurrencyConflict   the expected stream version was taken: someone else wrote first
    │   └── StoreUnavailable      the event store cannot be reached now; the call may be retried
    ├── BrokerUnavailable         RabbitMQ cannot be reached now
    ├── TaskFailed                raised by ``TaskHandle.wait`` when the task ended in failure
    │   └── TaskCancelled
    ├── (in ``broker_q.limits``, raised inside or for a handler)
    │   SoftTimeLimitExceeded, TimeLimitExceeded, AttemptCancelled (raised in a sync handler's
    │   thread), HandlerError (an isolated handler's own error)
    └── (in ``broker_q.threads``) ThreadsExhausted   a worker stopped: too many handler threads lost
    TimeoutError (builtin)        raised by waits that run out of time
"""

from __future__ import annotations

__all__ = [
    "BrokerQError",
    "BrokerUnavailable",
    "ConcurrencyConflict",
    "ConfigurationError",
    "DomainError",
    "SerializationError",
    "StoreError",
    "StoreUnavailable",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "UnknownTask",
    "ValidationError",
]


class BrokerQError(Exception):
    """Root of every error broker_q raises."""


class ConfigurationError(BrokerQError):
    """A setting, store URL or application reference is wrong."""


class ValidationError(BrokerQError):
    """A task specification or message can never be accepted as it is."""


class SerializationError(ValidationError):
    """A value that must travel as JSON (arguments, results) is not JSON-serialisable."""


class UnknownTask(BrokerQError):
    """No handler is registered under the given task name."""


class TaskNotFound(BrokerQError):
    """No task with the given id exists in the event store."""


class DomainError(BrokerQError):
    """A command is illegal in the task's current state."""


class StoreError(BrokerQError):
    """The event store refused or failed an operation."""


class ConcurrencyConflict(StoreError):
    """An event was appended at a stream version that another writer already took."""


class StoreUnavailable(StoreError):
    """The event store cannot be reached now; the operation may succeed if retried."""


class BrokerUnavailable(BrokerQError):
    """RabbitMQ cannot be reached now."""


class TaskFailed(BrokerQError):
    """The awaited task ended in failure; ``error_type`` and ``traceback`` say why."""

    def __init__(self, task_id: str, error_type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"task {task_id} failed: {error_type}: {message}")
        self.task_id = task_id
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class TaskCancelled(TaskFailed):
    """The awaited task was cancelled before it could succeed."""
