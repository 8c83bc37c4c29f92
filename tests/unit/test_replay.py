"""Replay queries (``projections/replay.py``) on the in-memory store.

Histories are built with the domain's own commands and a clock moved by hand. The property tests
check each query against a reference written out here: a straightforward fold of the events, one
task at a time, with :func:`broker_q.domain.task.replay`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker_q.domain import task as domain
from broker_q.domain.events import Event, IngressRejected, TaskEvent
from broker_q.domain.task import TaskState, TaskStatus, replay
from broker_q.errors import DomainError, TaskNotFound, ValidationError
from broker_q.store import EventStore, Recorded, open_store
from projections.replay import (
    CLOCK_SKEW,
    EVENT_TYPES,
    Attempt,
    events,
    queue_counts_at,
    task_state_at,
    timeline,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
READY, STARTED = TaskStatus.READY, TaskStatus.STARTED
SUCCEEDED, DEAD_LETTERED, CANCELLED = TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED


class Story:
    """Task histories told with the domain's commands; each step moves the clock ``after`` seconds."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self.log: list[TaskEvent] = []
        self.states: dict[uuid.UUID, TaskState] = {}
        self._ids = 0

    def _record(self, event: TaskEvent) -> TaskEvent:
        self.states[event.stream_id] = domain.evolve(self.states.get(event.stream_id), event)
        self.log.append(event)
        return event

    def _tick(self, after: float) -> datetime:
        self.now += timedelta(seconds=after)
        return self.now

    def submit(self, *, tenant: str = "acme", queue: str = "default", after: float = 1.0,
               args: list[Any] | None = None, task: str = "t.add") -> uuid.UUID:
        self._ids += 1
        task_id = uuid.UUID(int=self._ids)
        self._record(domain.submit(task_id=task_id, task=task, queue=queue, args=args or [1, 2], kwargs={},
                                   priority=5, tenant=tenant, actor="client:test", now=self._tick(after)))
        return task_id

    def start(self, task_id: uuid.UUID, *, worker: str = "worker:a", after: float = 1.0) -> TaskEvent:
        return self._record(domain.start(self.states[task_id], worker=worker, now=self._tick(after)))

    def succeed(self, task_id: uuid.UUID, *, result: Any = 3, after: float = 1.0) -> TaskEvent:
        return self._record(domain.succeed(self.states[task_id], result=result, now=self._tick(after)))

    def fail(self, task_id: uuid.UUID, *, after: float = 1.0) -> TaskEvent:
        return self._record(domain.dead_letter(self.states[task_id], error_type="ValueError", message="boom",
                                        traceback="Traceback ...", now=self._tick(after)))

    def cancel(self, task_id: uuid.UUID, *, after: float = 1.0) -> TaskEvent:
        return self._record(domain.cancel(self.states[task_id], reason="not needed", actor="client:test",
                                          now=self._tick(after)))


def record(store: EventStore, log: Sequence[Event]) -> list[int]:
    """Append ``log`` one event per transaction, as separate writers would; return the positions."""
    return [position for event in log for position in store.append([event])]


@pytest.fixture
def store() -> Iterator[EventStore]:
    opened = open_store("memory://")
    yield opened
    opened.close()


class CountingStore:
    """An :class:`EventStore` that records how the log is read."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.limits: list[int] = []
        self.read = 0

    def read_log(self, after: int, limit: int, *, to_position: int | None = None) -> list[Recorded]:
        self.limits.append(limit)
        page = self.inner.read_log(after, limit, to_position=to_position)
        self.read += len(page)
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- references: written out here, independent of the code under test ---------------------------


def reference_counts(log: Sequence[TaskEvent], *, queue: str | None = None,
                     tenant: str | None = None) -> dict[tuple[str, str], dict[TaskStatus, int]]:
    streams: dict[uuid.UUID, list[TaskEvent]] = {}
    for event in log:
        streams.setdefault(event.stream_id, []).append(event)
    counted: Counter[tuple[str, str, TaskStatus]] = Counter()
    for stream in streams.values():
        state = replay(stream)
        assert state is not None
        if (queue is None or state.queue == queue) and (tenant is None or state.tenant == tenant):
            counted[(state.tenant, state.queue, state.status)] += 1
    pairs = sorted({(t, q) for t, q, _ in counted})
    return {(t, q): {s: counted[(t, q, s)] for s in TaskStatus} for t, q in pairs}


def prefix_until(stream: Sequence[TaskEvent], at: datetime) -> list[TaskEvent]:
    """The longest prefix of ``stream`` whose events are all stamped at or before ``at``."""
    prefix: list[TaskEvent] = []
    for event in stream:
        if event.timestamp > at:
            break
        prefix.append(event)
    return prefix


# -- events -------------------------------------------------------------------------------------


def test_events_are_the_log_in_order_with_their_positions(store: EventStore) -> None:
    story = Story()
    a = story.submit()
    story.start(a)
    b = story.submit(tenant="globex")
    positions = record(store, story.log)
    found = list(events(store))
    assert [r.position for r in found] == positions
    assert [r.event for r in found] == story.log
    assert [(r.event.stream_id, r.event.TYPE) for r in found] == [(a, "submitted"), (a, "started"), (b, "submitted")]


def test_an_empty_store_has_no_events(store: EventStore) -> None:
    assert list(events(store)) == []


def test_events_filters_positions_inclusively(store: EventStore) -> None:
    story = Story()
    for _ in range(5):
        story.submit()
    positions = record(store, story.log)
    found = events(store, from_position=positions[1], to_position=positions[3])
    assert [r.position for r in found] == positions[1:4]
    assert list(events(store, from_position=positions[-1] + 1)) == []
    assert [r.position for r in events(store, to_position=0)] == []


def test_events_filters_times_inclusively(store: EventStore) -> None:
    story = Story()
    for _ in range(5):
        story.submit(after=10)
    record(store, story.log)
    times = [e.timestamp for e in story.log]
    found = events(store, since=times[1], until=times[3])
    assert [r.event.timestamp for r in found] == times[1:4]


def test_events_filters_types_task_and_tenant_together(store: EventStore) -> None:
    story = Story()
    a = story.submit()
    b = story.submit(tenant="globex")
    story.start(a)
    story.start(b)
    story.succeed(a)
    story.fail(b)
    record(store, story.log)
    assert [(r.event.stream_id, r.event.TYPE) for r in events(store, types=["started", "dead_lettered"])] == [
        (a, "started"), (b, "started"), (b, "dead_lettered")]
    assert [r.event.TYPE for r in events(store, task=a)] == ["submitted", "started", "succeeded"]
    assert [r.event.TYPE for r in events(store, tenant="globex", types={"dead_lettered"})] == ["dead_lettered"]
    assert list(events(store, tenant="nobody")) == []
    assert list(events(store, task=uuid.uuid4())) == []


def test_events_stops_at_the_limit(store: EventStore) -> None:
    story = Story()
    for _ in range(6):
        story.submit()
    positions = record(store, story.log)
    assert [r.position for r in events(store, limit=4, page_size=3)] == positions[:4]
    assert list(events(store, limit=0)) == []


def test_events_reads_the_log_in_pages(store: EventStore) -> None:
    story = Story()
    for _ in range(10):
        story.submit()
    record(store, story.log)
    counting = CountingStore(store)
    assert len(list(events(counting, page_size=3))) == 10  # type: ignore[arg-type]
    assert counting.limits == [3, 3, 3, 3]  # 3 + 3 + 3 + 1: never more than a page at a time


def test_events_of_one_task_stop_at_its_last_event(store: EventStore) -> None:
    story = Story()
    a = story.submit()
    story.start(a)
    for _ in range(20):
        story.submit()
    record(store, story.log)
    counting = CountingStore(store)
    assert [r.event.version for r in events(counting, task=a, page_size=2)] == [1, 2]  # type: ignore[arg-type]
    assert counting.read == 2


def test_events_refuses_bad_arguments_before_reading(store: EventStore) -> None:
    with pytest.raises(ValidationError, match="strated"):
        events(store, types=["strated"])
    with pytest.raises(ValidationError, match="not the string"):
        events(store, types="started")
    with pytest.raises(ValidationError, match="timezone"):
        events(store, since=datetime(2024, 1, 1))
    with pytest.raises(ValidationError, match="from_position"):
        events(store, from_position=-1)
    with pytest.raises(ValidationError, match="limit"):
        events(store, limit=-1)


def test_every_type_can_be_filtered() -> None:
    assert {"submitted", "started", "succeeded", "retry_scheduled", "dead_lettered", "deferred", "replayed", "released",
            "cancelled", "ingress_rejected", "breaker_failure", "breaker_opened", "breaker_probe",
            "breaker_closed", "schedule_created", "schedule_changed", "schedule_paused", "schedule_resumed",
            "schedule_removed", "schedule_fired", "schedule_indexed", "workflow_submitted",
            "workflow_cancelled", "key_rotated", "keys_shredded", "token_issued", "token_revoked",
            "access_denied", "tenant_created", "tenant_quota_set", "quota_exceeded"} == EVENT_TYPES


def test_a_scan_until_a_time_stops_past_the_skew_allowance(store: EventStore) -> None:
    """The rule of the module docstring, pinned: a late commit within the allowance is found, past it not."""
    story = Story()
    story.submit(after=0)                       # T0
    story.submit(after=CLOCK_SKEW.total_seconds() - 1)  # T0 + 59 s: within the allowance past T0
    late = story.submit(after=0)
    story.log[-1] = _restamped(story.log[-1], T0)         # stamped T0, committed after the one above
    story.submit(after=10)                      # T0 + 69 s: past the allowance, the scan stops here
    stale = story.submit(after=0)
    story.log[-1] = _restamped(story.log[-1], T0)         # a commit more than the allowance late
    record(store, story.log)
    assert [r.event.stream_id for r in events(store, until=T0)] == [uuid.UUID(int=1), late]
    assert [r.event.stream_id for r in events(store, until=T0, skew=None)] == [uuid.UUID(int=1), late, stale]


def _restamped(event: TaskEvent, timestamp: datetime) -> TaskEvent:
    return dataclasses.replace(event, timestamp=timestamp)


# -- timeline -----------------------------------------------------------------------------------


def test_a_timeline_has_every_event_and_the_time_between_them(store: EventStore) -> None:
    story = Story()
    task = story.submit()
    story.start(task, worker="worker:a", after=5)   # waited 5 s
    story.start(task, worker="worker:b", after=30)  # worker:a was lost after 30 s
    story.fail(task, after=2)
    record(store, story.log)
    history = timeline(store, task)
    assert [r.type for r in history.rows] == ["submitted", "started", "started", "dead_lettered"]
    assert [r.version for r in history.rows] == [1, 2, 3, 4]
    assert [r.since_previous.total_seconds() for r in history.rows] == [0, 5, 30, 2]
    assert [r.since_submit.total_seconds() for r in history.rows] == [0, 5, 35, 37]
    assert [r.actor for r in history.rows] == ["client:test", "worker:a", "worker:b", "worker:b"]
    assert history.rows[0].details["args"] == [1, 2]
    assert history.rows[3].details["error_type"] == "ValueError"
    assert history.waiting == timedelta(seconds=5)
    assert history.attempts == [
        Attempt(1, "worker:a", T0 + timedelta(seconds=6), T0 + timedelta(seconds=36), "started"),
        Attempt(2, "worker:b", T0 + timedelta(seconds=36), T0 + timedelta(seconds=38), "dead_lettered"),
    ]
    assert [a.run_time for a in history.attempts] == [timedelta(seconds=30), timedelta(seconds=2)]
    assert history.total == timedelta(seconds=37)
    assert history.state == story.states[task]


def test_the_timeline_of_an_unfinished_task_has_no_total(store: EventStore) -> None:
    story = Story()
    waiting, running = story.submit(), story.submit()
    story.start(running, after=3)
    record(store, story.log)
    assert timeline(store, waiting).waiting is None
    assert timeline(store, waiting).total is None
    assert timeline(store, waiting).attempts == []
    history = timeline(store, running)
    assert history.waiting == timedelta(seconds=3)
    assert history.attempts[0].ended_at is None
    assert history.attempts[0].run_time is None
    assert history.total is None


def test_a_cancelled_attempt_ends_with_the_cancel(store: EventStore) -> None:
    story = Story()
    task = story.submit()
    story.start(task)
    story.cancel(task, after=4)
    record(store, story.log)
    history = timeline(store, task)
    assert [(a.outcome, a.run_time) for a in history.attempts] == [("cancelled", timedelta(seconds=4))]
    assert history.total == timedelta(seconds=5)


def test_the_timeline_of_an_unknown_id_is_refused(store: EventStore) -> None:
    with pytest.raises(TaskNotFound):
        timeline(store, uuid.uuid4())
    rejected = uuid.uuid4()
    store.append([IngressRejected(stream_id=rejected, version=1, timestamp=T0, tenant="acme", actor="relay",
                                  correlation_id=rejected, reason="bad", queue="q", message_id=None, size=1,
                                  sha256="0" * 64)])
    with pytest.raises(TaskNotFound, match="not of a task"):
        timeline(store, rejected)


def test_an_illegal_stored_history_is_refused_not_shown(store: EventStore) -> None:
    story = Story()
    task = story.submit()
    story.start(task)
    story.succeed(task)
    store.append([story.log[0], story.log[2]])  # succeeded without started: version 2 is not legal
    with pytest.raises(DomainError):
        timeline(store, task)


# -- task_state_at ------------------------------------------------------------------------------


def test_a_task_state_as_of_a_time(store: EventStore) -> None:
    story = Story()
    task = story.submit(after=10)   # T0 + 10
    story.start(task, after=10)     # T0 + 20
    story.succeed(task, after=10)   # T0 + 30
    record(store, story.log)
    assert task_state_at(store, task, at=T0 + timedelta(seconds=9)) is None
    assert task_state_at(store, task, at=T0 + timedelta(seconds=10)) == replay(story.log[:1])
    state = task_state_at(store, task, at=T0 + timedelta(seconds=25))
    assert state is not None
    assert state.status is STARTED
    assert task_state_at(store, task, at=T0 + timedelta(days=1)) == story.states[task]


def test_a_task_state_as_of_a_position(store: EventStore) -> None:
    story = Story()
    task = story.submit()
    other = story.submit()
    story.start(task)
    story.start(other)
    story.succeed(task)
    positions = record(store, story.log)
    expected = [None, 1, 1, 2, 2, 3]  # versions of ``task`` as of 0, and as of each position
    for position, version in zip([0, *positions], expected, strict=True):
        state = task_state_at(store, task, position=position)
        assert (state.version if state else None) == version, position


def test_a_time_stamped_out_of_order_freezes_the_task_before_it(store: EventStore) -> None:
    """v2 stamped after ``at`` hides v3 stamped before it: a state is built from a prefix only."""
    story = Story()
    task = story.submit(after=0)
    story.start(task, after=100)
    story.cancel(task, after=0)
    story.log[2] = _restamped(story.log[2], T0 + timedelta(seconds=50))
    record(store, story.log)
    at = T0 + timedelta(seconds=60)
    state = task_state_at(store, task, at=at)
    assert state is not None
    assert state.status is READY
    assert queue_counts_at(store, at=at)[("acme", "default")][READY] == 1


def test_a_task_state_needs_exactly_one_moment_and_a_known_task(store: EventStore) -> None:
    story = Story()
    task = story.submit()
    record(store, story.log)
    with pytest.raises(ValidationError, match="exactly one"):
        task_state_at(store, task)
    with pytest.raises(ValidationError, match="exactly one"):
        task_state_at(store, task, at=T0, position=1)
    with pytest.raises(ValidationError, match="timezone"):
        task_state_at(store, task, at=datetime(2024, 1, 1))
    with pytest.raises(ValidationError, match="position"):
        task_state_at(store, task, position=-1)
    with pytest.raises(TaskNotFound):
        task_state_at(store, uuid.uuid4(), position=1)
    with pytest.raises(TaskNotFound):
        task_state_at(store, uuid.uuid4(), at=T0)


# -- queue_counts_at ----------------------------------------------------------------------------


def test_counts_per_tenant_and_queue_as_of_a_position(store: EventStore) -> None:
    story = Story()
    a = story.submit()
    b = story.submit(queue="mail")
    c = story.submit(tenant="globex")
    story.start(a)
    story.succeed(a)
    story.start(b)
    story.cancel(c)
    positions = record(store, story.log)
    zero = dict.fromkeys(TaskStatus, 0)
    assert queue_counts_at(store, position=positions[-1]) == {
        ("acme", "default"): {**zero, SUCCEEDED: 1},
        ("acme", "mail"): {**zero, STARTED: 1},
        ("globex", "default"): {**zero, CANCELLED: 1},
    }
    assert queue_counts_at(store, position=positions[3]) == {
        ("acme", "default"): {**zero, STARTED: 1},
        ("acme", "mail"): {**zero, READY: 1},
        ("globex", "default"): {**zero, READY: 1},
    }
    assert queue_counts_at(store, position=0) == {}
    assert queue_counts_at(store, position=positions[-1], queue="mail") == {("acme", "mail"): {**zero, STARTED: 1}}
    assert list(queue_counts_at(store, position=positions[-1], tenant="globex")) == [("globex", "default")]


def test_counts_skip_events_that_are_not_a_task(store: EventStore) -> None:
    rejected = uuid.uuid4()
    story = Story()
    story.submit()
    store.append([IngressRejected(stream_id=rejected, version=1, timestamp=T0, tenant="acme", actor="relay",
                                  correlation_id=rejected, reason="bad", queue="q", message_id=None, size=1,
                                  sha256="0" * 64)])
    record(store, story.log)
    assert queue_counts_at(store, position=2) == {("acme", "default"): {**dict.fromkeys(TaskStatus, 0), READY: 1}}


def test_counts_as_of_a_time(store: EventStore) -> None:
    story = Story()
    a = story.submit(after=10)   # T0 + 10
    story.submit(after=10)       # T0 + 20
    story.start(a, after=10)     # T0 + 30
    record(store, story.log)
    at = T0 + timedelta(seconds=25)
    assert queue_counts_at(store, at=at) == {("acme", "default"): {**dict.fromkeys(TaskStatus, 0), READY: 2}}
    assert queue_counts_at(store, at=T0) == {}


def test_counts_read_the_log_in_pages(store: EventStore) -> None:
    story = Story()
    task = story.submit(args=["x" * 1000])
    for _ in range(5):
        story.start(task)
    story.succeed(task, result="y" * 1000)
    record(store, story.log)
    counting = CountingStore(store)
    counts = queue_counts_at(counting, position=7, page_size=2)  # type: ignore[arg-type]
    assert counts[("acme", "default")][SUCCEEDED] == 1
    assert set(counting.limits) == {2}


def test_counts_need_exactly_one_moment(store: EventStore) -> None:
    with pytest.raises(ValidationError):
        queue_counts_at(store)
    with pytest.raises(ValidationError):
        queue_counts_at(store, at=T0, position=3)
    with pytest.raises(ValidationError, match="timezone"):
        queue_counts_at(store, at=datetime(2024, 1, 1))


# -- properties ---------------------------------------------------------------------------------

LEGAL = {None: ["submit"], READY: ["start", "cancel"], STARTED: ["start", "succeed", "fail", "cancel"],
         SUCCEEDED: [], DEAD_LETTERED: [], CANCELLED: []}


@st.composite
def histories(draw: st.DrawFn) -> list[TaskEvent]:
    """Several tasks' legal histories, interleaved; stamps drift up to 3 s either way (clock skew)."""
    places = draw(st.lists(st.tuples(st.sampled_from(["acme", "globex"]), st.sampled_from(["default", "mail"])),
                           min_size=1, max_size=5))
    states: list[TaskState | None] = [None] * len(places)
    clock, log = T0, []
    for index in draw(st.lists(st.integers(0, len(places) - 1), max_size=30)):
        state = states[index]
        choices = LEGAL[None if state is None else state.status]
        if not choices:
            continue
        command = draw(st.sampled_from(choices))
        clock += timedelta(seconds=draw(st.integers(0, 10)))
        now = clock + timedelta(seconds=draw(st.integers(-3, 3)))
        tenant, queue = places[index]
        event: TaskEvent
        if command == "submit":
            event = domain.submit(task_id=uuid.UUID(int=index + 1), task="t.add", queue=queue, args=[index],
                                  kwargs={}, priority=5, tenant=tenant, actor="client:test", now=now)
        elif state is None:
            raise AssertionError("only submit applies to a task that does not exist")
        elif command == "start":
            event = domain.start(state, worker=f"worker:{index}", now=now)
        elif command == "succeed":
            event = domain.succeed(state, result=index, now=now)
        elif command == "fail":
            event = domain.dead_letter(state, error_type="E", message="m", traceback=None, now=now)
        else:
            event = domain.cancel(state, reason="r", actor="client:test", now=now)
        states[index] = domain.evolve(state, event)
        log.append(event)
    return log


@settings(max_examples=150, deadline=None)
@given(log=histories(), data=st.data())
def test_counts_as_of_a_position_are_a_fold_of_the_first_events(log: list[TaskEvent], data: st.DataObject) -> None:
    store = open_store("memory://")
    positions = record(store, log)
    p = data.draw(st.integers(0, len(log)), label="number of events")
    position = positions[p - 1] if p else 0
    queue = data.draw(st.sampled_from([None, "default", "mail"]), label="queue")
    tenant = data.draw(st.sampled_from([None, "acme", "globex"]), label="tenant")
    page_size = data.draw(st.integers(1, 5), label="page size")
    assert queue_counts_at(store, position=position, queue=queue, tenant=tenant, page_size=page_size) == (
        reference_counts(log[:p], queue=queue, tenant=tenant))


@settings(max_examples=150, deadline=None)
@given(log=histories(), data=st.data())
def test_a_task_state_is_a_replay_of_its_stream_prefix(log: list[TaskEvent], data: st.DataObject) -> None:
    assume(log)
    store = open_store("memory://")
    positions = record(store, log)
    task = data.draw(st.sampled_from(sorted({e.stream_id for e in log})), label="task")
    stream = [e for e in log if e.stream_id == task]
    p = data.draw(st.integers(0, len(log)), label="number of events")
    k = sum(1 for e in log[:p] if e.stream_id == task)
    assert task_state_at(store, task, position=positions[p - 1] if p else 0) == replay(stream[:k])
    at = T0 + timedelta(seconds=data.draw(st.integers(-5, 320), label="seconds after T0"))
    assert task_state_at(store, task, at=at) == replay(prefix_until(stream, at))


@settings(max_examples=150, deadline=None)
@given(log=histories(), data=st.data())
def test_counts_as_of_a_time_follow_the_prefix_rule(log: list[TaskEvent], data: st.DataObject) -> None:
    store = open_store("memory://")
    record(store, log)
    at = T0 + timedelta(seconds=data.draw(st.integers(-5, 320), label="seconds after T0"))
    streams: dict[uuid.UUID, list[TaskEvent]] = {}
    for event in log:
        streams.setdefault(event.stream_id, []).append(event)
    expected = reference_counts([e for s in streams.values() for e in prefix_until(s, at)])
    # The stamps drift by 3 s at most, far less than the allowance: the early stop loses nothing.
    assert queue_counts_at(store, at=at, page_size=3) == expected
    assert queue_counts_at(store, at=at, skew=None) == expected


@settings(max_examples=150, deadline=None)
@given(log=histories(), data=st.data())
def test_events_are_the_log_filtered(log: list[TaskEvent], data: st.DataObject) -> None:
    store = open_store("memory://")
    positions = record(store, log)
    everything = store.read_log(0, len(log) + 1)
    draw = data.draw
    low = draw(st.none() | st.integers(0, len(log) + 1), label="from_position")
    high = draw(st.none() | st.integers(0, len(log) + 1), label="to_position")
    since = draw(st.none() | st.integers(-5, 320).map(lambda s: T0 + timedelta(seconds=s)), label="since")
    until = draw(st.none() | st.integers(-5, 320).map(lambda s: T0 + timedelta(seconds=s)), label="until")
    types = draw(st.none() | st.sets(st.sampled_from(sorted(EVENT_TYPES))), label="types")
    task = draw(st.none() | st.sampled_from([uuid.UUID(int=i) for i in range(1, 7)]), label="task")
    tenant = draw(st.none() | st.sampled_from(["acme", "globex"]), label="tenant")
    limit = draw(st.none() | st.integers(0, 10), label="limit")
    expected = [
        r for r in everything
        if (low is None or r.position >= low) and (high is None or r.position <= high)
        and (since is None or r.event.timestamp >= since) and (until is None or r.event.timestamp <= until)
        and (types is None or r.event.TYPE in types) and (task is None or r.event.stream_id == task)
        and (tenant is None or r.event.tenant == tenant)
    ][:limit]
    found = list(events(store, from_position=low, to_position=high, since=since, until=until, types=types,
                        task=task, tenant=tenant, limit=limit, page_size=draw(st.integers(1, 4), label="page")))
    assert found == expected
    assert [r.position for r in everything] == positions
