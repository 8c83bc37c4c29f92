"""App.schedule and app.schedules on the in-memory store: checks, idempotence, and a scheduler's passes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from broker_q import App, TaskStatus
from broker_q.domain.events import ScheduleFired
from broker_q.domain.schedule import ScheduleStatus, schedule_id
from broker_q.errors import DomainError, SerializationError, UnknownTask, ValidationError
from broker_q.scheduler import Scheduler


@pytest.fixture
def app() -> Iterator[App]:
    app = App(store="memory://")

    @app.task(name="report", queue="reports", priority=7)
    def report(format: str, pages: int = 1) -> str:
        return format * pages

    yield app
    app.close()


def test_a_schedule_takes_its_queue_and_priority_from_its_task(app: App) -> None:
    state = app.schedule("nightly", cron="0 2 * * *", task="report", kwargs={"format": "pdf"},
                         timezone="Europe/Paris")
    definition = state.definition
    assert (definition.queue, definition.priority, definition.kwargs, definition.catchup.value) == (
        "reports", 7, {"format": "pdf"}, "skip")
    assert (state.version, state.status, state.tenant) == (1, ScheduleStatus.ACTIVE, "default")
    overridden = app.schedule("nightly", cron="0 2 * * *", task="report", kwargs={"format": "pdf"},
                              timezone="Europe/Paris", queue="urgent", priority=9)
    assert (overridden.version, overridden.definition.queue, overridden.definition.priority) == (2, "urgent", 9)


def test_the_same_definition_twice_is_one_schedule_event(app: App) -> None:
    for _ in range(3):
        app.schedule("nightly", cron="0 2 * * *", task="report", args=["csv"])
    assert [e.TYPE for e in app.schedules.history("nightly")] == ["schedule_created"]


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"task": "reprot"}, UnknownTask, "no task named 'reprot' is registered in this app; it registers report"),
    ({"kwargs": {"colour": "red"}}, ValidationError, "arguments do not fit report"),
    ({"args": [datetime(2030, 1, 1, tzinfo=UTC)]}, SerializationError, "args\\[0\\] is a datetime"),
    ({"cron": "0 2 * *"}, ValidationError, "is not a cron expression"),
    ({"timezone": "Paris"}, ValidationError, "unknown timezone 'Paris'"),
    ({"catchup": "never"}, ValidationError, "catchup must be one of skip, once, all"),
])
def test_a_bad_schedule_is_refused_before_anything_is_recorded(app: App, options: dict[str, object],
                                                               error: type[Exception], message: str) -> None:
    arguments: dict[str, object] = {"cron": "0 2 * * *", "task": "report", "args": ["pdf"], **options}
    with pytest.raises(error, match=message):
        app.schedule("nightly", **arguments)  # type: ignore[arg-type]
    assert app.schedules.list() == []


def test_an_app_with_no_tasks_schedules_any_task_name() -> None:
    app = App(store="memory://")
    assert app.schedule("remote", cron="*/5 * * * *", task="elsewhere.job").definition.task == "elsewhere.job"


def test_pause_resume_remove_list_and_next(app: App) -> None:
    app.schedule("b-hourly", cron="0 * * * *", task="report", args=["csv"])
    app.schedule("a-daily", cron="0 2 * * *", task="report", args=["pdf"], tenant="other")
    schedules = app.schedules
    assert [s.name for s in schedules.list()] == ["b-hourly"]
    assert schedules.pause("b-hourly", reason="audit").status is ScheduleStatus.PAUSED
    with pytest.raises(DomainError, match="only an active schedule can be paused"):
        schedules.pause("b-hourly")
    assert schedules.resume("b-hourly").status is ScheduleStatus.ACTIVE
    after = datetime(2030, 1, 1, 0, 30, tzinfo=UTC)
    assert schedules.next("b-hourly", 2, after=after) == [after + timedelta(minutes=30),
                                                          after + timedelta(minutes=90)]
    assert schedules.remove("b-hourly").status is ScheduleStatus.REMOVED
    assert schedules.list() == []
    assert [s.name for s in schedules.list(removed=True)] == ["b-hourly"]
    with pytest.raises(DomainError, match="there is no schedule 'nothing'"):
        schedules.get("nothing")


def test_a_scheduler_pass_submits_the_task_of_each_due_tick(app: App) -> None:
    created = app.schedule("every-second", cron="* * * * * *", task="report", kwargs={"format": "a", "pages": 2})
    now = created.since + timedelta(seconds=1)  # (since, since + 1 s] holds exactly one tick
    scheduler = Scheduler(app.store, clock=lambda: now)
    next_fire = asyncio.run(scheduler.step())
    [fire] = [e for e in app.store.read_stream(schedule_id("default", "every-second"))
              if isinstance(e, ScheduleFired)]
    assert next_fire == fire.fire_time + timedelta(seconds=1)
    task = app.get_task(fire.task_id)
    assert (task.task, task.queue, task.priority, task.kwargs, task.status) == (
        "report", "reports", 7, {"format": "a", "pages": 2}, TaskStatus.READY)
    assert asyncio.run(scheduler.step()) == next_fire  # nothing more is due
    assert scheduler.fired == 1


def test_a_scheduler_given_the_app_s_payloads_seals_the_arguments_of_the_tasks_it_fires(app: App) -> None:
    created = app.schedule("sealed", cron="* * * * * *", task="report", kwargs={"format": "s3cret", "pages": 2})
    now = created.since + timedelta(seconds=1)
    asyncio.run(Scheduler(app.store, clock=lambda: now, payloads=app.payloads).step())
    [fire] = [e for e in app.store.read_stream(schedule_id("default", "sealed")) if isinstance(e, ScheduleFired)]
    task = app.get_task(fire.task_id)
    assert (task.args, task.kwargs, task.sealed_arguments is not None) == ([], {}, True)
    assert app.payloads.arguments(task) == ([], {"format": "s3cret", "pages": 2})
