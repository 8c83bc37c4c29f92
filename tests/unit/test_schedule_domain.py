"""Cron schedules in the domain: definitions, the fold, catchup after downtime, and daylight saving."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.domain.events import (
    ScheduleChanged,
    ScheduleCreated,
    ScheduleEvent,
    ScheduleFired,
    TaskSubmitted,
)
from broker_q.domain.schedule import (
    INDEX_ID,
    MAX_CATCHUP,
    ScheduleState,
    ScheduleStatus,
    create_or_change,
    define,
    due,
    evolve,
    fire,
    fire_key,
    fired_task_id,
    index_entry,
    pause,
    remove,
    replay,
    resume,
    schedule_id,
    upcoming,
)
from broker_q.domain.task import task_id_for
from broker_q.errors import DomainError, ValidationError

T0 = datetime(2030, 1, 1, tzinfo=UTC)
CLIENT = "client:test"
SCHEDULER = "scheduler:test"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def created(cron: str = "0 * * * *", *, catchup: str = "skip", timezone: str = "UTC", now: datetime = T0,
            name: str = "hourly", **options: Any) -> ScheduleState:
    definition = define(cron=cron, task="report", queue="default", priority=5, timezone=timezone, catchup=catchup,
                        tenant="acme", now=now, **options)
    state = replay(create_or_change(None, definition, tenant="acme", name=name, actor=CLIENT, now=now))
    assert state is not None
    return state


def fired(state: ScheduleState, now: datetime, **options: Any) -> tuple[ScheduleState, list[datetime]]:
    """What one pass of a scheduler at ``now`` fires, and the state after it."""
    ticks = list(due(state, now, **options).fires)
    events = fire(state, ticks, actor=SCHEDULER, now=now)
    after = replay([e for e in events if isinstance(e, ScheduleFired)], state)
    assert after is not None
    return after, ticks


def after_all(state: ScheduleState, *events: ScheduleEvent) -> ScheduleState:
    result = replay(events, state)
    assert result is not None
    return result


# -- names and definitions ------------------------------------------------------------------------


def test_a_schedule_id_is_derived_from_tenant_and_name() -> None:
    assert schedule_id("acme", "nightly") == schedule_id("acme", "nightly")
    assert len({schedule_id("acme", "nightly"), schedule_id("acme", "daily"), schedule_id("other", "nightly"),
                schedule_id("acme:n", "ightly"), INDEX_ID}) == 5
    with pytest.raises(ValidationError, match="not a name"):
        schedule_id("acme", "no spaces")


@pytest.mark.parametrize(("change", "message"), [
    ({"cron": "every day"}, "not a cron expression"),
    ({"cron": "61 * * * *"}, "not a cron expression"),
    ({"cron": "0 0 30 2 *"}, "never fires"),
    ({"cron": "R * * * *"}, "H and R fields"),
    ({"cron": "H/5 * * * *"}, "H and R fields"),
    ({"timezone": "Europe/Atlantis"}, "unknown timezone 'Europe/Atlantis'"),
    ({"timezone": "../etc/passwd"}, "unknown timezone"),
    ({"catchup": "sometimes"}, "catchup must be one of skip, once, all"),
    ({"priority": 10}, "priority must be between 0 and 9"),
    ({"queue": "no queue"}, "not a queue name"),
    ({"task": ""}, "not a name"),
])
def test_a_bad_definition_is_refused_with_what_is_wrong(change: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"cron": "0 2 * * *", "task": "report", "queue": "default", "priority": 5,
                               "timezone": "UTC", "catchup": "skip", "tenant": "acme", "now": T0, **change}
    with pytest.raises(ValidationError, match=message):
        define(**options)


def test_five_six_and_seven_field_expressions_are_accepted() -> None:
    assert upcoming(created("30 2 * * MON-FRI"), 2, T0) == [utc("2030-01-01T02:30:00+00:00"),
                                                            utc("2030-01-02T02:30:00+00:00")]
    assert upcoming(created("* * * * * */20"), 3, T0) == [at(20), at(40), at(60)]  # seconds are the sixth field
    assert upcoming(created("0 0 1 1 * 0 2031-2032"), 3, T0) == [utc("2031-01-01T00:00:00+00:00"),
                                                                 utc("2032-01-01T00:00:00+00:00")]


# -- creating, changing, pausing, removing ---------------------------------------------------------


def test_the_same_definition_twice_appends_nothing_and_a_different_one_a_change() -> None:
    state = created("0 2 * * *")
    same = define(cron="0 2 * * *", task="report", queue="default", priority=5, tenant="acme", now=at(60))
    assert create_or_change(state, same, tenant="acme", name="hourly", actor=CLIENT, now=at(60)) == []
    other = define(cron="0 3 * * *", task="report", queue="default", priority=5, tenant="acme", now=at(60),
                   kwargs={"day": "today"})
    [changed] = create_or_change(state, other, tenant="acme", name="hourly", actor=CLIENT, now=at(60))
    assert isinstance(changed, ScheduleChanged)
    assert (changed.version, changed.cron, changed.kwargs, changed.correlation_id) == (2, "0 3 * * *",
                                                                                      {"day": "today"},
                                                                                      state.schedule_id)
    assert after_all(state, changed).definition == other


def test_pause_resume_and_remove_are_refused_where_they_mean_nothing() -> None:
    state = created()
    with pytest.raises(DomainError, match="only a paused schedule can be resumed"):
        resume(state, actor=CLIENT, now=at(1))
    paused = after_all(state, pause(state, reason="maintenance", actor=CLIENT, now=at(1)))
    assert (paused.status, paused.reason, paused.changed_by) == (ScheduleStatus.PAUSED, "maintenance", CLIENT)
    with pytest.raises(DomainError, match="only an active schedule can be paused"):
        pause(paused, actor=CLIENT, now=at(2))
    removed = after_all(paused, remove(paused, actor=CLIENT, now=at(2)))
    assert removed.status is ScheduleStatus.REMOVED
    for command in (pause, resume, remove):
        with pytest.raises(DomainError, match="no schedule 'hourly' to be"):
            command(removed, actor=CLIENT, now=at(3))
    with pytest.raises(DomainError, match="no schedule to be paused"):
        pause(None, actor=CLIENT, now=at(3))


def test_a_removed_schedule_is_created_again_in_its_stream() -> None:
    state = created()
    removed = after_all(state, remove(state, actor=CLIENT, now=at(10)))
    definition = define(cron="0 4 * * *", task="report", queue="default", priority=5, tenant="acme", now=at(20))
    [again] = create_or_change(removed, definition, tenant="acme", name="hourly", actor=CLIENT, now=at(20))
    assert isinstance(again, ScheduleCreated)
    assert again.version == 3
    state = after_all(removed, again)
    assert (state.status, state.since, state.fires) == (ScheduleStatus.ACTIVE, at(20), 0)


def test_a_paused_schedule_that_is_changed_stays_paused() -> None:
    state = created()
    paused = after_all(state, pause(state, actor=CLIENT, now=at(1)))
    definition = define(cron="0 4 * * *", task="report", queue="default", priority=5, tenant="acme", now=at(2))
    changed = after_all(paused, *create_or_change(paused, definition, tenant="acme", name="hourly", actor=CLIENT,
                                                  now=at(2)))
    assert (changed.status, changed.definition.cron) == (ScheduleStatus.PAUSED, "0 4 * * *")


def test_the_fold_refuses_events_that_do_not_follow() -> None:
    state = created()
    paused = pause(state, actor=CLIENT, now=at(1))
    with pytest.raises(DomainError, match="does not follow"):
        evolve(after_all(state, paused), paused)  # the same version twice
    with pytest.raises(DomainError, match="must begin with schedule_created"):
        evolve(None, replace(paused, version=1))
    other = created(name="other")
    with pytest.raises(DomainError, match="does not follow"):
        evolve(other, paused)
    [again] = create_or_change(None, state.definition, tenant="acme", name="hourly", actor=CLIENT, now=at(1))
    with pytest.raises(DomainError, match="does not follow"):
        evolve(state, again)
    with pytest.raises(DomainError, match="exists already"):
        evolve(state, replace(again, version=2))
    with pytest.raises(DomainError, match="does not live in stream"):
        evolve(None, replace(again, stream_id=uuid.uuid4()))


def test_a_fire_is_refused_when_paused_removed_owed_no_more_or_with_another_task() -> None:
    state = created()
    [fire_event, _] = fire(state, [at(3600)], actor=SCHEDULER, now=at(3600))
    assert isinstance(fire_event, ScheduleFired)
    paused = after_all(state, pause(state, actor=CLIENT, now=at(10)))
    with pytest.raises(DomainError, match="is paused: it cannot fire"):
        evolve(paused, replace(fire_event, version=3))
    removed = after_all(state, remove(state, actor=CLIENT, now=at(10)))
    with pytest.raises(DomainError, match="only a schedule_created can follow"):
        evolve(removed, replace(fire_event, version=3))
    with pytest.raises(DomainError, match="owes only ticks after"):
        evolve(state, replace(fire_event, fire_time=T0,
                                       task_id=fired_task_id("acme", state.schedule_id, T0)))
    with pytest.raises(DomainError, match="the one its tick names"):
        evolve(state, replace(fire_event, task_id=uuid.uuid4()))
    assert after_all(state, fire_event).last_fire == at(3600)


# -- firing ---------------------------------------------------------------------------------------


def test_a_fire_is_its_event_and_the_submit_of_a_task_named_by_the_tick() -> None:
    state = created(args=[1], kwargs={"k": "v"})
    fire_event, submitted = fire(state, [at(3600)], actor=SCHEDULER, now=at(3600.02))
    assert isinstance(fire_event, ScheduleFired)
    assert isinstance(submitted, TaskSubmitted)
    key = f"schedule:{state.schedule_id}:2030-01-01T01:00:00+00:00"
    assert fire_key(state.schedule_id, at(3600)) == key
    assert fire_event.task_id == submitted.stream_id == task_id_for("acme", key)
    assert (fire_event.version, fire_event.fire_time, fire_event.timestamp, fire_event.actor) == (
        2, at(3600), at(3600.02), SCHEDULER)
    assert (submitted.version, submitted.task, submitted.queue, submitted.args, submitted.kwargs) == (
        1, "report", "default", [1], {"k": "v"})
    assert (submitted.idempotency_key, submitted.causation_id, submitted.tenant) == (key, fire_event.id, "acme")


def test_several_fires_take_successive_versions() -> None:
    state = created(catchup="all")
    events = fire(state, [at(3600), at(7200)], actor=SCHEDULER, now=at(7200))
    assert [(type(e).__name__, e.version) for e in events] == [
        ("ScheduleFired", 2), ("TaskSubmitted", 1), ("ScheduleFired", 3), ("TaskSubmitted", 1)]


def test_the_index_entry_names_the_schedule_and_its_change() -> None:
    state = created()
    event = pause(state, actor=CLIENT, now=at(1))
    entry = index_entry(event, 7, actor=CLIENT, now=at(1))
    assert (entry.stream_id, entry.version, entry.tenant) == (INDEX_ID, 7, "system")
    assert (entry.schedule_id, entry.schedule_tenant, entry.name, entry.schedule_version, entry.change) == (
        state.schedule_id, "acme", "hourly", 2, "schedule_paused")
    assert entry.causation_id == event.id


# -- when ticks are due ---------------------------------------------------------------------------


def test_a_tick_is_due_from_its_instant_and_not_before() -> None:
    state = created("* * * * * *")
    assert due(state, at(0.999)).fires == ()
    assert due(state, at(0.999)).next_fire == at(1)
    assert due(state, at(1)).fires == (at(1),)
    assert due(state, at(1)).next_fire == at(2)
    state, ticks = fired(state, at(1.003))
    assert ticks == [at(1)]
    assert due(state, at(1.5)).fires == ()  # fired: owed no more


def test_the_creation_instant_is_not_owed() -> None:
    state = created("* * * * * *", now=at(5))
    assert due(state, at(5)).fires == ()
    assert due(state, at(5)).next_fire == at(6)


@pytest.mark.parametrize(("catchup", "expected"), [
    ("skip", [5 * 3600]),
    ("once", [5 * 3600]),
    ("all", [3600, 7200, 3 * 3600, 4 * 3600, 5 * 3600]),
])
def test_catchup_after_downtime(catchup: str, expected: list[int]) -> None:
    """Nothing fired from T0 to 05:00:03: the hourly ticks 01:00 to 04:00 were missed, 05:00 is on time."""
    state, ticks = fired(created(catchup=catchup), at(5 * 3600 + 3))
    assert ticks == [at(s) for s in expected]
    assert due(state, at(5 * 3600 + 4)).fires == ()
    assert due(state, at(5 * 3600 + 4)).next_fire == at(6 * 3600)


@pytest.mark.parametrize(("catchup", "expected"), [("skip", []), ("once", [5 * 3600]), ("all", [4 * 3600, 5 * 3600])])
def test_catchup_when_even_the_latest_tick_is_late(catchup: str, expected: list[int]) -> None:
    state, _ = fired(created(catchup=catchup), at(3 * 3600 + 1))
    state, ticks = fired(state, at(5 * 3600 + 20 * 60))  # down from 03:00 to 05:20
    assert ticks == [at(s) for s in expected]
    assert due(state, at(5 * 3600 + 20 * 60)).next_fire == at(6 * 3600)


def test_grace_says_how_late_a_tick_is_still_on_time() -> None:
    state = created(catchup="skip")
    assert due(state, at(3600 + 10)).fires == (at(3600),)
    assert due(state, at(3600 + 10.001)).fires == ()
    assert due(state, at(3600 + 59), grace=timedelta(minutes=1)).fires == (at(3600),)


def test_catchup_all_fires_at_most_the_latest_max_catchup_ticks() -> None:
    state = created("* * * * * *", catchup="all")
    day = 86400
    ticks = due(state, at(day)).fires
    assert len(ticks) == MAX_CATCHUP
    assert ticks[0] == at(day - MAX_CATCHUP + 1)
    assert ticks[-1] == at(day)
    assert due(state, at(day), limit=3).fires == (at(day - 2), at(day - 1), at(day))


@pytest.mark.parametrize(("catchup", "expected"), [
    ("skip", [4 * 3600]),
    ("once", [4 * 3600]),
    ("all", [3600, 7200, 3 * 3600, 4 * 3600]),
])
def test_a_pause_stops_fires_and_its_ticks_follow_the_catchup_rule_on_resume(catchup: str,
                                                                            expected: list[int]) -> None:
    state = created(catchup=catchup)
    state = after_all(state, pause(state, actor=CLIENT, now=at(60)))
    assert due(state, at(3 * 3600)).fires == ()
    assert due(state, at(3 * 3600)).next_fire is None
    state = after_all(state, resume(state, actor=CLIENT, now=at(4 * 3600 + 1)))
    state, ticks = fired(state, at(4 * 3600 + 2))
    assert ticks == [at(s) for s in expected]


def test_a_change_forgets_the_ticks_owed_before_it() -> None:
    state = created(catchup="all")
    definition = define(cron="30 * * * *", task="report", queue="default", priority=5, catchup="all",
                        tenant="acme", now=at(3 * 3600 + 60))
    state = after_all(state, *create_or_change(state, definition, tenant="acme", name="hourly", actor=CLIENT,
                                               now=at(3 * 3600 + 60)))
    assert due(state, at(4 * 3600)).fires == (at(3 * 3600 + 1800),)


# -- daylight saving (Europe/Paris: 2026-03-29 02:00 CET -> 03:00 CEST, 2026-10-25 03:00 CEST -> 02:00 CET) --


PARIS_DAILY_0230 = [
    # spring: 02:30 does not exist on the 29th; croniter fires at 03:00 CEST instead
    ("2026-03-27T12:00:00+00:00", ["2026-03-28T01:30:00+00:00", "2026-03-29T01:00:00+00:00",
                                   "2026-03-30T00:30:00+00:00"]),
    # autumn: 02:30 happens twice on the 25th, and croniter fires at both
    ("2026-10-23T12:00:00+00:00", ["2026-10-24T00:30:00+00:00", "2026-10-25T00:30:00+00:00",
                                   "2026-10-25T01:30:00+00:00", "2026-10-26T01:30:00+00:00"]),
]
PARIS_HOURLY = [
    # spring: 01:00 CET, then 03:00 CEST (02:00 does not exist): consecutive UTC hours
    ("2026-03-28T23:30:00+00:00", ["2026-03-29T00:00:00+00:00", "2026-03-29T01:00:00+00:00",
                                   "2026-03-29T02:00:00+00:00"]),
    # autumn: 02:00 CEST, 02:00 CET, 03:00 CET
    ("2026-10-24T22:30:00+00:00", ["2026-10-24T23:00:00+00:00", "2026-10-25T00:00:00+00:00",
                                   "2026-10-25T01:00:00+00:00", "2026-10-25T02:00:00+00:00"]),
]


@pytest.mark.parametrize(("cron", "start", "expected"), [
    *(("30 2 * * *", start, ticks) for start, ticks in PARIS_DAILY_0230),
    *(("0 * * * *", start, ticks) for start, ticks in PARIS_HOURLY),
])
def test_daylight_saving_in_paris(cron: str, start: str, expected: list[str]) -> None:
    state = created(cron, timezone="Europe/Paris", catchup="all", now=utc(start))
    instants = [utc(t) for t in expected]
    assert upcoming(state, len(instants), utc(start)) == instants
    # The catch-up walks croniter backwards from now: it must find the same instants.
    assert list(due(state, instants[-1]).fires) == instants
    # And a scheduler waking at each tick fires each exactly once, on time.
    fires: list[datetime] = []
    for instant in instants:
        assert due(state, instant - timedelta(seconds=1)).next_fire == instant
        state, ticks = fired(state, instant + timedelta(milliseconds=5))
        fires.extend(ticks)
    assert fires == instants


def test_local_wall_times_of_the_paris_ticks() -> None:
    """The same instants, as a person in Paris reads them."""
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    daily = created("30 2 * * *", timezone="Europe/Paris", now=utc("2026-10-23T12:00:00+00:00"))
    assert [t.astimezone(paris).isoformat() for t in upcoming(daily, 4, utc("2026-10-23T12:00:00+00:00"))] == [
        "2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00",
        "2026-10-26T02:30:00+01:00"]


# -- properties -----------------------------------------------------------------------------------

CRONS = ["* * * * * *", "* * * * * */7", "*/5 * * * *", "0 * * * *", "15,45 * * * *", "0 0 * * *"]


@settings(max_examples=60, deadline=None)
@given(cron=st.sampled_from(CRONS), catchup=st.sampled_from(["skip", "once", "all"]),
       timezone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
       steps=st.lists(st.floats(0.001, 3000), min_size=1, max_size=12))
def test_passes_at_any_times_fire_each_tick_at_most_once_in_order(cron: str, catchup: str, timezone: str,
                                                                  steps: list[float]) -> None:
    start = utc("2026-03-29T00:20:00+00:00")  # the spring change in Paris is within reach
    first = created(cron, catchup=catchup, timezone=timezone, now=start)
    state, now, fires = first, start, []
    for step in steps:
        now += timedelta(seconds=step)
        before = state
        state, ticks = fired(state, now)
        assert all(before.since < t <= now for t in ticks)
        if catchup == "once":
            assert len(ticks) <= 1
        if catchup == "skip":
            assert all(now - t <= timedelta(seconds=10) for t in ticks)
        fires.extend(ticks)
    assert fires == sorted(set(fires))
    for tick in fires:  # every fire is a tick of the schedule
        assert upcoming(first, 1, tick - timedelta(microseconds=1)) == [tick]
    if catchup == "all" and max(steps) < MAX_CATCHUP:  # no step can miss more ticks than a catch-up fires
        assert fires == upcoming(first, len(fires), start)
        assert due(state, now).fires == ()
