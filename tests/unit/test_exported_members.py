"""The public names of each package, pinned: adding or removing one is a decision, not an accident."""

from __future__ import annotations

import importlib

import pytest

EXPORTED = {
    "broker_q": [
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
        "Signature",
        "ValidationError",
        "WorkflowHandle",
        "cancelled",
        "chain",
        "chord",
        "dag",
        "group",
    ],
    "broker_q.limits": [
        "AttemptCancelled",
        "HandlerError",
        "Isolation",
        "SoftTimeLimitExceeded",
        "TimeLimitExceeded",
        "abandoned_threads",
        "run_handler",
    ],
    "broker_q.threads": ["HandlerThreads", "ThreadCall", "ThreadsExhausted", "abandoned_threads", "cancelled"],
    "broker_q.domain": [
        "BreakerClosed",
        "BreakerEvent",
        "BreakerFailureRecorded",
        "BreakerOpened",
        "BreakerProbeStarted",
        "Event",
        "FINAL_STATES",
        "IngressRejected",
        "MAX_PRIORITY",
        "ScheduleChanged",
        "ScheduleCreated",
        "ScheduleEvent",
        "ScheduleFired",
        "ScheduleIndexed",
        "SchedulePaused",
        "ScheduleRemoved",
        "ScheduleResumed",
        "TOPICS",
        "TaskCancelled",
        "TaskDeadLettered",
        "TaskDeferred",
        "TaskEvent",
        "TaskReplayed",
        "TaskRetryScheduled",
        "TaskStarted",
        "TaskState",
        "TaskStatus",
        "TaskSubmitted",
        "TaskSucceeded",
        "WorkflowCancelled",
        "WorkflowSubmitted",
        "event_id",
        "evolve",
        "replay",
    ],
    "broker_q.store": [
        "AppendResult",
        "EventStore",
        "GroupCommitWriter",
        "Recorded",
        "RecorderEventStore",
        "open_store",
        "store_environment",
    ],
    "broker_q.canvas": ["DAG", "Canvas", "Chain", "Group", "Signature", "StepOptions", "chain", "chord",
                        "compile_workflow", "dag", "group"],
    "broker_q.workflows": ["WorkflowHandle", "Workflows", "add_commands", "status_json"],
    "broker_q.payloads": ["Payloads", "arguments_size", "reveal"],
    "broker_q.keys": ["KeyInfo", "Keys", "add_commands"],
    "broker_q.amqp": ["REASON_HEADER", "Topology", "connect", "redact"],
    "broker_q.api": ["create_api", "serve"],
    "broker_q.dashboard": ["install"],
    "broker_q.errors": [
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
    ],
}


@pytest.mark.parametrize(("module_name", "names"), EXPORTED.items(), ids=list(EXPORTED))
def test_all_is_pinned(module_name: str, names: list[str]) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(names)
    assert len(set(module.__all__)) == len(module.__all__), "a name is exported twice"


@pytest.mark.parametrize(("module_name", "names"), EXPORTED.items(), ids=list(EXPORTED))
def test_every_exported_name_exists(module_name: str, names: list[str]) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing


def test_every_error_derives_from_the_root() -> None:
    errors = importlib.import_module("broker_q.errors")
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.BrokerQError), name


def test_the_root_package_re_exports_the_same_objects() -> None:
    root = importlib.import_module("broker_q")
    errors = importlib.import_module("broker_q.errors")
    domain = importlib.import_module("broker_q.domain")
    for name in errors.__all__:
        assert getattr(root, name) is getattr(errors, name), name
    assert root.TaskState is domain.TaskState
    assert root.TaskStatus is domain.TaskStatus
    limits = importlib.import_module("broker_q.limits")
    threads = importlib.import_module("broker_q.threads")
    assert root.AttemptCancelled is limits.AttemptCancelled
    assert root.SoftTimeLimitExceeded is limits.SoftTimeLimitExceeded
    assert root.cancelled is threads.cancelled
    assert limits.abandoned_threads is threads.abandoned_threads
    for error in (limits.AttemptCancelled, limits.SoftTimeLimitExceeded, threads.ThreadsExhausted):
        assert issubclass(error, errors.BrokerQError), error
