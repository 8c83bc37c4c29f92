"""Cron schedules on the real stores: schedulers racing on every tick, catchup, pause, and real tasks.

Each "scheduler process" is a :class:`Scheduler` on a store of its own opened on the same URL, as
separate processes would have: only the store's unique (stream, version) stands between them. Most
tests drive the schedulers one pass at a time with an injected clock, so that many ticks take no
wall-clock time; one runs them in real time, with a relay and a worker running the fired tasks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker_q import App, TaskStatus
from broker_q.domain.events import ScheduleFired, ScheduleIndexed, TaskSubmitted
from broker_q.domain.schedule import INDEX_ID, ScheduleDefinition, fired_task_id, schedule_id
from broker_q.domain.schedule import define as domain_define
from broker_q.errors import DomainError
from broker_q.scheduler import Scheduler
from broker_q.schedules import Schedules
from broker_q.store import open_store
from broker_q.store.port import EventStore
from tests.helpers import running, wait_for

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def stores(durable_store_url: str) -> Iterator[list[EventStore]]:
    opened = [open_store(durable_store_url) for _ in range(4)]
    yield opened
    for store in opened:
        store.close()


def schedules(store: EventStore, clock: Clock, tenant: str = "acme") -> Schedules:
    return Schedules(store, tenant=tenant, actor="client:test", clock=clock)


def define(clock: Clock, cron: str, *, catchup: str = "skip", timezone: str = "UTC") -> ScheduleDefinition:
    return domain_define(cron=cron, task="report", queue="default", priority=5, timezone=timezone, catchup=catchup,
                         tenant="acme", now=clock.now, kwargs={"source": cron})


def fires_of(store: EventStore, tenant: str, name: str) -> list[ScheduleFired]:
    return [e for e in store.read_stream(schedule_id(tenant, name)) if isinstance(e, ScheduleFired)]


def submitted(store: EventStore) -> list[TaskSubmitted]:
    return [r.event for r in store.read_log(0, 1_000_000) if isinstance(r.event, TaskSubmitted)]


# -- many schedulers, one fire per tick -------------------------------------------------------------


async def test_three_schedulers_racing_on_every_tick_fire_each_once(stores: list[EventStore]) -> None:
    clock = Clock()
    client = schedules(stores[3], clock)
    client.save("every-second", define(clock, "* * * * * *"))
    client.save("every-other-second", define(clock, "* * * * * */2"))
    client.save("every-minute", define(clock, "* * * * *"))
    schedulers = [Scheduler(store, clock=clock, name=f"s{i}") for i, store in enumerate(stores[:3])]
    steps = 150
    for _ in range(steps):
        clock.now += timedelta(seconds=1)
        await asyncio.gather(*(s.step() for s in schedulers))

    store = stores[3]
    expected = {"every-second": [T0 + timedelta(seconds=s) for s in range(1, steps + 1)],
                "every-other-second": [T0 + timedelta(seconds=s) for s in range(2, steps + 1, 2)],
                "every-minute": [T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)]}
    for name, ticks in expected.items():
        fires = fires_of(store, "acme", name)
        assert [f.fire_time for f in fires] == ticks, name  # each tick once, in order, none missed
        assert [f.version for f in fires] == list(range(2, len(ticks) + 2))
    tasks = submitted(store)
    total = sum(len(t) for t in expected.values())
    assert len(tasks) == len({t.stream_id for t in tasks}) == total  # exactly one task per tick
    fired_ids = {f.task_id for name in expected for f in fires_of(store, "acme", name)}
    assert fired_ids == {t.stream_id for t in tasks}
    for name, ticks in expected.items():
        sid = schedule_id("acme", name)
        assert {fired_task_id("acme", sid, t) for t in ticks} <= fired_ids
    assert sum(s.fired for s in schedulers) == total
    # Every scheduler tried every tick: its cache never knows the others' fires until it loses to one.
    assert sum(s.lost for s in schedulers) >= total  # most ticks were tried by all three
    assert Counter(e.actor for e in tasks).keys() <= {s.actor for s in schedulers}
    by_id = {t.stream_id: t for t in tasks}
    for fire in fires_of(store, "acme", "every-second"):
        task = by_id[fire.task_id]
        assert (task.causation_id, task.kwargs, task.task) == (fire.id, {"source": "* * * * * *"}, "report")


async def test_schedulers_learn_of_new_schedules_and_changes_through_the_index(stores: list[EventStore]) -> None:
    clock = Clock()
    scheduler = Scheduler(stores[0], clock=clock)
    assert await scheduler.step() is None  # no schedule yet
    client = schedules(stores[1], clock)
    client.save("hourly", define(clock, "0 * * * *"))
    assert await scheduler.step() == T0 + timedelta(hours=1)
    clock.now += timedelta(minutes=10)
    client.save("hourly", define(clock, "30 * * * *"))
    assert await scheduler.step() == T0 + timedelta(minutes=30)
    client.pause("hourly", reason="maintenance")
    assert await scheduler.step() is None
    index = [e for e in stores[0].read_stream(INDEX_ID) if isinstance(e, ScheduleIndexed)]
    assert [(e.version, e.name, e.schedule_version, e.change) for e in index] == [
        (1, "hourly", 1, "schedule_created"), (2, "hourly", 2, "schedule_changed"), (3, "hourly", 3, "schedule_paused")]


@pytest.mark.parametrize(("catchup", "expected"), [
    ("skip", [60, 30 * 60]),
    ("once", [60, 30 * 60]),
    ("all", [60, *range(2 * 60, 30 * 60 + 1, 60)]),
])
async def test_catchup_after_downtime(stores: list[EventStore], catchup: str, expected: list[int]) -> None:
    """A per-minute schedule fires at 00:01, then no scheduler runs until 00:30:02."""
    clock = Clock()
    schedules(stores[1], clock).save("minutely", define(clock, "* * * * *", catchup=catchup))
    scheduler = Scheduler(stores[0], clock=clock)
    clock.now = T0 + timedelta(seconds=60.05)
    await scheduler.step()
    clock.now = T0 + timedelta(minutes=30, seconds=2)
    # A scheduler that starts after the downtime knows nothing but what the store says.
    await Scheduler(stores[2], clock=clock).step()
    assert [f.fire_time for f in fires_of(stores[0], "acme", "minutely")] == [
        T0 + timedelta(seconds=s) for s in expected]
    assert len(submitted(stores[0])) == len(expected)


@pytest.mark.parametrize(("catchup", "fired_on_resume"), [("skip", 0), ("once", 1), ("all", 10)])
async def test_a_paused_schedule_fires_nothing_and_resumes_by_its_catchup(stores: list[EventStore], catchup: str,
                                                                          fired_on_resume: int) -> None:
    clock = Clock()
    client = schedules(stores[1], clock)
    client.save("minutely", define(clock, "* * * * *", catchup=catchup))
    scheduler = Scheduler(stores[0], clock=clock)
    clock.now = T0 + timedelta(minutes=1)
    await scheduler.step()
    client.pause("minutely")
    for minute in range(2, 12):
        clock.now = T0 + timedelta(minutes=minute, seconds=1)
        await scheduler.step()
    assert len(fires_of(stores[0], "acme", "minutely")) == 1
    with pytest.raises(DomainError, match="only an active schedule can be paused"):
        client.pause("minutely")
    clock.now = T0 + timedelta(minutes=11, seconds=30)
    client.resume("minutely")
    await scheduler.step()
    fires = fires_of(stores[0], "acme", "minutely")
    assert len(fires) == 1 + fired_on_resume
    if fired_on_resume:
        assert fires[-1].fire_time == T0 + timedelta(minutes=11)
    clock.now = T0 + timedelta(minutes=12)
    await scheduler.step()
    assert fires_of(stores[0], "acme", "minutely")[-1].fire_time == T0 + timedelta(minutes=12)


async def test_a_fire_that_loses_to_a_pause_is_not_recorded(stores: list[EventStore]) -> None:
    """The scheduler's cache says active, the store says paused: the append conflicts and nothing fires."""
    clock = Clock()
    client = schedules(stores[1], clock)
    client.save("minutely", define(clock, "* * * * *"))
    scheduler = Scheduler(stores[0], clock=clock)
    await scheduler.step()
    client.pause("minutely")
    clock.now = T0 + timedelta(minutes=1)
    scheduler._refresh = lambda: None  # type: ignore[method-assign]  # as if the pause came after its index read
    assert await scheduler.step() is None
    assert (scheduler.fired, scheduler.lost) == (0, 1)
    assert fires_of(stores[0], "acme", "minutely") == []


def test_removed_schedules_leave_the_list_and_a_name_can_be_reused(stores: list[EventStore]) -> None:
    clock = Clock()
    client = schedules(stores[0], clock)
    client.save("a", define(clock, "0 * * * *"))
    client.save("b", define(clock, "0 2 * * *"))
    schedules(stores[1], clock, tenant="other").save("a", define(clock, "0 3 * * *"))
    assert [s.name for s in schedules(stores[1], clock).list()] == ["a", "b"]
    client.remove("a", reason="not needed")
    assert [s.name for s in schedules(stores[1], clock).list()] == ["b"]
    assert [s.name for s in schedules(stores[1], clock).list(removed=True)] == ["a", "b"]
    again = client.save("a", define(clock, "0 4 * * *"))
    assert (again.version, again.status.value) == (3, "active")
    assert schedules(stores[1], clock).next("a", 2) == [T0 + timedelta(hours=4), T0 + timedelta(days=1, hours=4)]


# -- real time, real tasks -------------------------------------------------------------------------


async def test_a_schedule_every_second_runs_real_tasks_with_three_schedulers(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], stores: list[EventStore]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    ran: list[str] = []

    @app.task(name="tick")
    def tick(label: str) -> str:
        ran.append(label)
        return label

    app.schedule("every-second", cron="* * * * * *", task="tick", kwargs={"label": "hello"})
    stop = asyncio.Event()
    schedulers = [Scheduler(store, poll_interval=0.2) for store in stores[:3]]
    loops = [asyncio.create_task(s.run(stop)) for s in schedulers]
    try:
        async with running(app):
            await wait_for(lambda: len(ran) >= 4, timeout=20, what="four fired tasks to run")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*loops), 10)
            fires = fires_of(app.store, "default", "every-second")
            for fire in fires:
                assert await app.handle(fire.task_id).result(timeout=20) == "hello"
    finally:
        stop.set()
        await asyncio.gather(*loops, return_exceptions=True)
    times = [f.fire_time for f in fires]
    assert times == [times[0] + timedelta(seconds=i) for i in range(len(times))]  # every second, each once
    assert len(ran) == len(fires) == sum(s.fired for s in schedulers)
    assert {app.get_task(f.task_id).status for f in fires} == {TaskStatus.SUCCEEDED}
    assert len(submitted(app.store)) == len(fires)
    # On time: decided a few milliseconds after the tick when the machine is idle; bounded loosely here
    # because CI shares two cores.
    assert all(timedelta(0) <= (f.timestamp - f.fire_time) < timedelta(seconds=3) for f in fires)


# -- the commands ---------------------------------------------------------------------------------


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


def ok(url: str, *args: str) -> str:
    done = cli(url, *args)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


def test_the_schedules_commands(sqlite_url: str) -> None:
    url = sqlite_url
    assert ok(url, "schedules") == "no schedules\n"
    out = ok(url, "schedules", "add", "nightly-report", "--cron", "0 2 * * *", "--task", "report",
             "--kwargs", '{"format": "pdf"}', "--timezone", "Europe/Paris", "--catchup", "once")
    assert out.startswith("nightly-report: active at v1, next fire ")
    assert ok(url, "schedules", "add", "nightly-report", "--cron", "0 2 * * *", "--task", "report",
              "--kwargs", '{"format": "pdf"}', "--timezone", "Europe/Paris", "--catchup", "once").startswith(
        "nightly-report: active at v1")  # the same definition again appends nothing
    [row] = json.loads(ok(url, "schedules", "list", "--json"))
    assert (row["name"], row["status"], row["cron"], row["timezone"], row["catchup"], row["kwargs"]) == (
        "nightly-report", "active", "0 2 * * *", "Europe/Paris", "once", {"format": "pdf"})
    ticks = json.loads(ok(url, "schedules", "next", "nightly-report", "-n", "3", "--json"))
    assert len(ticks) == 3
    assert ticks[0] == row["next_fire"]
    assert all(datetime.fromisoformat(t).astimezone(UTC).hour in (0, 1) for t in ticks)  # 02:00 in Paris
    lines = ok(url, "schedules", "next", "nightly-report", "-n", "2").splitlines()
    assert len(lines) == 2
    assert "T02:00:00+0" in lines[0]
    assert lines[0].endswith("Europe/Paris")
    assert ok(url, "schedules", "pause", "nightly-report", "--reason", "audit") == "nightly-report: paused at v2\n"
    table = ok(url, "schedules").splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"]
    assert table[1].split()[:2] == ["nightly-report", "paused"]
    assert "resumed at v3" in ok(url, "schedules", "resume", "nightly-report")
    assert ok(url, "schedules", "remove", "nightly-report") == "nightly-report: removed at v4\n"
    assert ok(url, "schedules") == "no schedules\n"
    history = json.loads(ok(url, "schedules", "history", "nightly-report", "--json"))
    assert [h["type"] for h in history] == ["schedule_created", "schedule_paused", "schedule_resumed",
                                            "schedule_removed"]
    assert history[1]["data"]["reason"] == "audit"
    assert history[1]["actor"].startswith("operator:")


@pytest.mark.parametrize(("args", "message"), [
    (["--cron", "0 25 * * *"], "error: cron '0 25 * * *' is not a cron expression"),
    (["--cron", "0 2 * * *", "--timezone", "Europe/Nowhere"], "error: unknown timezone 'Europe/Nowhere'"),
    (["--cron", "0 2 * * *", "--app", "tests.integration.apps:app"],
     "error: no task named 'report' is registered in this app"),
    (["--cron", "0 2 * * *", "--kwargs", "[1]"], "error: --kwargs must be a JSON object"),
])
def test_a_bad_schedule_is_one_line_on_stderr(sqlite_url: str, args: list[str], message: str) -> None:
    done = cli(sqlite_url, "schedules", "add", "bad", "--task", "report", *args)
    assert done.returncode == 1
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert cli(sqlite_url, "schedules", "pause", "nothing").stderr == (
        "error: there is no schedule to be paused\n")


def test_a_bad_catchup_is_refused_by_the_parser(sqlite_url: str) -> None:
    done = cli(sqlite_url, "schedules", "add", "bad", "--task", "report", "--cron", "* * * * *", "--catchup", "x")
    assert done.returncode == 2
    assert "invalid choice: 'x'" in done.stderr


async def test_broker_q_scheduler_fires_in_a_process_of_its_own(sqlite_url: str) -> None:
    app = App(store=sqlite_url)
    app.schedule("every-second", cron="* * * * * *", task="anything")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker_q.cli", "--store", sqlite_url, "scheduler", cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_for(lambda: len(fires_of(app.store, "default", "every-second")) >= 2, timeout=20,
                       what="two fires by the scheduler process")
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    fires = fires_of(app.store, "default", "every-second")
    assert all(f.actor.startswith("scheduler:") for f in fires)
    assert b"stopped" in stderr
    app.close()
