"""``App.replay_dead_letter`` at the version a dead letter was seen at."""

from __future__ import annotations

import uuid

import pytest

from broker_q import App, TaskStatus
from broker_q.errors import DomainError
from tests.unit.test_replay import Story


def dead_letter(story: Story, *, task: str = "charge", tenant: str = "acme") -> uuid.UUID:
    """A task that failed its only attempt, a minute after the last event of the story."""
    task_id = story.submit(task=task, tenant=tenant)
    story.start(task_id)
    story.fail(task_id, after=60)
    return task_id


def test_replaying_one_dead_letter_at_a_stale_version_is_refused(sqlite_url: str) -> None:
    story = Story()
    task_id = dead_letter(story)
    app = App(store=sqlite_url)
    app.store.append(story.log)
    with pytest.raises(DomainError, match="seen at v2: it is dead_lettered at v3"):
        app.replay_dead_letter(task_id, reason="stale", version=2)
    assert app.replay_dead_letter(task_id, reason="current", version=3).status is TaskStatus.READY
