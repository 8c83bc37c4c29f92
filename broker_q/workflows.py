"""Workflows on the event store: submitting one, reading its status, cancelling it, waiting for its result.

A workflow (:mod:`broker_q.canvas`) is recorded in one append: a ``workflow_submitted`` in the
workflow's own stream (a random id), then the ``submitted`` of every step, parents first, each with
the workflow's id as its correlation id, the ``workflow_submitted`` as its cause and its parent
steps' tasks as its ``depends_on``. All of it is recorded, or none of it. From there on the steps
are tasks like any other: the relay publishes the ready ones and its coordinator releases each
blocked one when its last parent succeeds (or cancels it and everything below it when a parent
fails for good), so a chord's callback runs once however its members finish. A workflow's parents
are all in the same append, so :meth:`App.submit <broker_q.app.App.submit>`'s look-up of parents in
the store is not needed: the graph is checked before the append (:func:`broker_q.domain.workflow.plan`).

The module also holds the ``broker-q workflow`` command (:func:`add_commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from broker_q.app import TaskHandle, _as_uuid, _Limits, _override, _poll_delays, _when, utcnow
from broker_q.canvas import Canvas, compile_workflow
from broker_q.domain import task as task_domain
from broker_q.domain import workflow as domain
from broker_q.domain.events import Event, TaskEvent, TaskSubmitted, WorkflowEvent, event_id
from broker_q.domain.task import TaskState, TaskStatus
from broker_q.domain.workflow import WorkflowState, WorkflowStatus, WorkflowStep
from broker_q.errors import (
    ConcurrencyConflict,
    DomainError,
    StoreUnavailable,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    ValidationError,
)

if TYPE_CHECKING:
    from broker_q.app import App

__all__ = ["WorkflowHandle", "Workflows", "add_commands", "status_json"]


class Workflows:
    """The workflows of ``app``'s store."""

    def __init__(self, app: App) -> None:
        self._app = app

    # -- submitting ---------------------------------------------------------------------------

    def events(self, workflow: Canvas, *, tenant: str | None = None) -> list[Event]:
        """The events that record ``workflow``: its ``workflow_submitted``, then each step's ``submitted``.

        Raises :class:`~broker_q.errors.DomainError` for a bad graph (a cycle, an unknown parent) and
        :class:`~broker_q.errors.ValidationError` for arguments a step's handler cannot take.
        """
        app = self._app
        compiled = compile_workflow(workflow)
        workflow_id, now = uuid.uuid4(), utcnow()
        cause = event_id(workflow_id, 1)
        task_ids: dict[str, uuid.UUID] = {}
        steps: list[WorkflowStep] = []
        submitted: list[Event] = []
        for spec, signature in compiled.steps:
            options = signature.options
            event = app._submitted(
                signature.task, signature.args, signature.kwargs, options.queue, options.priority, None, tenant,
                workflow_id, _Limits(options.max_attempts, options.time_limit, options.soft_time_limit,
                                     _override(options.retry)),
                _when(options.eta, options.countdown), [task_ids[parent] for parent in spec.parents], spec.receives,
            )
            submitted.append(replace(event, causation_id=cause))
            task_ids[spec.name] = event.stream_id
            steps.append(WorkflowStep(spec.name, event.stream_id, spec.task, spec.parents))
        head = domain.submitted(workflow_id=workflow_id, steps=steps, returns=compiled.returns,
                                tenant=tenant or app.settings.tenant, actor=app.actor, now=now)
        return [head, *submitted]

    def submit(self, workflow: Canvas, *, tenant: str | None = None) -> WorkflowHandle:
        events = self.events(workflow, tenant=tenant)
        self._app._admit([e for e in events if isinstance(e, TaskSubmitted)])
        self._app.store.append(events)
        return WorkflowHandle(self._app, events[0].stream_id)

    async def submit_async(self, workflow: Canvas, *, tenant: str | None = None) -> WorkflowHandle:
        if self._app._sealing_reads_keys(tenant):
            events = await asyncio.to_thread(self.events, workflow, tenant=tenant)
        else:
            events = self.events(workflow, tenant=tenant)
        await asyncio.to_thread(self._app._admit, [e for e in events if isinstance(e, TaskSubmitted)])
        await asyncio.to_thread(self._app.store.append, events)
        return WorkflowHandle(self._app, events[0].stream_id)

    # -- reading ------------------------------------------------------------------------------

    def state(self, workflow_id: uuid.UUID | str) -> WorkflowState:
        """The workflow as its own stream tells it; :class:`WorkflowNotFound` if there is none."""
        events = self._app.store.read_stream(_as_uuid(workflow_id))
        if not events or not all(isinstance(e, WorkflowEvent) for e in events):
            what = f" (it names a {events[0].TYPE} record)" if events else ""
            raise TaskNotFound(f"no workflow with id {workflow_id}{what}")
        state = domain.replay(e for e in events if isinstance(e, WorkflowEvent))
        assert state is not None
        return state

    def step_states(self, state: WorkflowState) -> dict[uuid.UUID, TaskState]:
        """Each step's task, replayed from its stream (one read per step)."""
        found: dict[uuid.UUID, TaskState] = {}
        for step in state.steps:
            task = task_domain.replay(e for e in self._app.store.read_stream(step.task_id) if isinstance(e, TaskEvent))
            if task is None:  # recorded in the workflow's transaction: only a damaged store lacks it
                raise TaskNotFound(f"workflow {state.workflow_id}: step {step.name!r} has no task {step.task_id}")
            found[step.task_id] = task
        return found

    def status(self, workflow_id: uuid.UUID | str) -> WorkflowStatus:
        """See :func:`broker_q.domain.workflow.status`: steps, what blocks them, the critical path."""
        state = self.state(workflow_id)
        return domain.status(state, self.step_states(state), utcnow())

    # -- cancelling ---------------------------------------------------------------------------

    def cancel(self, workflow_id: uuid.UUID | str, *, reason: str, actor: str | None = None) -> WorkflowStatus:
        """Record ``workflow_cancelled``, then cancel every step that is not final (a running one is
        asked to stop), each with the reason ``workflow cancelled: <reason>``.

        Called again after a crash between the two, it cancels the steps left; a workflow cancelled
        already, or whose steps are all final, raises :class:`~broker_q.errors.DomainError`.
        """
        actor = actor or self._app.actor
        store = self._app.store
        state = self.state(workflow_id)
        tasks = self.step_states(state)
        if all(task.is_final for task in tasks.values()):
            if state.cancelled_at is not None:
                raise DomainError(f"workflow {state.workflow_id} was cancelled already: {state.cancel_reason}")
            raise DomainError(f"workflow {state.workflow_id} is finished: no step is left to cancel")
        if state.cancelled_at is None:
            # Cancelled by someone else meanwhile: the steps are cancelled all the same.
            with contextlib.suppress(ConcurrencyConflict):
                store.append([domain.cancel(state, reason=reason, actor=actor, now=utcnow())])
        step_reason = f"workflow cancelled: {reason}"
        for _ in range(20):
            pending = [task for task in tasks.values() if not task.is_final]
            if not pending:
                break
            # One transaction (as a rule) for all: the coordinator cannot slip an upstream_failed in between.
            results = store.append_groups([[task_domain.cancel(task, reason=step_reason, actor=actor, now=utcnow())]
                                           for task in pending])
            for result in results:
                if isinstance(result, StoreUnavailable) or (
                        isinstance(result, Exception) and not isinstance(result, ConcurrencyConflict)):
                    raise result
            tasks = self.step_states(state)  # a conflict: released or cancelled meanwhile; decide again
        else:
            raise ConcurrencyConflict(f"workflow {state.workflow_id}: its steps kept changing while they were "
                                      "cancelled; try again")
        return domain.status(self.state(workflow_id), tasks, utcnow())


class WorkflowHandle:
    """A submitted workflow: its id, its status, a wait for its result."""

    def __init__(self, app: App, workflow_id: uuid.UUID) -> None:
        self.app = app
        self.id = workflow_id
        self._state: WorkflowState | None = None

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id})"

    def state(self) -> WorkflowState:
        return Workflows(self.app).state(self.id)

    def status(self) -> WorkflowStatus:
        return Workflows(self.app).status(self.id)

    def cancel(self, reason: str = "cancelled") -> WorkflowStatus:
        return Workflows(self.app).cancel(self.id, reason=reason)

    def step(self, name: str) -> TaskHandle[Any]:
        """The handle of the task of the step ``name``."""
        try:
            return TaskHandle(self.app, self._steps().step(name).task_id)
        except KeyError:
            raise KeyError(f"workflow {self.id} has no step {name!r}") from None

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the workflow's result is known: the result of its last step, or the list of
        the results of its last group or of its steps that no step waits for.

        Raises :class:`TaskFailed` for the first step (in workflow order) that was dead-lettered, or
        :class:`TaskCancelled` if the workflow (or a step by hand) was cancelled; ``TimeoutError``
        after ``timeout`` seconds.
        """
        waiter = _Waiter(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _poll_delays():
            outcome = waiter.outcome()
            if outcome is not None:
                return outcome()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"workflow {self.id} is not finished after {timeout}s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    async def result(self, timeout: float | None = None) -> Any:
        """The async form of :meth:`wait`."""
        waiter = _Waiter(self)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for delay in _poll_delays():
            outcome = await asyncio.to_thread(waiter.outcome)
            if outcome is not None:
                return outcome()
            if deadline is not None and loop.time() + delay > deadline:
                raise TimeoutError(f"workflow {self.id} is not finished after {timeout}s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _steps(self) -> WorkflowState:
        """The workflow's steps, which never change (read once)."""
        if self._state is None:
            self._state = self.state()
        return self._state


class _Waiter:
    """Reads the steps the result is made of, in order, each until it is final: a poll reads the
    first unfinished one and stops there, so a group of a thousand costs a read per poll, not a thousand."""

    def __init__(self, handle: WorkflowHandle) -> None:
        self._handle = handle
        self._results: list[Any] = []

    def outcome(self) -> Callable[[], Any] | None:
        handle = self._handle
        try:
            state = handle._steps()
        except TaskNotFound:
            return None
        outputs = state.result_steps
        while len(self._results) < len(outputs):
            step = outputs[len(self._results)]
            task = handle.app.get_task(step.task_id)
            if task.status is TaskStatus.SUCCEEDED:
                self._results.append(handle.app.payloads.result(task))
                continue
            if task.status in (TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED):
                error = self._error(state, step, task)
                return lambda: _raise(error)
            return None
        results = list(self._results)
        return lambda: results[0] if isinstance(state.returns, str) else results

    def _error(self, state: WorkflowState, step: WorkflowStep, task: TaskState) -> TaskFailed:
        """The failure behind the step ``step``'s: the first dead-lettered step, else its own cancellation."""
        if task.status is TaskStatus.CANCELLED:
            tasks = Workflows(self._handle.app).step_states(state)
            failed = next((s for s in state.steps if tasks[s.task_id].status is TaskStatus.DEAD_LETTERED), None)
            if failed is None:
                return TaskCancelled(str(task.task_id), "Cancelled", task.cancel_reason or "")
            step, task = failed, tasks[failed.task_id]
        error = TaskFailed(str(task.task_id), task.error_type or "Error", task.error or "", task.traceback)
        error.add_note(f"step {step.name!r} of workflow {state.workflow_id}")
        return error


def _raise(error: Exception) -> Any:
    raise error


# -- rendering and the command line -------------------------------------------------------------


def status_json(status: WorkflowStatus) -> dict[str, Any]:
    """A workflow's status as the CLI prints it with ``--format json`` (JSON-ready)."""
    def when(value: Any) -> str | None:
        return None if value is None else str(value.isoformat())

    return {
        "id": str(status.workflow_id), "tenant": status.tenant, "state": status.state.value,
        "finished": status.finished, "submitted_at": when(status.submitted_at),
        "cancel_reason": status.cancel_reason,
        "critical_path": {"steps": list(status.critical_path), "seconds": round(status.critical_path_seconds, 6)},
        "steps": [{
            "name": step.name, "task_id": str(step.task_id), "task": step.task, "state": step.state.value,
            "parents": list(step.parents), "waiting_for": list(step.waiting_for), "attempts": step.attempts,
            "submitted_at": when(step.submitted_at), "started_at": when(step.started_at),
            "finished_at": when(step.finished_at), "elapsed_seconds": round(step.elapsed, 6),
            "error": step.error, "cancel_reason": step.cancel_reason,
        } for step in status.steps],
    }


def status_table(status: WorkflowStatus) -> list[str]:
    """A workflow's status as lines of text: a summary, the critical path, then a row per step."""
    lines = [
        f"workflow {status.workflow_id}  {status.state.value}{'' if status.finished else ' (steps still to run)'}"
        f"  tenant {status.tenant}  submitted {status.submitted_at.isoformat()}",
        f"critical path: {' -> '.join(status.critical_path)}  ({status.critical_path_seconds:.3f}s)",
    ]
    if status.cancel_reason is not None:
        lines.append(f"cancelled: {status.cancel_reason}")
    rows = [("STEP", "STATE", "TASK", "ATTEMPTS", "ELAPSED", "WAITING FOR / WHY")]
    for step in status.steps:
        why = (", ".join(step.waiting_for) if step.waiting_for else step.error or step.cancel_reason or "")
        rows.append((step.name, step.state.value, step.task, str(step.attempts), f"{step.elapsed:.3f}s", why))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
              for row in rows]
    return lines


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``workflow ID`` (its status) and ``workflow cancel ID``. Like the other commands, they
    open the store named by ``options.store`` and raise :class:`~broker_q.errors.BrokerQError` on failure."""
    text = "show a workflow's steps, what blocks them and its critical path; or cancel it (workflow cancel ID)"
    sub = subparsers.add_parser("workflow", help=text, description=text, usage="%(prog)s [cancel] ID [options]")
    sub.set_defaults(command=_workflow)
    sub.add_argument("words", nargs="+", metavar="[cancel] ID", help="a workflow's id, after 'cancel' to cancel it")
    sub.add_argument("--format", choices=["table", "json"], default="table", help="how to print it (default table)")
    sub.add_argument("--reason", default="cancelled by an operator", help="why it is cancelled (with cancel)")


def _workflow(options: argparse.Namespace) -> int:
    from broker_q.cli import _app, actor_of, authorize_task
    from broker_q.domain.access import Permission

    words: Sequence[str] = options.words
    cancelling = words[0] == "cancel"
    if len(words) != 1 + cancelling:
        raise ValidationError("usage: broker-q workflow ID | broker-q workflow cancel ID [--reason TEXT]")
    workflows = Workflows(_app(options))
    status = workflows.status(words[-1])
    authorize_task(options, Permission.CANCEL if cancelling else Permission.READ, status.tenant,
                   f"workflow {'cancel ' if cancelling else ''}{words[-1]}")
    if cancelling:
        status = workflows.cancel(words[1], reason=options.reason, actor=actor_of(options))
    if options.format == "json":
        print(json.dumps(status_json(status), indent=2))
    else:
        print("\n".join(status_table(status)))
    return 0
