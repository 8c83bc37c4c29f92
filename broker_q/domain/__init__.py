"""The domain of broker_q: events and the task state machine. It performs no I/O and reads no clock."""

from broker_q.domain.events import (
    TOPICS,
    Event,
    IngressRejected,
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    event_id,
)
from broker_q.domain.task import FINAL_STATES, MAX_PRIORITY, TaskState, TaskStatus, evolve, replay

__all__ = [
    "FINAL_STATES",
    "MAX_PRIORITY",
    "TOPICS",
    "Event",
    "IngressRejected",
    "TaskCancelled",
    "TaskEvent",
    "TaskFailed",
    "TaskStarted",
    "TaskState",
    "TaskStatus",
    "TaskSubmitted",
    "TaskSucceeded",
    "event_id",
    "evolve",
    "replay",
]
