"""The task state machine of ``broker_q.domain.task``, driven by random command sequences.

The reference for what is legal is written out here, independently of the code under test:
:data:`LEGAL_COMMANDS` says which command each phase accepts and :data:`TRANSITIONS` which phase
each phase may move to. A phase is a status, except that ``blocked`` is two phases: waiting on
parents (only a release or a cancel may follow) and waiting for its time alone (it may start, as
the scheduler starts it when due). The machine tracks the phase itself, from the commands it ran,
and never reads it back from the code. Time comes from an injected clock; nothing here reads the
real one.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker_q.codec import decode_event, encode_event
from broker_q.domain import task as domain
from broker_q.domain.events import TaskEvent, TaskSubmitted
from broker_q.domain.task import FINAL_STATES, MAX_PRIORITY, TaskState, TaskStatus, evolve, replay
from broker_q.errors import DomainError

BLOCKED, READY, STARTED = TaskStatus.BLOCKED, TaskStatus.READY, TaskStatus.STARTED
RETRY_SCHEDULED, DEFERRED = TaskStatus.RETRY_SCHEDULED, TaskStatus.DEFERRED
SUCCEEDED, DEAD_LETTERED, CANCELLED = TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED
ON_PARENTS, UNTIL_DUE = "blocked on parents", "blocked until due"
"""The two phases of ``blocked``: some parent has not succeeded yet; only its ``due_at`` is left."""

Phase = TaskStatus | str
STATUS_OF: dict[Phase, TaskStatus] = {**{s: s for s in TaskStatus}, ON_PARENTS: BLOCKED, UNTIL_DUE: BLOCKED}

TRANSITIONS: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({READY, ON_PARENTS, UNTIL_DUE}),
    ON_PARENTS: frozenset({READY, UNTIL_DUE, CANCELLED}),  # released: ready, or still due later
    UNTIL_DUE: frozenset({STARTED, DEFERRED, CANCELLED}),
    READY: frozenset({STARTED, DEFERRED, CANCELLED}),
    # started -> started: a takeover
    STARTED: frozenset({STARTED, SUCCEEDED, RETRY_SCHEDULED, DEAD_LETTERED, CANCELLED}),
    RETRY_SCHEDULED: frozenset({STARTED, DEFERRED, CANCELLED}),
    DEFERRED: frozenset({STARTED, DEFERRED, CANCELLED}),
    SUCCEEDED: frozenset(),
    DEAD_LETTERED: frozenset({READY}),  # replayed by an operator
    CANCELLED: frozenset(),
}
"""Every phase a task may move to from each phase (``None``: the task does not exist yet)."""

LEGAL_COMMANDS: dict[Phase | None, frozenset[str]] = {
    None: frozenset({"submit"}),
    ON_PARENTS: frozenset({"release", "cancel"}),
    UNTIL_DUE: frozenset({"start", "defer", "cancel"}),
    READY: frozenset({"start", "defer", "cancel"}),
    STARTED: frozenset({"start", "succeed", "retry", "fail", "cancel"}),
    RETRY_SCHEDULED: frozenset({"start", "defer", "cancel"}),
    DEFERRED: frozenset({"start", "defer", "cancel"}),
    SUCCEEDED: frozenset(),
    DEAD_LETTERED: frozenset({"replay"}),
    CANCELLED: frozenset(),
}

RESULTING_PHASES: dict[str, frozenset[Phase]] = {
    "submit": frozenset({READY, ON_PARENTS, UNTIL_DUE}), "release": frozenset({READY, UNTIL_DUE}),
    "start": frozenset({STARTED}), "succeed": frozenset({SUCCEEDED}), "retry": frozenset({RETRY_SCHEDULED}),
    "fail": frozenset({DEAD_LETTERED}), "defer": frozenset({DEFERRED}), "replay": frozenset({READY}),
    "cancel": frozenset({CANCELLED}),
}
EVENT_TYPE = {"submit": "submitted", "start": "started", "succeed": "succeeded", "retry": "retry_scheduled",
              "fail": "dead_lettered", "defer": "deferred", "replay": "replayed", "cancel": "cancelled",
              "release": "released"}

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
PARENTS = tuple(uuid.UUID(int=n) for n in range(1, 4))
"""The parents a task may wait for (the domain does not look them up: the coordinator does)."""


class FakeClock:
    """A clock the test moves by hand: every reading is later than the previous one."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def test_the_reference_tables_agree() -> None:
    for phase, commands in LEGAL_COMMANDS.items():
        assert set().union(*(RESULTING_PHASES[c] for c in commands)) == TRANSITIONS[phase], phase
    # final: nothing leaves them but an operator's replay of a dead letter
    assert {p for p, targets in TRANSITIONS.items() if not targets} | {DEAD_LETTERED} == set(FINAL_STATES)
    assert {STATUS_OF[p] for p in TRANSITIONS if p is not None} == set(TaskStatus)


def submit_refusals(*, task_id: uuid.UUID, priority: int, due: datetime | None, parents: list[uuid.UUID],
                    receives: str | None) -> list[str]:
    """Why the reference refuses this submit: a word the refusal's message must contain, per reason."""
    reasons = []
    if not 0 <= priority <= MAX_PRIORITY:
        reasons.append("priority")
    if due is not None and due.tzinfo is None:
        reasons.append("aware")
    if task_id in parents:
        reasons.append("itself")
    if receives not in (None, "result", "results"):
        reasons.append("receives")
    elif receives == "result" and len(set(parents)) != 1:
        reasons.append("exactly one parent")
    elif receives is not None and not parents:
        reasons.append("no parents")
    return reasons


class TaskMachine(RuleBasedStateMachine):
    """One task, commands in random order; illegal ones must be refused and change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.task_id = uuid.uuid4()
        self.state: TaskState | None = None
        self.phase: Phase | None = None
        self.events: list[TaskEvent] = []
        self.final: TaskState | None = None

    def _decide(self, command: str, decide: Any, phase: Phase | None = None) -> None:
        """Run ``decide()``; apply its event if the reference says the command is legal now.

        ``phase``: the phase the reference expects after it (needed where a command has several).
        """
        before_state, before_events = self.state, list(self.events)
        legal = command in LEGAL_COMMANDS[self.phase]
        if not legal:
            hypothesis.event(f"refused: {command} when {self.phase}")  # --hypothesis-show-statistics shows the coverage
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
        if phase is None:
            (phase,) = RESULTING_PHASES[command]
        assert phase in RESULTING_PHASES[command]
        event = decide()
        assert EVENT_TYPE[command] == event.TYPE
        assert event.stream_id == self.task_id
        assert event.version == (1 if self.state is None else self.state.version + 1)
        assert event.timestamp == self.clock.now
        self._refuses_misplaced(event)
        new = evolve(self.state, event)
        assert phase in TRANSITIONS[self.phase], f"{self.phase} -> {phase} on {command}"
        assert new.status is STATUS_OF[phase], f"{self.phase} -> {new.status} on {command}, expected {phase}"
        if new.status is BLOCKED:
            assert bool(new.waiting_on) == (phase == ON_PARENTS)
        assert new.version == event.version
        assert self.state == before_state  # evolve returned a new state, the old one is intact
        hypothesis.event(f"{self.phase} -> {phase} on {command}")
        self.state, self.phase = new, phase
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
        eta=st.none() | st.floats(-3600, 0) | st.floats(0.001, 3600),
        naive=st.integers(0, 9).map(lambda n: n == 0),
        parents=st.lists(st.integers(0, 12), max_size=4),
        receives=st.sampled_from([None, None, "result", "results", "everything"]),
    )
    def submit(self, priority: int, args: list[Any], kwargs: dict[str, Any], tenant: str, step: float,
               eta: float | None, naive: bool, parents: list[int], receives: str | None) -> None:
        """Submit, now or after an eta (past or future, sometimes naive), after some parents (sometimes itself)."""
        now = self.clock.advance(step)
        due = None if eta is None else now + timedelta(seconds=eta)
        if due is not None and naive:
            due = due.replace(tzinfo=None)
        depends_on = [self.task_id if n == 0 else PARENTS[n % len(PARENTS)] for n in parents]

        def decide() -> TaskSubmitted:
            return domain.submit(task_id=self.task_id, task="t.add", queue="default", args=args, kwargs=kwargs,
                                 priority=priority, tenant=tenant, actor="client:test", now=now, due_at=due,
                                 depends_on=depends_on, receives=receives)

        refusals = submit_refusals(task_id=self.task_id, priority=priority, due=due, parents=depends_on,
                                   receives=receives)
        if refusals:
            hypothesis.event(f"refused: submit ({', '.join(refusals)})")
            with pytest.raises(DomainError, match=refusals[0] if len(refusals) == 1 else None):
                decide()
            return
        waits_until = due if due is not None and due > now else None
        first = self.state is None
        self._decide("submit", decide, ON_PARENTS if depends_on else UNTIL_DUE if waits_until else READY)
        if first:
            assert self.state is not None
            assert (self.state.priority, self.state.args, self.state.kwargs) == (priority, args, kwargs)
            assert self.state.submitted_at == now
            assert self.state.depends_on == self.state.waiting_on == tuple(dict.fromkeys(depends_on))
            assert (self.state.due_at, self.state.receives) == (due, receives)
            assert self.state.ready_at == (waits_until or now)

    @precondition(lambda self: self.state is not None)
    @rule(results=st.lists(json_values, min_size=len(PARENTS), max_size=len(PARENTS)), step=st.floats(0, 3600))
    def release(self, results: list[Any], step: float) -> None:
        """Every parent succeeded: the coordinator passes their results, in ``depends_on`` order."""
        assert self.state is not None
        state, now = self.state, self.clock.advance(step)
        given = results[:len(state.depends_on)]
        due_later = state.due_at is not None and state.due_at > max(now, state.submitted_at)
        self._decide("release", lambda: domain.release(state, results=given, actor="coordinator", now=now),
                     UNTIL_DUE if due_later else READY)
        if self.state is not state and self.state is not None:
            released = self.events[-1]
            expected = {None: None, "result": [given[0], *state.args], "results": [given, *state.args]}
            assert released.args == expected[state.receives]  # type: ignore[attr-defined]
            assert self.state.args == (state.args if state.receives is None else expected[state.receives])
            assert (self.state.waiting_on, self.state.depends_on) == ((), state.depends_on)
            assert self.state.ready_at == (state.due_at if due_later else now)
            assert self.state.attempts == state.attempts

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
            assert self.state.due_at is None

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
    max_examples=200, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
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


# -- blocked: an eta, parents ---------------------------------------------------------------------

PARENT_A, PARENT_B = uuid.UUID(int=1), uuid.UUID(int=2)


def test_an_eta_blocks_only_when_it_is_later_than_the_submission() -> None:
    for eta, status in ((NOW + timedelta(seconds=1), BLOCKED), (NOW, READY), (NOW - timedelta(days=1), READY)):
        state = evolve(None, _submitted(due_at=eta))
        assert (state.status, state.due_at, state.ready_at) == (status, eta, max(eta, NOW))
        assert domain.is_startable(state)  # blocked on time alone: the scheduler starts it when due


def test_a_blocked_task_with_parents_starts_only_after_its_release() -> None:
    state = evolve(None, _submitted(depends_on=[PARENT_A, PARENT_B, PARENT_A]))
    assert (state.status, state.depends_on, state.waiting_on) == (BLOCKED, (PARENT_A, PARENT_B), (PARENT_A, PARENT_B))
    assert not domain.is_startable(state)
    for refused in (lambda: domain.start(state, worker="w", now=NOW),
                    lambda: domain.defer(state, due_at=NOW, reason="r", actor="w", now=NOW)):
        with pytest.raises(DomainError):
            refused()
    with pytest.raises(DomainError, match="cannot start"):
        evolve(state, domain.started_event(task_id=state.task_id, version=2, attempt=1, worker="w",
                                           tenant=state.tenant, correlation_id=state.correlation_id, now=NOW))
    released = evolve(state, domain.release(state, results=[1, 2], actor="coordinator", now=NOW))
    assert (released.status, released.waiting_on, released.args, released.ready_at) == (READY, (), [1, 2], NOW)


@pytest.mark.parametrize(("receives", "parents", "args"), [
    (None, [PARENT_A, PARENT_B], [1, 2]),
    ("result", [PARENT_A], [{"a": 1}, 1, 2]),
    ("results", [PARENT_A, PARENT_B], [[{"a": 1}, "b"], 1, 2]),
])
def test_a_release_passes_the_parents_results_first(receives: str | None, parents: list[uuid.UUID],
                                                    args: list[Any]) -> None:
    state = evolve(None, _submitted(depends_on=parents, receives=receives))
    event = domain.release(state, results=[{"a": 1}, "b"][:len(parents)], actor="coordinator", now=NOW)
    assert event.args == (None if receives is None else args)
    assert evolve(state, event).args == args
    decoded = decode_event(event.stream_id, event.version, event.TOPIC, encode_event(event))
    assert evolve(state, decoded) == evolve(state, event)  # type: ignore[arg-type]


def test_a_release_before_the_eta_leaves_the_task_blocked_until_due() -> None:
    due = NOW + timedelta(hours=1)
    state = evolve(None, _submitted(depends_on=[PARENT_A], due_at=due))
    early = evolve(state, domain.release(state, results=[1], actor="coordinator", now=NOW + timedelta(minutes=1)))
    assert (early.status, early.waiting_on, early.ready_at) == (BLOCKED, (), due)
    assert domain.is_startable(early)
    late = evolve(state, domain.release(state, results=[1], actor="coordinator", now=due + timedelta(seconds=1)))
    assert (late.status, late.ready_at) == (READY, due + timedelta(seconds=1))


def test_a_release_stamped_before_the_submission_readies_a_task_whose_eta_was_past() -> None:
    """The coordinator's clock may be behind the submitter's: an eta that did not block the task at
    its submission does not block it at its release either."""
    for eta in (None, NOW, NOW - timedelta(seconds=1)):
        state = evolve(None, _submitted(depends_on=[PARENT_A], due_at=eta))
        early = NOW - timedelta(seconds=2)
        released = evolve(state, domain.release(state, results=[1], actor="coordinator", now=early))
        assert (released.status, released.ready_at) == (READY, early)


def test_a_task_is_released_once_and_only_when_blocked_on_parents() -> None:
    state = evolve(None, _submitted(depends_on=[PARENT_A]))
    event = domain.release(state, results=[1], actor="coordinator", now=NOW)
    released = evolve(state, event)
    with pytest.raises(DomainError, match="nothing to release"):
        domain.release(released, results=[1], actor="coordinator", now=NOW)
    with pytest.raises(DomainError, match="cannot be released"):
        evolve(released, dataclasses.replace(event, version=3))
    for other in (_ready(), evolve(None, _submitted(due_at=NOW + timedelta(hours=1)))):
        with pytest.raises(DomainError, match="nothing to release"):
            domain.release(other, results=[], actor="coordinator", now=NOW)


def test_a_blocked_task_can_be_cancelled() -> None:
    for submitted in (_submitted(depends_on=[PARENT_A]), _submitted(due_at=NOW + timedelta(hours=1))):
        state = evolve(None, submitted)
        cancelled = evolve(state, domain.cancel(state, reason="upstream_failed", actor="coordinator", now=NOW))
        assert (cancelled.status, cancelled.cancel_reason) == (CANCELLED, "upstream_failed")
        with pytest.raises(DomainError):
            domain.release(cancelled, results=[1], actor="coordinator", now=NOW)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"depends_on": [PARENT_A, PARENT_B], "receives": "result"}, "exactly one parent"),
    ({"receives": "results"}, "no parents"),
    ({"depends_on": [PARENT_A], "receives": "all"}, "receives"),
    ({"task_id": PARENT_A, "depends_on": [PARENT_B, PARENT_A]}, "itself"),
    ({"due_at": datetime(2030, 1, 1)}, "aware"),
    ({"depends_on": [uuid.UUID(int=n) for n in range(domain.MAX_PARENTS + 1)]}, "at most"),
])
def test_a_submit_that_cannot_wait_as_asked_is_refused(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(DomainError, match=match):
        _submitted(**overrides)


# -- sealed payloads (the domain carries them, opaque: sealing is broker_q.payloads') -----------


def _sealed(state_or_event: Any) -> Any:
    return dataclasses.replace(state_or_event, args=[], kwargs={}, sealed_arguments="bq1:k1.x:opaque")


def test_sealed_arguments_and_result_are_kept_as_they_came() -> None:
    state = evolve(None, _sealed(_submitted()))
    assert (state.args, state.kwargs, state.sealed_arguments) == ([], {}, "bq1:k1.x:opaque")
    state = evolve(state, domain.start(state, worker="w", now=NOW))
    done = domain.succeed(state, result=None, now=NOW)
    state = evolve(state, dataclasses.replace(done, sealed_result="bq1:k1.x:result"))
    assert (state.status, state.result, state.sealed_result) == (SUCCEEDED, None, "bq1:k1.x:result")


def test_a_sealed_release_replaces_the_arguments_and_a_plain_one_cannot_follow_sealed_ones() -> None:
    state = evolve(None, _sealed(_submitted(depends_on=[PARENT_A], receives="result")))
    event = domain.release(dataclasses.replace(state, sealed_arguments=None), results=[7], actor="c", now=NOW)
    assert event.args == [7]  # what the coordinator seals again
    with pytest.raises(DomainError, match="sealed arguments"):
        evolve(state, event)
    released = evolve(state, dataclasses.replace(event, args=None, sealed_arguments="bq1:k1.x:merged"))
    assert (released.status, released.args, released.sealed_arguments) == (READY, [], "bq1:k1.x:merged")


def test_a_dead_letter_with_sealed_arguments_is_replayed_with_new_ones_only_sealed() -> None:
    state = evolve(None, _sealed(_submitted()))
    state = evolve(state, domain.start(state, worker="w", now=NOW))
    state = evolve(state, domain.dead_letter(state, error_type="E", message="m", traceback=None, now=NOW))
    with pytest.raises(DomainError, match="must be sealed too"):
        domain.replay_dead_letter(state, reason="r", actor="op", now=NOW, kwargs={"k": 1})
    with pytest.raises(DomainError, match="not both"):
        domain.replay_dead_letter(state, reason="r", actor="op", now=NOW, args=[1], sealed_arguments="bq1:k:v")
    again = evolve(state, domain.replay_dead_letter(state, reason="r", actor="op", now=NOW))
    assert again.sealed_arguments == "bq1:k1.x:opaque"
    changed = evolve(state, domain.replay_dead_letter(state, reason="r", actor="op", now=NOW,
                                                      sealed_arguments="bq1:k2.y:new"))
    assert (changed.status, changed.args, changed.kwargs, changed.sealed_arguments) == (READY, [], {}, "bq1:k2.y:new")
    plain = evolve(None, _submitted())
    plain = evolve(plain, domain.start(plain, worker="w", now=NOW))
    plain = evolve(plain, domain.dead_letter(plain, error_type="E", message="m", traceback=None, now=NOW))
    sealed_now = evolve(plain, domain.replay_dead_letter(plain, reason="r", actor="op", now=NOW,
                                                         sealed_arguments="bq1:k1.x:whole"))
    assert (sealed_now.args, sealed_now.sealed_arguments) == ([], "bq1:k1.x:whole")
