"""The event store: the port, its adapter on ``eventsourcing``, and the group-commit writer."""

from broker_q.store.eventsourcing import RecorderEventStore, open_store, store_environment
from broker_q.store.port import AppendResult, EventStore, Recorded
from broker_q.store.writer import GroupCommitWriter

__all__ = [
    "AppendResult",
    "EventStore",
    "GroupCommitWriter",
    "Recorded",
    "RecorderEventStore",
    "open_store",
    "store_environment",
]
