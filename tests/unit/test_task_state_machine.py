"""The task state machine of ``broker_q.domain.task``, driven by random command sequences.

The reference for what is legal is written out here, independently of the code under test:
:data:`LEGAL_COMMANDS` says which command each status accepts and :data:`TRANSITIONS` which status
each status may move to. Time comes from an injected clock; nothing here reads the real one.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker_q.codec import decode_event, encode_event
from broker_q.domain import task as domain
from broker_q.domain.events import TaskEvent, TaskSubmitted
from broker_q.domain.task import FINAL_STATES, MAX_PRIORITY, TaskState, TaskStatus, evolve, replay
from broker_q.errors import DomainError

READY, STARTED = TaskStatus.READY, TaskStatus.STARTED
RETRY_SCHEDULED, DEFERRED = TaskStatus.RETRY_SCHEDULED, TaskStatus.DEFERRED
SUCCEEDED, DEAD_LETTERED, CANCELLED = TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED

TRANSITIONS: dict[TaskStatus | None, frozenset[TaskStatus]] = {
    None: frozenset({READY}),
    READY: frozenset({STARTED, DEFERRED, CANCELLED}),
    # started -> started: a takeover
    STARTED: frozenset({STARTED, SUCCEEDED, RETRY_SCHEDULED, DEAD_LETTERED, CANCELLED}),
    RETRY_SCHEDULED: frozenset({STARTED, DEFERRED, CANCELLED}),
    DEFERRED: frozenset({STARTED, DEFERRED, CANCELLED}),
    SUCCEEDED: frozenset(),
    DEAD_LETTERED: frozenset({READY}),  # replayed by an operator
    CANCELLED: frozenset(),
}
"""Every status a task may move to from each status (``None``: the task does not exist yet)."""

LEGAL_COMMANDS: dict[TaskStatus | None, frozenset[str]] = {
    None: frozenset({"submit"}),
    READY: frozenset({"start", "defer", "cancel"}),
    STARTED: frozenset({"start", "succeed", "retry", "fail", "cancel"}),
    RETRY_SCHEDULED: frozenset({"start", "defer", "cancel"}),
    DEFERRED: frozenset({"start", "defer", "cancel"}),
    SUCCEEDED: frozenset(),
    DEAD_LETTERED: frozenset({"replay"}),
    CANCELLED: frozenset(),
}

RESULTING_STATUS = {"submit": READY, "start": STARTED, "succeed": SUCCEEDED, "retry": RETRY_SCHEDULED,
                    "fail": DEAD_LETTERED, "defer": DEFERRED, "replay": READY, "cancel": CANCELLED}
EVENT_TYPE = {"submit": "submitted", "start": "started", "succeed": "succeeded", "retry": "retry_scheduled",
              "fail": "dead_lettered", "defer": "deferred", "replay": "replayed", "cancel": "cancelled"}

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8) | st.floats(
    allow_nan=False, allow_infinity=False
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10)
tenants = st.from_regex(r"[a-z0-9][a-z0-9_\-]{0,20}", fullmatch=True)


class FakeClock:
    """A clock the test moves by hand: every reading is later than the previous one."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def test_the_reference_tables_agree() -> None:
    for status, commands in LEGAL_COMMANDS.items():
        assert {RESULTING_STATUS[c] for c in commands} == TRANSITIONS[status]
    # final: nothing leaves them but an operator's replay of a dead letter
    assert {s for s, targets in TRANSITIONS.items() if not targets} | {DEAD_LETTERED} == set(FINAL_STATES)


class TaskMachine(RuleBasedStateMachine):
    """One task, commands in random order; illegal ones must be refused and change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.task_id = uuid.uuid4()
        self.state: TaskState | None = None
        self.events: list[TaskEvent] = []
        self.final: TaskState | None = None

    @property
    def status(self) -> TaskStatus | None:
        return None if self.state is None else self.state.status

    def _decide(self, command: str, decide: Any) -> None:
        """Run ``decide()``; apply its event if the reference says the command is legal now."""
        before_state, before_events = self.state, list(self.events)
        legal = command in LEGAL_COMMANDS[self.status]
        if not legal:
            if command == "submit":
                # submit takes no state: a second submit is refused when applied (and by the store)
                with pytest.raises(DomainError):
                    evolve(self.state, decide())
            else:
                with pytest.raises(DomainError):
                    decide()
            assert self.state == before_state
            assert self.events == before_events
            return
        event = decide()
        assert EVENT_TYPE[command] == event.TYPE
        assert event.stream_id == self.task_id
        assert event.version == (1 if self.state is None else self.state.version + 1)
        assert event.timestamp == self.clock.now
        self._refuses_misplaced(event)
        new = evolve(self.state, event)
        assert new.status in TRANSITIONS[self.status], f"{self.status} -> {new.status} on {command}"
        assert new.status is RESULTING_STATUS[command]
        assert new.version == event.version
        assert self.state == before_state  # evolve returned a new state, the old one is intact
        self.state = new
        self.events.append(event)

    def _refuses_misplaced(self, event: TaskEvent) -> None:
        for wrong_version in {event.version - 1, event.version + 1, event.version + 5, 0}:
            with pytest.raises(DomainError):
                evolve(self.state, dataclasses.replace(event, version=wrong_version))
        if self.state is not None:
            with pytest.raises(DomainError):
                evolve(self.state, dataclasses.replace(event, stream_id=uuid.uuid4()))

    @rule(
        priority=st.integers(-2, MAX_PRIORITY + 2),
        args=st.lists(json_values, max_size=3),
        kwargs=st.dictionaries(names, json_values, max_size=3),
        tenant=tenants,
        step=st.floats(0, 3600),
    )
    def submit(self, priority: int, args: list[Any], kwargs: dict[str, Any], tenant: str, step: float) -> None:
        now = self.clock.advance(step)

        def decide() -> TaskSubmitted:
            return domain.submit(task_id=self.task_id, task="t.add", queue="default", args=args, kwargs=kwargs,
                                 priority=priority, tenant=tenant, actor="client:test", now=now)

        if not 0 <= priority <= MAX_PRIORITY:
            with pytest.raises(DomainError, match="priority"):
                decide()
            return
        first = self.state is None
        self._decide("submit", decide)
        if first:
            assert self.state is not None
            assert (self.state.priority, self.state.args, self.state.kwargs) == (priority, args, kwargs)
            assert self.state.submitted_at == now

    @precondition(lambda self: self.state is not None)
    @rule(worker=names, step=st.floats(0, 3600))
    def start(self, worker: str, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        self._decide("start", lambda: domain.start(state, worker=worker, now=now))
        if self.state is not state and self.state is not None:
            assert self.state.attempts == state.attempts + 1
            assert self.state.worker == worker
            assert self.state.started_at == now

    @precondition(lambda self: self.state is not None)
    @rule(result=json_values, step=st.floats(0, 3600))
    def succeed(self, result: Any, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        self._decide("succeed", lambda: domain.succeed(state, result=result, now=now))
        if self.state is not state and self.state is not None:
            assert self.state.result == result
            assert self.state.finished_at == now

    @precondition(lambda self: self.state is not None)
    @rule(message=st.text(max_size=10), step=st.floats(0, 3600))
    def fail(self, message: str, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        self._decide("fail", lambda: domain.dead_letter(state, error_type="ValueError", message=message, traceback=None,
                                                 now=now))
        if self.state is not state and self.state is not None:
            assert (self.state.error_type, self.state.error) == ("ValueError", message)
            assert self.state.finished_at == now

    @precondition(lambda self: self.state is not None)
    @rule(reason=st.text(max_size=10), step=st.floats(0, 3600))
    def cancel(self, reason: str, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        self._decide("cancel", lambda: domain.cancel(state, reason=reason, actor="client:test", now=now))
        if self.state is not state and self.state is not None:
            assert self.state.cancel_reason == reason
            assert self.state.finished_at == now

    @precondition(lambda self: self.state is not None)
    @rule(message=st.text(max_size=10), delay=st.floats(0, 3600), step=st.floats(0, 3600))
    def retry(self, message: str, delay: float, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        due = now + timedelta(seconds=delay)
        self._decide("retry", lambda: domain.retry(state, due_at=due, error_type="OSError", message=message,
                                                   traceback=None, now=now))
        if self.state is not state and self.state is not None:
            assert (self.state.due_at, self.state.error, self.state.attempts) == (due, message, state.attempts)

    @precondition(lambda self: self.state is not None)
    @rule(delay=st.floats(0, 3600), step=st.floats(0, 3600))
    def defer(self, delay: float, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        due = now + timedelta(seconds=delay)
        self._decide("defer", lambda: domain.defer(state, due_at=due, reason="breaker open", actor="worker:w",
                                                   now=now))
        if self.state is not state and self.state is not None:
            assert (self.state.due_at, self.state.attempts) == (due, state.attempts)  # no attempt spent

    @precondition(lambda self: self.state is not None)
    @rule(reason=names, kwargs=st.none() | st.dictionaries(names, json_values, max_size=2), step=st.floats(0, 3600))
    def replay_it(self, reason: str, kwargs: dict[str, Any] | None, step: float) -> None:
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        self._decide("replay", lambda: domain.replay_dead_letter(state, reason=reason, actor="operator:o", now=now,
                                                                 kwargs=kwargs))
        if self.state is not state and self.state is not None:
            assert self.state.first_attempt == state.attempts + 1  # the retry budget starts again
            assert self.state.kwargs == (state.kwargs if kwargs is None else kwargs)

    @invariant()
    def a_final_state_never_changes(self) -> None:
        if self.final is not None:
            assert self.state == self.final
        elif self.state is not None and self.state.status in (SUCCEEDED, CANCELLED):
            self.final = self.state

    @invariant()
    def replay_equals_the_state_built_step_by_step(self) -> None:
        assert replay(self.events) == self.state
        assert [e.version for e in self.events] == list(range(1, len(self.events) + 1))

    @invariant()
    def replay_of_stored_events_equals_the_state(self) -> None:
        stored = [encode_event(e) for e in self.events]
        decoded = [decode_event(e.stream_id, e.version, e.TOPIC, s) for e, s in zip(self.events, stored, strict=True)]
        assert replay(decoded) == self.state  # type: ignore[arg-type]

    @invariant()
    def attempts_count_the_started_events(self) -> None:
        if self.state is not None:
            assert self.state.attempts == sum(e.TYPE == "started" for e in self.events)


TaskMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_task_state_machine = TaskMachine.TestCase


# -- examples -------------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _submitted(task_id: uuid.UUID | None = None, **overrides: Any) -> TaskSubmitted:
    fields: dict[str, Any] = {
        "task_id": task_id or uuid.uuid4(), "task": "t.add", "queue": "default", "args": [1, 2], "kwargs": {},
        "priority": 5, "tenant": "acme", "actor": "client:test", "now": NOW,
    }
    fields.update(overrides)
    return domain.submit(**fields)


def _ready() -> TaskState:
    state = evolve(None, _submitted())
    assert state.status is READY
    return state


def test_a_submitted_task_is_ready_at_once_with_one_event() -> None:
    event = _submitted()
    state = replay([event])
    assert state is not None
    assert (state.status, state.version, state.attempts, state.worker) == (READY, 1, 0, None)
    assert state.correlation_id == event.stream_id  # a task's own id unless a caller passes one


def test_attempts_are_numbered_from_one() -> None:
    ready = _ready()
    started = domain.start(ready, worker="w1", now=NOW)
    assert (started.attempt, started.version, started.worker) == (1, 2, "w1")
    state = evolve(ready, started)
    assert (state.attempts, state.worker, state.started_at) == (1, "w1", NOW)


def test_a_takeover_from_started_is_attempt_n_plus_one() -> None:
    state = _ready()
    for n in (1, 2, 3):
        state = evolve(state, domain.start(state, worker=f"w{n}", now=NOW + timedelta(minutes=n)))
        assert (state.status, state.attempts, state.worker) == (STARTED, n, f"w{n}")
    assert state.started_at == NOW + timedelta(minutes=3)


def test_evolve_refuses_a_started_event_whose_attempt_skips_a_number() -> None:
    ready = _ready()
    started = domain.start(ready, worker="w1", now=NOW)
    with pytest.raises(DomainError, match="attempt"):
        evolve(ready, dataclasses.replace(started, attempt=2))


@pytest.mark.parametrize("priority", [-1, MAX_PRIORITY + 1, 10, 100])
def test_a_priority_out_of_range_is_refused(priority: int) -> None:
    with pytest.raises(DomainError, match="priority"):
        _submitted(priority=priority)


@pytest.mark.parametrize("priority", [0, MAX_PRIORITY])
def test_the_priority_bounds_are_accepted(priority: int) -> None:
    assert _submitted(priority=priority).priority == priority


@pytest.mark.parametrize(("field", "value"), [("task", ""), ("queue", "")])
def test_a_task_without_a_name_or_queue_is_refused(field: str, value: str) -> None:
    with pytest.raises(DomainError):
        _submitted(**{field: value})


def test_a_stream_must_begin_with_submitted_at_version_one() -> None:
    ready = _ready()
    started = domain.start(ready, worker="w1", now=NOW)
    with pytest.raises(DomainError):
        evolve(None, started)
    with pytest.raises(DomainError):
        evolve(None, dataclasses.replace(_submitted(), version=2))
    with pytest.raises(DomainError):
        evolve(ready, dataclasses.replace(_submitted(task_id=ready.task_id), version=2))


def test_task_id_for_is_deterministic_per_tenant_and_key() -> None:
    assert domain.task_id_for("acme", "order-1") == domain.task_id_for("acme", "order-1")
    assert domain.task_id_for("acme", "order-1") != domain.task_id_for("acme", "order-2")
    assert domain.task_id_for("acme", "order-1") != domain.task_id_for("globex", "order-1")
    assert domain.task_id_for("acme", "order-1").version == 5


def test_task_id_for_is_random_without_a_key() -> None:
    ids = {domain.task_id_for("acme", None) for _ in range(50)}
    assert len(ids) == 50
    assert all(i.version == 4 for i in ids)


def test_task_id_for_never_confuses_two_tenant_and_key_pairs() -> None:
    assert domain.task_id_for("a\x00b", "c") != domain.task_id_for("a", "b\x00c")
