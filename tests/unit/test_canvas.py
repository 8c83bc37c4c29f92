"""Signatures composed into workflows, compiled into steps and recorded on the in-memory store (no worker runs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from broker_q import App, Signature, TaskStatus, chain, chord, dag, group
from broker_q.canvas import compile_workflow
from broker_q.domain.events import TaskSubmitted, WorkflowCancelled, WorkflowSubmitted, event_id
from broker_q.domain.workflow import WorkflowOutcome
from broker_q.errors import DomainError, TaskNotFound, ValidationError
from projections.views import summary


@pytest.fixture
def app() -> Iterator[App]:
    app = App(store="memory://")

    @app.task(name="etl.extract")
    def extract(source: str) -> list[int]:
        return [1, 2]

    @app.task(name="math.add")
    def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="math.total")
    def total(values: list[int]) -> int:
        return sum(values)

    yield app
    app.close()


def s(app: App, name: str, *args: Any, **kwargs: Any) -> Signature[Any]:
    return app.tasks[name].s(*args, **kwargs)


def shape(workflow: Any) -> list[tuple[str, tuple[str, ...], str | None]]:
    """Each step's name, parents and what it receives, parents first."""
    return [(spec.name, spec.parents, spec.receives) for spec, _ in compile_workflow(workflow).steps]


# -- compiling ------------------------------------------------------------------------------------


def test_a_chain_passes_each_result_to_the_next(app: App) -> None:
    workflow = s(app, "math.add", 1, 2) | s(app, "math.add", 3) | s(app, "math.add", y=4)
    assert shape(workflow) == [("add#1", (), None), ("add#2", ("add#1",), "result"),
                               ("add#3", ("add#2",), "result")]
    assert compile_workflow(workflow).returns == "add#3"
    assert shape(chain(s(app, "math.add", 1), app.tasks["math.total"].si([1]))) == [
        ("add", (), None), ("total", ("add",), None)]  # .si(): waits, receives nothing


def test_a_group_runs_its_members_side_by_side_and_returns_the_list_in_order(app: App) -> None:
    members = group(s(app, "math.add", i) for i in range(3))
    assert shape(members) == [("add#1", (), None), ("add#2", (), None), ("add#3", (), None)]
    assert compile_workflow(members).returns == ["add#1", "add#2", "add#3"]
    assert shape(group(s(app, "math.add", 1), s(app, "math.total", [2]))) == [("add", (), None),
                                                                              ("total", (), None)]
    assert shape(group([s(app, "math.add", 1)])) == [("add", (), None)]


def test_a_chord_callback_waits_for_every_member_and_receives_the_list(app: App) -> None:
    members = group(s(app, "math.add", i) for i in range(3))
    expected = [("add#1", (), None), ("add#2", (), None), ("add#3", (), None),
                ("total", ("add#1", "add#2", "add#3"), "results")]
    assert shape(chord(members, s(app, "math.total"))) == expected
    assert shape(members | s(app, "math.total")) == expected
    assert shape(chord([s(app, "math.add", i) for i in range(3)], s(app, "math.total"))) == expected


def test_a_chain_of_groups_hands_one_result_to_each_member_and_their_list_to_what_follows(app: App) -> None:
    workflow = s(app, "etl.extract", "db") | group(s(app, "math.total"), s(app, "math.total")) \
        | s(app, "math.total")
    assert shape(workflow) == [("extract", (), None), ("total#1", ("extract",), "result"),
                               ("total#2", ("extract",), "result"), ("total#3", ("total#1", "total#2"), "results")]
    chained_members = group(s(app, "math.add", 1) | s(app, "math.add", 2), s(app, "math.add", 3))
    assert shape(chained_members | s(app, "math.total")) == [
        ("add#1", (), None), ("add#2", ("add#1",), "result"), ("add#3", (), None),
        ("total", ("add#2", "add#3"), "results")]


def test_a_dag_passes_each_step_its_parents_results_as_a_list_in_the_order_named(app: App) -> None:
    workflow = dag({
        "load": (s(app, "math.total"), ["clean", "extract"]),
        "extract": (s(app, "etl.extract", "db"), []),
        "clean": (s(app, "math.total"), ["extract"]),
        "audit": s(app, "math.add", 1),
        "count": (s(app, "math.add", 2).set(receives="result"), ["extract"]),
    })
    assert shape(workflow) == [("extract", (), None), ("clean", ("extract",), "results"),
                               ("load", ("clean", "extract"), "results"), ("audit", (), None),
                               ("count", ("extract",), "result")]
    assert compile_workflow(workflow).returns == ["load", "audit", "count"]  # every sink, in the mapping's order
    assert compile_workflow(dag({"a": s(app, "math.add", 1), "b": (s(app, "math.total"), ["a"])})).returns == "b"


def test_a_dag_after_a_task_hands_its_result_to_the_steps_without_parents(app: App) -> None:
    inner = dag({"a": s(app, "math.add"), "b": (s(app, "math.total"), ["a"])})
    assert shape(s(app, "math.add", 1) | inner | s(app, "math.total")) == [
        ("add", (), None), ("a", ("add",), "result"), ("b", ("a",), "results"), ("total", ("b",), "result")]


@pytest.mark.parametrize(("steps", "message"), [
    ({"a": ("sig", ["b"]), "b": ("sig", ["a"])}, r"cycle: 'a' -> 'b' -> 'a'"),
    ({"a": ("sig", ["a"])}, "waits for itself"),
    ({"a": ("sig", ["nowhere"])}, "waits for 'nowhere', which is not a step"),
])
def test_a_dag_with_a_cycle_or_an_unknown_parent_is_refused_when_it_is_made(
        app: App, steps: dict[str, Any], message: str) -> None:
    signature = s(app, "math.add", 1)
    with pytest.raises(DomainError, match=message):
        dag({name: (signature, parents) for name, (_, parents) in steps.items()})
    assert app.store.max_position() == 0


@pytest.mark.parametrize(("make", "message"), [
    (lambda app: group(), "at least one member"),
    (lambda app: group(group(s(app, "math.add", 1), s(app, "math.add", 2)), s(app, "math.add", 3))
     | s(app, "math.total"), "ends in a group"),
    (lambda app: group(s(app, "math.add", 1), "add"), "not str"),
    (lambda app: dag({"a": (s(app, "math.add", 1), "b")}), "list of step names"),
    (lambda app: dag({"a": ("math.add", [])}), "must be a signature"),
    (lambda app: dag({}), "at least one step"),
    (lambda app: s(app, "math.add", 1).set(speed=3), "unknown option"),
    (lambda app: s(app, "math.add", 1).set(receives="all"), "receives must be"),
])
def test_a_composition_that_means_nothing_is_refused(app: App, make: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        compile_workflow(make(app))


def test_parts_of_two_apps_are_not_one_workflow(app: App) -> None:
    other = App(store="memory://")
    with pytest.raises(ValidationError, match="different apps"):
        (s(app, "math.add", 1) | other.signature("math.total")).delay()


def test_a_signature_reads_as_it_was_written(app: App) -> None:
    workflow = s(app, "math.add", 1, y=2) | app.tasks["math.total"].si([3])
    assert repr(workflow) == "math.add.s(1, y=2) | math.total.si([3])"


# -- submitting -----------------------------------------------------------------------------------


def test_a_workflow_is_one_append_of_its_own_event_and_every_step_s_submitted(app: App) -> None:
    workflow = s(app, "etl.extract", "db") | group(s(app, "math.total"), s(app, "math.total")) \
        | s(app, "math.total").set(queue="reports", priority=8)
    handle = workflow.delay()
    log = app.store.read_log(0, 100)
    assert [r.position for r in log] == [1, 2, 3, 4, 5]
    head, *steps = (r.event for r in log)
    assert isinstance(head, WorkflowSubmitted)
    assert head.stream_id == handle.id
    assert [step["name"] for step in head.steps] == ["extract", "total#1", "total#2", "total#3"]
    assert head.returns == "total#3"
    ids = {step["name"]: uuid.UUID(step["task_id"]) for step in head.steps}
    assert all(isinstance(e, TaskSubmitted) for e in steps)
    submitted = {e.stream_id: e for e in steps if isinstance(e, TaskSubmitted)}
    assert list(submitted) == list(ids.values())
    for event in submitted.values():
        assert (event.correlation_id, event.causation_id) == (handle.id, event_id(handle.id, 1))
    callback = submitted[ids["total#3"]]
    assert callback.depends_on == [ids["total#1"], ids["total#2"]]
    assert (callback.receives, callback.queue, callback.priority) == ("results", "reports", 8)
    assert submitted[ids["total#1"]].depends_on == [ids["extract"]]
    assert submitted[ids["total#1"]].receives == "result"
    assert app.get_task(ids["extract"]).status is TaskStatus.READY
    assert app.get_task(ids["total#3"]).status is TaskStatus.BLOCKED
    assert summary(head) == "workflow of 4 step(s) submitted"  # its line in the audit log


async def test_a_workflow_submitted_from_a_coroutine_is_one_append_too(app: App) -> None:
    handle = await group(s(app, "math.add", i) for i in range(50)).submit()
    assert app.store.max_position() == 51
    assert len(handle.state().steps) == 50


def test_a_step_whose_arguments_do_not_fit_records_nothing(app: App) -> None:
    with pytest.raises(ValidationError, match="argument 'values' must be list"):
        (group(*(s(app, "math.add", i) for i in range(5)), s(app, "math.total", "x")) | s(app, "math.total")).delay()
    with pytest.raises(ValidationError, match="after the parents' results"):
        (s(app, "math.add", 1) | s(app, "math.add", 1, 2)).delay()  # no room left for the result
    assert app.store.max_position() == 0


def test_options_of_a_step_are_its_task_s(app: App) -> None:
    eta = datetime(2099, 1, 1, tzinfo=UTC)
    workflow = group(s(app, "math.add", 1).set(countdown=60, max_attempts=3, time_limit=5),
                     app.signature("elsewhere.task", [1], {"k": "v"}, eta=eta, queue="other"))
    handle = workflow.delay()
    first, second = (app.history(step.task_id)[0] for step in handle.state().steps)
    assert isinstance(first, TaskSubmitted)
    assert isinstance(second, TaskSubmitted)
    assert first.due_at is not None
    assert 59 < (first.due_at - first.timestamp).total_seconds() <= 60
    assert (first.max_attempts, first.time_limit) == (3, 5)
    assert second.sealed_arguments is not None
    assert app.payloads.open_arguments(second.tenant, second.stream_id, second.sealed_arguments) == ([1], {"k": "v"})
    assert (second.task, second.args, second.kwargs, second.queue, second.due_at) == (
        "elsewhere.task", [], {}, "other", eta)
    with pytest.raises(ValidationError, match="not both"):
        s(app, "math.add", 1).set(countdown=1, eta=eta).delay()


def test_the_status_of_a_workflow_that_no_worker_runs_shows_what_blocks_each_step(app: App) -> None:
    handle = (s(app, "etl.extract", "db") | group(s(app, "math.total"), s(app, "math.total"))).delay()
    status = app.workflow(handle.id)
    assert status.state is WorkflowOutcome.RUNNING
    assert [(step.name, step.state, step.waiting_for) for step in status.steps] == [
        ("extract", TaskStatus.READY, ()), ("total#1", TaskStatus.BLOCKED, ("extract",)),
        ("total#2", TaskStatus.BLOCKED, ("extract",))]
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)


def test_cancelling_a_workflow_cancels_every_step_and_a_second_cancel_is_refused(app: App) -> None:
    handle = (s(app, "etl.extract", "db") | s(app, "math.total")).delay()
    status = app.cancel_workflow(handle.id, reason="wrong source")
    assert (status.state, status.finished, status.cancel_reason) == (WorkflowOutcome.CANCELLED, True,
                                                                      "wrong source")
    assert {step.cancel_reason for step in status.steps} == {"workflow cancelled: wrong source"}
    assert [e.TYPE for e in app.history(handle.id)] == ["workflow_submitted", "workflow_cancelled"]
    assert summary(app.history(handle.id)[1]) == "workflow cancelled: wrong source"
    with pytest.raises(DomainError, match="cancelled already"):
        app.cancel_workflow(handle.id, reason="again")
    from broker_q import TaskCancelled

    with pytest.raises(TaskCancelled, match="workflow cancelled: wrong source"):
        handle.wait(timeout=1)


def test_a_cancel_that_stopped_halfway_cancels_the_steps_left_when_run_again(app: App) -> None:
    handle = group(s(app, "math.add", 1), s(app, "math.add", 2)).delay()
    state = handle.state()
    app.store.append([WorkflowCancelled(stream_id=handle.id, version=2, timestamp=datetime.now(UTC),
                                        tenant=state.tenant, actor="op", correlation_id=handle.id, reason="stop")])
    app.cancel(state.steps[0].task_id, reason="workflow cancelled: stop")
    status = app.cancel_workflow(handle.id, reason="stop")
    assert [step.state for step in status.steps] == [TaskStatus.CANCELLED, TaskStatus.CANCELLED]
    assert [e.TYPE for e in app.history(handle.id)] == ["workflow_submitted", "workflow_cancelled"]


def test_a_finished_workflow_cannot_be_cancelled_and_an_unknown_one_is_not_found(app: App) -> None:
    handle = s(app, "math.add", 1).delay()
    app.cancel(handle.state().steps[0].task_id, reason="by hand")
    with pytest.raises(DomainError, match="is finished"):
        app.cancel_workflow(handle.id)
    assert app.workflow(handle.id).state is WorkflowOutcome.FAILED
    with pytest.raises(TaskNotFound, match="no workflow"):
        app.workflow(uuid.uuid4())
    task = app.submit("math.add", [1])
    with pytest.raises(TaskNotFound, match="names a submitted record"):
        app.workflow(task.id)
    assert handle.step("add").id == handle.state().steps[0].task_id
    with pytest.raises(KeyError, match="no step"):
        handle.step("nope")
