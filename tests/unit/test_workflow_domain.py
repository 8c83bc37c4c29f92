"""The workflow domain (``broker_q/domain/workflow.py``): graphs checked, the fold, status, critical path."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.domain import task as tasks
from broker_q.domain import workflow
from broker_q.domain.events import TaskEvent, WorkflowCancelled
from broker_q.domain.task import TaskState, TaskStatus
from broker_q.domain.workflow import StepSpec, WorkflowOutcome, WorkflowState, WorkflowStep, plan
from broker_q.errors import DomainError

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def spec(name: str, *parents: str, receives: str | None = None) -> StepSpec:
    return StepSpec(name, "t.task", parents, receives)


# -- plan -----------------------------------------------------------------------------------------


def test_a_plan_puts_every_step_after_its_parents_and_keeps_the_given_order_otherwise() -> None:
    steps = [spec("load", "clean", "extract"), spec("extract"), spec("report"), spec("clean", "extract")]
    assert [s.name for s in plan(steps)] == ["extract", "report", "clean", "load"]


@pytest.mark.parametrize(("steps", "message"), [
    ([], "at least one step"),
    ([spec("a"), spec("a")], "two steps are named 'a'"),
    ([spec("")], "not a name"),
    ([spec("x" * 201)], "not a name"),
    ([spec("a", "b")], "waits for 'b', which is not a step"),
    ([spec("a", "a")], "waits for itself"),
    ([spec("a"), spec("b", "a", "a")], "names a parent twice"),
    ([spec("a"), spec("b", receives="results")], "has no parents: it receives no results"),
    ([spec("a"), spec("b"), spec("c", "a", "b", receives="result")], "exactly one parent"),
    ([spec("a"), spec("b", "a", receives="everything")], "receives must be"),
])
def test_a_bad_graph_is_refused_naming_what_is_wrong(steps: list[StepSpec], message: str) -> None:
    with pytest.raises(DomainError, match=message):
        plan(steps)


def test_a_cycle_is_refused_and_spelled_out_parent_to_child() -> None:
    steps = [spec("start"), spec("a", "start", "c"), spec("b", "a"), spec("c", "b"), spec("after", "c")]
    with pytest.raises(DomainError, match=r"in a cycle: 'a' -> 'b' -> 'c' -> 'a'"):
        plan(steps)


def test_more_steps_than_the_limit_are_refused() -> None:
    with pytest.raises(DomainError, match="at most"):
        plan([spec(f"s{i}") for i in range(workflow.MAX_STEPS + 1)])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_graph_is_either_ordered_parents_first_or_refused_as_a_cycle(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 12))
    names = [f"s{i}" for i in range(count)]
    steps = [spec(name, *(p for p in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
                          if p != name)) for name in names]
    acyclic = _acyclic(steps)
    if acyclic:
        ordered = plan(steps)
        seen: set[str] = set()
        for step in ordered:
            assert seen.issuperset(step.parents)
            seen.add(step.name)
        assert sorted(s.name for s in ordered) == sorted(s.name for s in steps)
    else:
        with pytest.raises(DomainError, match="cycle"):
            plan(steps)


def _acyclic(steps: list[StepSpec]) -> bool:
    parents = {s.name: set(s.parents) for s in steps}
    done: set[str] = set()
    while len(done) < len(parents):
        ready = [name for name, p in parents.items() if name not in done and p <= done]
        if not ready:
            return False
        done.update(ready)
    return True


# -- the workflow's stream ------------------------------------------------------------------------


def _submitted(*steps: WorkflowStep, returns: str | list[str] = "c") -> Any:
    return workflow.submitted(workflow_id=uuid.uuid4(), steps=steps, returns=returns, tenant="acme", actor="me",
                              now=T0)


def _steps() -> list[WorkflowStep]:
    return [WorkflowStep("a", uuid.uuid4(), "t.a"), WorkflowStep("b", uuid.uuid4(), "t.b", ("a",)),
            WorkflowStep("c", uuid.uuid4(), "t.c", ("a", "b"))]


def test_the_stream_folds_into_the_steps_and_a_cancellation() -> None:
    event = _submitted(*_steps())
    state = workflow.replay([event])
    assert state is not None
    assert [s.name for s in state.steps] == ["a", "b", "c"]
    assert state.step("c").parents == ("a", "b")
    assert state.result_steps == (state.step("c"),)
    cancelled = workflow.cancel(state, reason="no longer needed", actor="op", now=T0)
    assert isinstance(cancelled, WorkflowCancelled)
    after = workflow.evolve(state, cancelled)
    assert (after.version, after.cancel_reason) == (2, "no longer needed")
    with pytest.raises(DomainError, match="cancelled already"):
        workflow.cancel(after, reason="twice", actor="op", now=T0)
    with pytest.raises(DomainError, match="cancelled already"):
        workflow.evolve(after, WorkflowCancelled(stream_id=state.workflow_id, version=3, timestamp=T0,
                                                 tenant="acme", actor="op", correlation_id=state.workflow_id,
                                                 reason="again"))


def test_a_stream_whose_steps_are_not_parents_first_or_that_returns_no_step_is_refused() -> None:
    a, b, c = _steps()
    with pytest.raises(DomainError, match="comes before one of its parents"):
        _submitted(b, a, c)
    with pytest.raises(DomainError, match="does not have"):
        _submitted(a, b, c, returns=["b", "z"])
    with pytest.raises(DomainError, match="must begin with workflow_submitted"):
        workflow.evolve(None, WorkflowCancelled(stream_id=uuid.uuid4(), version=1, timestamp=T0, tenant="acme",
                                                actor="op", correlation_id=uuid.uuid4(), reason="r"))


# -- status and the critical path -----------------------------------------------------------------


class Tasks:
    """The steps' task states, told as the store would hold them (times given in seconds after T0)."""

    def __init__(self, state: WorkflowState) -> None:
        self.workflow = state
        self.states: dict[uuid.UUID, TaskState] = {}
        for step in state.steps:
            parents = [state.step(p).task_id for p in step.parents]
            event = tasks.submit(task_id=step.task_id, task=step.task, queue="default", args=[], kwargs={},
                                 priority=5, tenant="acme", actor="me", now=T0, depends_on=parents)
            self.states[step.task_id] = tasks.evolve(None, event)

    def _apply(self, name: str, event: TaskEvent) -> None:
        task_id = self.workflow.step(name).task_id
        self.states[task_id] = tasks.evolve(self.states[task_id], event)

    def _state(self, name: str) -> TaskState:
        return self.states[self.workflow.step(name).task_id]

    def release(self, name: str, at: float) -> None:
        self._apply(name, tasks.release(self._state(name), results=[], actor="coordinator", now=_at(at)))

    def run(self, name: str, start: float, end: float, *, fail: bool = False) -> None:
        state = self._state(name)
        if state.status is TaskStatus.BLOCKED:
            self.release(name, start)
        self._apply(name, tasks.start(self._state(name), worker="w", now=_at(start)))
        if fail:
            self._apply(name, tasks.dead_letter(self._state(name), error_type="ValueError", message="bad",
                                                traceback=None, now=_at(end)))
        else:
            self._apply(name, tasks.succeed(self._state(name), result=name, now=_at(end)))

    def start(self, name: str, at: float) -> None:
        if self._state(name).status is TaskStatus.BLOCKED:
            self.release(name, at)
        self._apply(name, tasks.start(self._state(name), worker="w", now=_at(at)))

    def cancel(self, name: str, at: float, reason: str) -> None:
        self._apply(name, tasks.cancel(self._state(name), reason=reason, actor="c", now=_at(at)))


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _diamond() -> WorkflowState:
    steps = [WorkflowStep("extract", uuid.uuid4(), "t.e"), WorkflowStep("fast", uuid.uuid4(), "t.f", ("extract",)),
             WorkflowStep("slow", uuid.uuid4(), "t.s", ("extract",)),
             WorkflowStep("load", uuid.uuid4(), "t.l", ("fast", "slow")),
             WorkflowStep("side", uuid.uuid4(), "t.x")]
    state = workflow.replay([_submitted(*steps, returns=["load", "side"])])
    assert state is not None
    return state


def test_the_critical_path_is_the_chain_that_decided_when_the_workflow_finished() -> None:
    state = _diamond()
    told = Tasks(state)
    told.run("extract", 0.5, 2)     # waited 0.5 s in its queue, ran 1.5 s: 2 s on its account
    told.run("fast", 2, 3)
    told.run("slow", 2.5, 7)        # 5 s after extract ended
    told.run("side", 0, 4)          # the longest single step, but alone
    told.run("load", 7.5, 8)        # ready when slow ended, at 7: 1 s
    status = workflow.status(state, told.states, now=_at(100))
    assert status.state is WorkflowOutcome.SUCCEEDED
    assert status.finished
    assert status.critical_path == ("extract", "slow", "load")
    assert status.critical_path_seconds == pytest.approx(8.0)  # the workflow's makespan
    elapsed = {step.name: step.elapsed for step in status.steps}
    assert elapsed == pytest.approx({"extract": 2, "fast": 1, "slow": 5, "load": 1, "side": 4})


def test_a_running_workflow_shows_what_each_blocked_step_waits_for_and_counts_running_steps_until_now() -> None:
    state = _diamond()
    told = Tasks(state)
    told.run("extract", 0, 1)
    told.run("fast", 1, 2)
    told.start("slow", 1)
    told.run("side", 0, 3)
    status = workflow.status(state, told.states, now=_at(10))
    by_name = {step.name: step for step in status.steps}
    assert status.state is WorkflowOutcome.RUNNING
    assert not status.finished
    assert by_name["load"].state is TaskStatus.BLOCKED
    assert by_name["load"].waiting_for == ("slow",)  # fast succeeded already
    assert by_name["slow"].waiting_for == ()
    assert by_name["slow"].elapsed == pytest.approx(9)  # running: until now
    assert by_name["load"].elapsed == 0                 # a parent has not ended
    assert status.critical_path == ("extract", "slow", "load")
    assert status.critical_path_seconds == pytest.approx(10)  # so far


def test_a_step_ready_but_not_started_counts_its_wait_until_now() -> None:
    state = _diamond()
    status = workflow.status(state, Tasks(state).states, now=_at(4))
    by_name = {step.name: step for step in status.steps}
    assert by_name["extract"].elapsed == pytest.approx(4)   # ready since its submission: waiting for a worker
    assert by_name["fast"].waiting_for == ("extract",)
    assert by_name["fast"].elapsed == 0
    assert status.critical_path == ("extract", "fast", "load")  # the first of equal paths, in step order


def test_a_dead_lettered_step_fails_the_workflow_and_its_downstream_shows_why() -> None:
    state = _diamond()
    told = Tasks(state)
    told.run("extract", 0, 1)
    told.run("slow", 1, 2, fail=True)
    told.cancel("load", 2.1, "upstream_failed: parent x was dead_lettered")
    status = workflow.status(state, told.states, now=_at(3))
    by_name = {step.name: step for step in status.steps}
    assert status.state is WorkflowOutcome.FAILED
    assert not status.finished  # fast and side may still run
    assert by_name["slow"].error == "ValueError: bad"
    assert by_name["load"].cancel_reason == "upstream_failed: parent x was dead_lettered"
    assert by_name["load"].waiting_for == ()


def test_a_cancelled_workflow_is_cancelled_whatever_its_steps_are() -> None:
    state = _diamond()
    told = Tasks(state)
    cancelled = workflow.evolve(state, workflow.cancel(state, reason="stop", actor="op", now=_at(1)))
    for name in ("extract", "fast", "slow", "load", "side"):
        told.cancel(name, 1, "workflow cancelled: stop")
    status = workflow.status(cancelled, told.states, now=_at(2))
    assert (status.state, status.finished, status.cancel_reason) == (WorkflowOutcome.CANCELLED, True, "stop")
