"""The read side of broker_q: views built only from the event stream (built out by the projections work)."""

from projections.replay import Attempt, Timeline, TimelineRow, events, queue_counts_at, task_state_at, timeline

__all__: list[str] = [
    "Attempt",
    "Timeline",
    "TimelineRow",
    "events",
    "queue_counts_at",
    "task_state_at",
    "timeline",
]
