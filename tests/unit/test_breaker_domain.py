"""The circuit breaker state machine: decisions, their events, and the fold that reads them back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.domain.breaker import (
    BreakerPhase,
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    admit,
    breaker_id,
    evolve,
    failures_in_window,
    force,
    new_state,
    record_failure,
    record_success,
    replay,
    status,
)
from broker_q.domain.events import (
    BreakerClosed,
    BreakerEvent,
    BreakerFailureRecorded,
    BreakerOpened,
    BreakerProbeStarted,
)
from broker_q.errors import DomainError

T0 = datetime(2030, 1, 1, tzinfo=UTC)
POLICY = BreakerPolicy(failure_threshold=3, window=10.0, open_for=30.0, probe_timeout=20.0, probe_wait=5.0)
WORKER = "worker:w1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def apply(state: BreakerState, events: list[BreakerEvent]) -> BreakerState:
    return replay(state.service, events, state)


def fail(state: BreakerState, when: float, task: uuid.UUID | None = None) -> tuple[BreakerState, list[BreakerEvent]]:
    events = record_failure(state, POLICY, task_id=task or uuid.uuid4(), error_type="ConnectionError", now=at(when),
                            actor=WORKER)
    return apply(state, events), events


def opened(seconds: float = 0.0) -> BreakerState:
    """A breaker opened by three failures ending at ``seconds``."""
    state = new_state("payments")
    for when in (seconds - 2, seconds - 1, seconds):
        state, _ = fail(state, when)
    assert state.phase is BreakerPhase.OPEN
    return state


def probing(task: uuid.UUID) -> BreakerState:
    state = opened()
    admission = admit(state, POLICY, task_id=task, now=at(30), actor=WORKER)
    assert admission.action == "probe"
    assert admission.event is not None
    return evolve(state, admission.event)


def test_breaker_id_is_deterministic_per_service() -> None:
    assert breaker_id("payments") == breaker_id("payments") != breaker_id("mail")
    assert breaker_id("payments").version == 5
    with pytest.raises(DomainError):
        breaker_id("not a name")


@pytest.mark.parametrize("options", [{"failure_threshold": 0}, {"failure_threshold": 1001}, {"window": 0},
                                     {"open_for": -1}, {"probe_timeout": 0}, {"probe_wait": 86400 * 8}])
def test_policy_refuses_values_that_mean_nothing(options: dict[str, float]) -> None:
    with pytest.raises(DomainError):
        BreakerPolicy(**options)  # type: ignore[arg-type]


def test_a_new_breaker_is_closed_and_runs_tasks() -> None:
    state = new_state("payments")
    assert status(state, T0) is BreakerStatus.CLOSED
    assert admit(state, POLICY, task_id=uuid.uuid4(), now=T0, actor=WORKER).action == "run"


def test_failures_reaching_the_threshold_within_the_window_open_the_breaker() -> None:
    state = new_state("payments")
    state, first = fail(state, 0)
    state, second = fail(state, 4)
    assert [type(e) for e in first + second] == [BreakerFailureRecorded, BreakerFailureRecorded]
    assert failures_in_window(state, POLICY, at(5)) == 2
    state, third = fail(state, 9)
    assert [type(e) for e in third] == [BreakerFailureRecorded, BreakerOpened]
    assert [e.version for e in third] == [3, 4]
    opening = third[1]
    assert isinstance(opening, BreakerOpened)
    assert opening.until == at(39)
    assert not opening.forced
    assert all(e.tenant == "system" and e.correlation_id == breaker_id("payments") for e in first + third)
    assert status(state, at(38)) is BreakerStatus.OPEN
    assert failures_in_window(state, POLICY, at(10)) == 0  # opening starts the count again


def test_failures_older_than_the_window_do_not_count() -> None:
    state = new_state("payments")
    for when in (0, 5, 11, 16, 22):  # never three within 10 s
        state, events = fail(state, when)
        assert [type(e) for e in events] == [BreakerFailureRecorded]
    assert state.phase is BreakerPhase.CLOSED
    assert failures_in_window(state, POLICY, at(22)) == 2


def test_an_open_breaker_records_no_failures_and_defers_tasks_to_the_half_open_time() -> None:
    state = opened()
    assert record_failure(state, POLICY, task_id=uuid.uuid4(), error_type="E", now=at(1), actor=WORKER) == []
    assert record_success(state, task_id=uuid.uuid4(), now=at(1), actor=WORKER) == []
    admission = admit(state, POLICY, task_id=uuid.uuid4(), now=at(5), actor=WORKER)
    assert (admission.action, admission.until, admission.event, admission.runs) == ("defer", at(30), None, False)


def test_half_open_after_open_for_admits_one_probe() -> None:
    state = opened()
    assert status(state, at(30)) is BreakerStatus.HALF_OPEN
    probe = uuid.uuid4()
    admission = admit(state, POLICY, task_id=probe, now=at(30), actor=WORKER)
    assert admission.action == "probe"
    assert admission.runs
    assert isinstance(admission.event, BreakerProbeStarted)
    assert (admission.event.task_id, admission.event.until, admission.event.version) == (probe, at(50), 5)
    state = evolve(state, admission.event)
    assert status(state, at(31)) is BreakerStatus.PROBING
    other = admit(state, POLICY, task_id=uuid.uuid4(), now=at(31), actor=WORKER)
    assert (other.action, other.until) == ("defer", at(36))  # probe_wait, sooner than the probe's deadline
    late = admit(state, POLICY, task_id=uuid.uuid4(), now=at(48), actor=WORKER)
    assert (late.action, late.until) == ("defer", at(50))
    again = admit(state, POLICY, task_id=probe, now=at(32), actor=WORKER)
    assert (again.action, again.event) == ("probe", None)  # the probe delivered twice is still the probe


def test_the_probe_succeeding_closes_the_breaker() -> None:
    probe = uuid.uuid4()
    state = probing(probe)
    assert record_success(state, task_id=uuid.uuid4(), now=at(31), actor=WORKER) == []
    events = record_success(state, task_id=probe, now=at(31), actor=WORKER)
    assert [type(e) for e in events] == [BreakerClosed]
    state = apply(state, events)
    assert status(state, at(31)) is BreakerStatus.CLOSED
    assert state.probe is None
    assert admit(state, POLICY, task_id=uuid.uuid4(), now=at(31), actor=WORKER).action == "run"


def test_the_probe_failing_opens_the_breaker_again() -> None:
    probe = uuid.uuid4()
    state = probing(probe)
    assert record_failure(state, POLICY, task_id=uuid.uuid4(), error_type="E", now=at(31), actor=WORKER) == []
    state, events = fail(state, 31, task=probe)
    assert [type(e) for e in events] == [BreakerOpened]
    assert isinstance(events[0], BreakerOpened)
    assert events[0].until == at(61)
    assert status(state, at(60)) is BreakerStatus.OPEN
    assert status(state, at(61)) is BreakerStatus.HALF_OPEN


def test_a_probe_past_its_deadline_lets_another_task_probe() -> None:
    lost = uuid.uuid4()
    state = probing(lost)  # its worker died: no outcome will come
    assert status(state, at(49)) is BreakerStatus.PROBING
    assert status(state, at(50)) is BreakerStatus.HALF_OPEN
    admission = admit(state, POLICY, task_id=uuid.uuid4(), now=at(50), actor=WORKER)
    assert admission.action == "probe"
    assert admission.event is not None
    state = evolve(state, admission.event)
    assert state.probe == admission.event.task_id
    assert record_success(state, task_id=lost, now=at(51), actor=WORKER) == []  # the lost probe is not the probe


def test_forced_open_stays_open_until_forced_closed() -> None:
    state = new_state("payments")
    event = force(state, open=True, reason="vendor outage", actor="operator:ann@host", now=T0)
    assert isinstance(event, BreakerOpened)
    assert event.forced
    assert event.until is None
    state = evolve(state, event)
    far = at(86400 * 365)
    assert status(state, far) is BreakerStatus.OPEN
    admission = admit(state, POLICY, task_id=uuid.uuid4(), now=far, actor=WORKER)
    assert (admission.action, admission.until) == ("defer", far + timedelta(seconds=30))
    closing = force(state, open=False, reason="vendor back", actor="operator:ann@host", now=at(60))
    assert isinstance(closing, BreakerClosed)
    assert closing.forced
    assert status(evolve(state, closing), at(60)) is BreakerStatus.CLOSED


def test_an_operator_can_force_an_automatically_opened_or_probing_breaker() -> None:
    state = opened()
    assert evolve(state, force(state, open=True, reason="hold", actor="op", now=at(1))).forced
    state = probing(uuid.uuid4())
    assert evolve(state, force(state, open=False, reason="ok", actor="op", now=at(31))).phase is BreakerPhase.CLOSED


def test_illegal_transitions_are_domain_errors() -> None:
    closed = new_state("payments")
    with pytest.raises(DomainError):
        force(closed, open=False, reason="nothing to close", actor="op", now=T0)
    forced = evolve(closed, force(closed, open=True, reason="outage", actor="op", now=T0))
    with pytest.raises(DomainError):
        force(forced, open=True, reason="twice", actor="op", now=T0)
    with pytest.raises(DomainError):
        force(closed, open=True, reason="  ", actor="op", now=T0)
    meta = {"stream_id": closed.stream_id, "version": 1, "timestamp": T0, "tenant": "system", "actor": WORKER,
            "correlation_id": closed.stream_id, "service": "payments"}
    with pytest.raises(DomainError):  # no probe of a closed breaker
        evolve(closed, BreakerProbeStarted(**meta, task_id=uuid.uuid4(), until=at(10)))  # type: ignore[arg-type]
    with pytest.raises(DomainError):  # only a probe's success (or an operator) closes
        evolve(opened(), BreakerClosed(**{**meta, "version": 7}, reason="x"))  # type: ignore[arg-type]
    early = opened()
    with pytest.raises(DomainError):  # a probe before the half-open time
        evolve(early, BreakerProbeStarted(**{**meta, "version": 7, "timestamp": at(29)},  # type: ignore[arg-type]
                                          task_id=uuid.uuid4(), until=at(49)))
    with pytest.raises(DomainError):  # an open breaker records no failure
        evolve(early, BreakerFailureRecorded(**{**meta, "version": 7}, task_id=uuid.uuid4(),  # type: ignore[arg-type]
                                             error_type="E"))
    with pytest.raises(DomainError):  # a gap in versions
        evolve(closed, BreakerFailureRecorded(**{**meta, "version": 2}, task_id=uuid.uuid4(),  # type: ignore[arg-type]
                                              error_type="E"))
    with pytest.raises(DomainError):  # another service's event
        evolve(closed, BreakerFailureRecorded(**{**meta, "service": "mail"}, task_id=uuid.uuid4(),  # type: ignore[arg-type]
                                              error_type="E"))


# -- every sequence of decisions folds back to the state that made them -------------------------------

_step = st.tuples(
    st.sampled_from(["fail", "succeed", "admit", "fail_probe", "succeed_probe", "force_open", "force_close"]),
    st.floats(min_value=0, max_value=40, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_step, max_size=60), threshold=st.integers(1, 4))
def test_folding_the_events_gives_the_state_the_decisions_were_made_on(
    steps: list[tuple[str, float]], threshold: int
) -> None:
    policy = BreakerPolicy(failure_threshold=threshold, window=15.0, open_for=20.0, probe_timeout=25.0)
    state = new_state("payments")
    log: list[BreakerEvent] = []
    now = T0
    for action, pause in steps:
        now += timedelta(seconds=pause)
        before = status(state, now)
        task = state.probe if action.endswith("_probe") and state.probe else uuid.uuid4()
        events: list[BreakerEvent]
        if action in ("fail", "fail_probe"):
            events = record_failure(state, policy, task_id=task, error_type="E", now=now, actor=WORKER)
        elif action in ("succeed", "succeed_probe"):
            events = record_success(state, task_id=task, now=now, actor=WORKER)
        elif action == "admit":
            admission = admit(state, policy, task_id=task, now=now, actor=WORKER)
            assert admission.runs == (before is not BreakerStatus.OPEN and before is not BreakerStatus.PROBING)
            assert (admission.action == "probe" and admission.event is not None) == (before is BreakerStatus.HALF_OPEN)
            assert admission.action != "defer" or (admission.until is not None and admission.until > now)
            events = [] if admission.event is None else [admission.event]
        else:
            try:
                events = [force(state, open=action == "force_open", reason="r", actor="op", now=now)]
            except DomainError:
                assert (state.phase is BreakerPhase.CLOSED) if action == "force_close" else state.forced
                continue
        assert [e.version for e in events] == list(range(state.version + 1, state.version + 1 + len(events)))
        state = apply(state, events)
        log.extend(events)
        if any(isinstance(e, BreakerOpened) for e in events):
            assert status(state, now) is BreakerStatus.OPEN
        if any(isinstance(e, BreakerClosed) for e in events):
            assert status(state, now) is BreakerStatus.CLOSED
    assert replay("payments", log) == state
    assert [e.version for e in log] == list(range(1, len(log) + 1))
