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
    ├── DecryptionError           a sealed payload cannot be opened (names the key id, never the plaintext)
    │   ├── PayloadCorrupted      the sealed value was altered, truncated, or moved to another task
    │   ├── UnknownKey            no key has the key id the sealed value names
    │   └── KeysShredded          the tenant's keys were shredded: its payloads are gone for good
    ├── Unauthenticated           no valid token: missing, unknown, expired or revoked
    ├── PermissionDenied          the principal's roles or tenant do not allow it (audited)
    ├── QuotaExceeded             a submission over a tenant's quota, which it names (audited)
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
    "DecryptionError",
    "DomainError",
    "KeysShredded",
    "PayloadCorrupted",
    "PermissionDenied",
    "QuotaExceeded",
    "SerializationError",
    "StoreError",
    "StoreUnavailable",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "Unauthenticated",
    "UnknownKey",
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


class DecryptionError(BrokerQError):
    """A sealed payload cannot be opened. The message names the key id; it never holds plaintext."""

    def __init__(self, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class PayloadCorrupted(DecryptionError):
    """The sealed value is malformed, was altered, or belongs to another tenant or task."""


class UnknownKey(DecryptionError):
    """No key of the tenant has the key id that the sealed value names."""


class KeysShredded(DecryptionError):
    """The tenant's keys were shredded: what was sealed under them can never be opened again."""

    def __init__(self, tenant: str, key_id: str | None = None) -> None:
        super().__init__(f"keys of tenant {tenant!r} were shredded: its payloads cannot be decrypted", key_id)
        self.tenant = tenant


class Unauthenticated(BrokerQError):
    """No valid token was given: missing, malformed, unknown, expired or revoked."""


class PermissionDenied(BrokerQError):
    """The principal may not do this; the refusal is in the audit log."""


class QuotaExceeded(BrokerQError):
    """A submission is over one of its tenant's quotas; the message names the quota. Audited."""

    def __init__(self, message: str, quota: str) -> None:
        super().__init__(message)
        self.quota = quota


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
