"""Workflows: graphs of named steps, checked before anything is stored; a workflow's stream; its status.

A workflow is a directed acyclic graph of steps. Each step is one task, submitted with the tasks of
its parent steps as its ``depends_on`` (design flow 5): it is blocked until every parent has
succeeded, then the coordinator releases it, passing the parents' results in front of its own
arguments as the step ``receives`` them (``result``: the one parent's result; ``results``: the list
of its parents' results, in the order the parents are named). If a parent fails for good, the step
and everything downstream of it is cancelled (``upstream_failed``).

The whole workflow is one transaction: a ``workflow_submitted`` (the workflow's own stream) and the
``submitted`` of every step. So the graph is checked here, before that transaction: :func:`plan`
refuses an empty graph, a name used twice, an unknown parent and a cycle, naming the steps at fault.

Everything here is pure: no I/O and no clock (the caller passes ``now``).
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from broker_q.domain.events import WorkflowCancelled, WorkflowEvent, WorkflowSubmitted
from broker_q.domain.task import FINAL_STATES, MAX_PARENTS, TaskState, TaskStatus
from broker_q.errors import DomainError

__all__ = [
    "MAX_STEPS",
    "StepSpec",
    "StepStatus",
    "WorkflowOutcome",
    "WorkflowState",
    "WorkflowStatus",
    "WorkflowStep",
    "cancel",
    "evolve",
    "plan",
    "replay",
    "status",
    "submitted",
]

MAX_STEPS = MAX_PARENTS
"""The most steps a workflow may have (a chord's callback may wait for a group of all the others)."""
_MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class StepSpec:
    """A step as planned: its name, its task, its parents' names and what it receives from them."""

    name: str
    task: str
    parents: tuple[str, ...] = ()
    """In the order in which their results are passed (``receives="results"``)."""
    receives: str | None = None
    """``"result"`` (its one parent's result), ``"results"`` (the list of them) or None (nothing)."""


def plan(steps: Sequence[StepSpec]) -> list[StepSpec]:
    """Check the graph of ``steps``; return them in an order where every step comes after its parents.

    The order is the given one as far as the graph allows (a step moves only behind its parents).
    Raises :class:`~broker_q.errors.DomainError` for no step or more than :data:`MAX_STEPS`, a
    name that is empty, too long or used twice, a parent that is not a step of the graph, named
    twice or the step itself, a ``receives`` that the step's parents cannot give, and a cycle,
    which the message spells out (``a -> b -> a``: ``b`` waits for ``a``, which waits for ``b``).
    """
    if not steps:
        raise DomainError("a workflow needs at least one step")
    if len(steps) > MAX_STEPS:
        raise DomainError(f"a workflow may have at most {MAX_STEPS} steps, got {len(steps)}")
    index: dict[str, int] = {}
    for position, step in enumerate(steps):
        if not isinstance(step.name, str) or not step.name.strip() or len(step.name) > _MAX_NAME:
            raise DomainError(f"step name {step.name!r} is not a name (a non-blank string of at most {_MAX_NAME})")
        if step.name in index:
            raise DomainError(f"two steps are named {step.name!r}")
        index[step.name] = position
    for step in steps:
        _check_parents(step, index)
    # Kahn's algorithm, taking the ready step that comes first in the given order.
    waiting = [len(step.parents) for step in steps]
    children: list[list[int]] = [[] for _ in steps]
    for position, step in enumerate(steps):
        for parent in step.parents:
            children[index[parent]].append(position)
    ready = [position for position, count in enumerate(waiting) if count == 0]
    ordered: list[StepSpec] = []
    while ready:
        position = heapq.heappop(ready)
        ordered.append(steps[position])
        for child in children[position]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    if len(ordered) < len(steps):
        raise DomainError(f"the steps wait for each other in a cycle: {_a_cycle(steps, index, waiting)}")
    return ordered


def _check_parents(step: StepSpec, index: Mapping[str, int]) -> None:
    if len(set(step.parents)) != len(step.parents):
        raise DomainError(f"step {step.name!r} names a parent twice: {list(step.parents)}")
    for parent in step.parents:
        if parent == step.name:
            raise DomainError(f"step {step.name!r} waits for itself: a cycle")
        if parent not in index:
            raise DomainError(f"step {step.name!r} waits for {parent!r}, which is not a step of the workflow "
                              f"(the steps are {', '.join(repr(name) for name in index)})"[:1000])
    if step.receives not in (None, "result", "results"):
        raise DomainError(f"step {step.name!r}: receives must be 'result', 'results' or None, got {step.receives!r}")
    if step.receives is not None and not step.parents:
        raise DomainError(f"step {step.name!r} has no parents: it receives no results")
    if step.receives == "result" and len(step.parents) != 1:
        raise DomainError(f"step {step.name!r} receives 'result', which needs exactly one parent; it has "
                          f"{len(step.parents)}: use 'results' for the list of their results")


def _a_cycle(steps: Sequence[StepSpec], index: Mapping[str, int], waiting: Sequence[int]) -> str:
    """One cycle among the steps left waiting: each of them still waits for a parent left waiting."""
    start = next(position for position, count in enumerate(waiting) if count > 0)
    path: list[int] = []
    seen: dict[int, int] = {}
    position = start
    while position not in seen:
        seen[position] = len(path)
        path.append(position)
        position = next(index[p] for p in steps[position].parents if waiting[index[p]] > 0)
    cycle = path[seen[position]:][::-1]  # walked from child to parent: told from parent to child
    first = cycle.index(min(cycle))       # from the step that comes first in the given order
    names = [steps[p].name for p in cycle[first:] + cycle[:first]]
    return " -> ".join(repr(name) for name in [*names, names[0]])


# -- the workflow's stream --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    """A step as recorded: its task's id and name, and its parents' names."""

    name: str
    task_id: uuid.UUID
    task: str
    parents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """A workflow as its own stream tells it (its steps' states are in the steps' streams)."""

    workflow_id: uuid.UUID
    version: int
    tenant: str
    submitted_at: datetime
    steps: tuple[WorkflowStep, ...]
    """Every step comes after its parents."""
    returns: str | tuple[str, ...]
    """The step whose result is the workflow's, or the steps whose results make the list that is."""
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None

    def step(self, name: str) -> WorkflowStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def result_steps(self) -> tuple[WorkflowStep, ...]:
        names = (self.returns,) if isinstance(self.returns, str) else self.returns
        by_name = {step.name: step for step in self.steps}
        return tuple(by_name[name] for name in names)


def submitted(*, workflow_id: uuid.UUID, steps: Sequence[WorkflowStep], returns: str | Sequence[str], tenant: str,
              actor: str, now: datetime) -> WorkflowSubmitted:
    """The first event of a workflow whose steps are ``steps`` (planned: see :func:`plan`)."""
    event = WorkflowSubmitted(
        stream_id=workflow_id, version=1, timestamp=now, tenant=tenant, actor=actor, correlation_id=workflow_id,
        steps=[{"name": s.name, "task_id": str(s.task_id), "task": s.task, "parents": list(s.parents)} for s in steps],
        returns=returns if isinstance(returns, str) else list(returns),
    )
    evolve(None, event)  # the same checks as a replay of it
    return event


def cancel(state: WorkflowState, *, reason: str, actor: str, now: datetime) -> WorkflowCancelled:
    """Record that the workflow is cancelled; the caller then cancels each of its steps not final yet."""
    if state.cancelled_at is not None:
        raise DomainError(f"workflow {state.workflow_id} was cancelled already: {state.cancel_reason}")
    return WorkflowCancelled(stream_id=state.workflow_id, version=state.version + 1, timestamp=now,
                             tenant=state.tenant, actor=actor, correlation_id=state.workflow_id, reason=reason)


def evolve(state: WorkflowState | None, event: WorkflowEvent) -> WorkflowState:
    """Apply ``event`` to ``state``; refuse an event that does not follow from it."""
    if state is None:
        if not isinstance(event, WorkflowSubmitted) or event.version != 1:
            raise DomainError(f"a workflow stream must begin with workflow_submitted at version 1, got {event.TYPE}")
        steps = tuple(_recorded_step(item) for item in event.steps)
        known: set[str] = set()
        for step in steps:
            if step.name in known or not known.issuperset(step.parents):
                raise DomainError(f"workflow {event.stream_id}: step {step.name!r} is named twice or comes before "
                                  "one of its parents")
            known.add(step.name)
        returns = event.returns if isinstance(event.returns, str) else tuple(event.returns)
        if not steps or not known.issuperset((returns,) if isinstance(returns, str) else returns):
            raise DomainError(f"workflow {event.stream_id} returns the result of a step it does not have")
        return WorkflowState(workflow_id=event.stream_id, version=1, tenant=event.tenant,
                             submitted_at=event.timestamp, steps=steps, returns=returns)
    if event.stream_id != state.workflow_id or event.version != state.version + 1:
        raise DomainError(f"event {event.TYPE} v{event.version} of {event.stream_id} does not follow "
                          f"{state.workflow_id} v{state.version}")
    if isinstance(event, WorkflowCancelled):
        if state.cancelled_at is not None:
            raise DomainError(f"workflow {state.workflow_id} was cancelled already")
        return replace(state, version=event.version, cancelled_at=event.timestamp, cancel_reason=event.reason)
    raise DomainError(f"{event.TYPE} does not follow the start of a workflow")


def _recorded_step(item: Mapping[str, Any]) -> WorkflowStep:
    try:
        return WorkflowStep(name=str(item["name"]), task_id=uuid.UUID(str(item["task_id"])), task=str(item["task"]),
                            parents=tuple(str(parent) for parent in item["parents"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DomainError(f"a workflow step is not a step: {e}") from e


def replay(events: Iterable[WorkflowEvent]) -> WorkflowState | None:
    """The state after all ``events``, in order; ``None`` for no events."""
    state: WorkflowState | None = None
    for event in events:
        state = evolve(state, event)
    return state


# -- status ---------------------------------------------------------------------------------------


class WorkflowOutcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class StepStatus:
    name: str
    task_id: uuid.UUID
    task: str
    parents: tuple[str, ...]
    state: TaskStatus
    attempts: int
    waiting_for: tuple[str, ...]
    """The parents that have not succeeded yet, while the step is blocked."""
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed: float
    """Seconds on the step's account in the critical path (see :func:`status`)."""
    error: str | None = None
    cancel_reason: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowStatus:
    workflow_id: uuid.UUID
    tenant: str
    state: WorkflowOutcome
    finished: bool
    """Every step is final (succeeded, dead-lettered or cancelled)."""
    submitted_at: datetime
    cancel_reason: str | None
    steps: tuple[StepStatus, ...]
    critical_path: tuple[str, ...]
    critical_path_seconds: float


def status(state: WorkflowState, tasks: Mapping[uuid.UUID, TaskState], now: datetime) -> WorkflowStatus:
    """Each step's state (from ``tasks``, the steps' states by task id), what each blocked step waits
    for, the workflow's outcome and its critical path, as of ``now``.

    Outcome: ``cancelled`` once the workflow was cancelled; ``succeeded`` when every step succeeded;
    ``failed`` as soon as a step is dead-lettered or cancelled (the workflow cannot succeed any more,
    though other branches may still run); ``running`` otherwise.

    Critical path: a step's *elapsed* time runs from when it could first start, ``ready`` = the
    latest of its submission and its parents' ends (``finished_at``), to its own end
    (``finished_at``, or ``now`` while it is not final); it is 0 while a parent has not ended, and
    never negative (the clocks of clients and workers may differ). The critical path is the path
    from a step with no parents to a step with no children whose elapsed times add up to the most,
    the first such path in step order on a tie. Its sum is the time the workflow took (or has taken
    so far) along the chain of steps that decided when it finished: shortening any other step would
    not have finished it sooner.
    """
    by_name: dict[str, StepStatus] = {}
    for step in state.steps:
        task = tasks[step.task_id]
        ends = [by_name[p].finished_at for p in step.parents]
        elapsed = 0.0
        if all(end is not None for end in ends):
            ready = max([task.submitted_at, *(end for end in ends if end is not None)])
            end = task.finished_at if task.status in FINAL_STATES and task.finished_at is not None else now
            elapsed = max(0.0, (end - ready).total_seconds())
        waiting = tuple(p for p in step.parents if by_name[p].state is not TaskStatus.SUCCEEDED) \
            if task.status is TaskStatus.BLOCKED else ()
        by_name[step.name] = StepStatus(
            name=step.name, task_id=step.task_id, task=step.task, parents=step.parents, state=task.status,
            attempts=task.attempts, waiting_for=waiting, submitted_at=task.submitted_at, started_at=task.started_at,
            finished_at=task.finished_at if task.status in FINAL_STATES else None, elapsed=elapsed,
            error=None if task.error_type is None else f"{task.error_type}: {task.error}",
            cancel_reason=task.cancel_reason if task.status is TaskStatus.CANCELLED else None,
        )
    steps = tuple(by_name[step.name] for step in state.steps)
    path, seconds = _critical_path(steps)
    states = {step.state for step in steps}
    if state.cancelled_at is not None:
        outcome = WorkflowOutcome.CANCELLED
    elif states == {TaskStatus.SUCCEEDED}:
        outcome = WorkflowOutcome.SUCCEEDED
    elif states & {TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED}:
        outcome = WorkflowOutcome.FAILED
    else:
        outcome = WorkflowOutcome.RUNNING
    return WorkflowStatus(workflow_id=state.workflow_id, tenant=state.tenant, state=outcome,
                          finished=states <= FINAL_STATES, submitted_at=state.submitted_at,
                          cancel_reason=state.cancel_reason, steps=steps, critical_path=path,
                          critical_path_seconds=seconds)


def _critical_path(steps: Sequence[StepStatus]) -> tuple[tuple[str, ...], float]:
    """The longest path by elapsed time (steps parents-first; see :func:`status`)."""
    best: dict[str, tuple[float, str | None]] = {}
    has_children: set[str] = set()
    for step in steps:
        before, via = 0.0, None
        for parent in step.parents:
            has_children.add(parent)
            if via is None or best[parent][0] > before:
                before, via = best[parent][0], parent
        best[step.name] = (before + step.elapsed, via)
    sinks = [step.name for step in steps if step.name not in has_children]
    last = max(sinks, key=lambda name: best[name][0])  # max keeps the first of equals
    path: list[str] = []
    current: str | None = last
    while current is not None:
        path.append(current)
        current = best[current][1]
    return tuple(reversed(path)), best[last][0]
