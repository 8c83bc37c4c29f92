"""The coordinator: releases blocked tasks whose parents all succeeded, cancels those whose parent failed.

It runs inside the relay (design flow 5: one coordinator active at a time, under the relay's
lease), on every page of the log before the page counts as published, so the relay's position
never passes an event whose consequences for dependants are not recorded:

- a ``submitted`` with ``depends_on``: its edges are stored (:mod:`broker_q.store.dependencies`),
  each marked done if that parent has succeeded already; if a parent has failed for good
  (dead-lettered or cancelled), does not exist, belongs to another tenant, or waits for parents
  of its own and was recorded after this task (see :meth:`Coordinator._unregistered`: how a
  dependency cycle sent over AMQP is broken), the task is cancelled at once; if every parent has
  succeeded, it is released at once;
- a ``succeeded``: its edges are marked done, and each dependant with no open edge left is
  released (``released``, carrying the parents' results when the task receives them);
- a ``dead_lettered`` or ``cancelled``: each blocked dependant is cancelled with the reason
  ``upstream_failed``. Its own ``cancelled`` then reaches the coordinator in turn, so the
  cancellation runs down the whole graph.

A task that receives its parents' results gets them in front of its own arguments in its
``released``. When any of those is sealed, the coordinator opens them all and seals the whole
arguments again for the task (a sealed value opens only for the task it was sealed for); if one
cannot be opened, the task is cancelled with the reason ``arguments_unreadable`` rather than run on
input that is not what was recorded.

Decisions are made against the tasks' streams (the store is the truth, and it is never behind the
log being read) and appended with expected versions: reading a page twice, after a crash or a
change of lease, appends nothing twice. A chord's callback is released exactly once, however many
of its parents finish at the same moment on different workers, because one coordinator reads their
``succeeded`` events in log order and the store refuses a second ``released``.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import cast

from broker_q.domain.events import (
    TaskCancelled,
    TaskDeadLettered,
    TaskEvent,
    TaskReleased,
    TaskSubmitted,
    TaskSucceeded,
)
from broker_q.domain.task import TaskState, TaskStatus, cancel, release, replay
from broker_q.errors import ConcurrencyConflict, DecryptionError, StoreUnavailable
from broker_q.payloads import Payloads
from broker_q.store.port import EventStore, Recorded

__all__ = ["ACTOR", "Coordinator"]

log = logging.getLogger(__name__)

ACTOR = "coordinator"
_FAILED = (TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED)


_SUBMITTED = TaskSubmitted.TOPIC
_FINISHED = {cls.TOPIC: cls.TYPE for cls in (TaskSucceeded, TaskDeadLettered, TaskCancelled)}
"""The events that finish a parent, by topic: what its dependants wait for."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Coordinator:
    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._clock = clock
        self._payloads = Payloads(lambda: store.keys, sealing=False)
        """Opens sealed results and arguments; seals a release again only when something in it was sealed."""
        self._has_edges: bool | None = None
        """Whether any edge may be stored: a store with no dependant costs no query per page."""
        self.released = 0
        self.cancelled = 0

    def take_over(self) -> None:
        """Forget what this coordinator knew of the stored edges: call it whenever it starts reading
        the log (again), from the position its relay recorded. While it was not reading, another
        relay's coordinator (under the lease) may have stored edges: if it still believed there were
        none, it would skip the successes and failures of their parents for good."""
        self._has_edges = None

    def concerns(self, records: Sequence[Recorded]) -> bool:
        """Whether :meth:`process` may have anything to do for this page (cheap: no I/O)."""
        # By topic first: the relay decodes only the events it routes on (``Recorded.event`` decodes on use).
        for record in records:
            if record.topic == _SUBMITTED:
                if cast(TaskSubmitted, record.event).depends_on:
                    return True
            elif self._has_edges is not False and record.topic in _FINISHED:
                return True
        return False

    def process(self, records: Sequence[Recorded]) -> None:
        """Act on one page of the log (blocking: run it in a thread). Raises StoreUnavailable to be retried."""
        submitted: list[TaskSubmitted] = []
        succeeded: list[str] = []
        failed: dict[str, str] = {}
        for record in records:
            topic = record.topic
            if topic == _SUBMITTED:
                event = cast(TaskSubmitted, record.event)
                if event.depends_on:
                    submitted.append(event)
            elif topic == TaskSucceeded.TOPIC:
                succeeded.append(record.stream_id.hex)
            elif topic in _FINISHED:
                failed[record.stream_id.hex] = _FINISHED[topic]
        if submitted:
            self._register(submitted)
        if not succeeded and not failed:
            return
        edges = self._store.dependencies
        if self._has_edges is None:
            self._has_edges = edges.any()
        if not self._has_edges:
            return
        if succeeded:
            edges.mark_done(succeeded)
            self._release_ready(sorted({child for _, child in edges.children(succeeded)}))
        if failed:
            doomed = {child: f"upstream_failed: parent {uuid.UUID(parent)} was {failed[parent]}"
                      for parent, child in edges.children(list(failed))}
            self._cancel(doomed)
        self._has_edges = edges.any()

    # -- deciding -------------------------------------------------------------------------------

    def _register(self, submitted: Sequence[TaskSubmitted]) -> None:
        edges: list[tuple[str, str, bool]] = []
        doomed: dict[str, str] = {}
        parents = {parent: self._state(parent) for event in submitted for parent in event.depends_on}
        later = self._unregistered(parents)
        earlier: set[uuid.UUID] = set()
        for event in submitted:
            child = event.stream_id.hex
            for parent in event.depends_on:
                state = parents[parent]
                if state is None:
                    doomed[child] = f"upstream_failed: parent {parent} does not exist"
                elif state.tenant != event.tenant:
                    doomed[child] = f"upstream_failed: parent {parent} belongs to another tenant"
                elif state.status in _FAILED:
                    doomed[child] = f"upstream_failed: parent {parent} was {state.status}"
                elif parent in later and parent not in earlier:
                    doomed[child] = f"upstream_failed: parent {parent} was recorded after this task"
                else:
                    edges.append((parent.hex, child, state.status is TaskStatus.SUCCEEDED))
            earlier.add(event.stream_id)
        if edges:
            self._store.dependencies.add(edges)
            self._has_edges = True
        self._cancel(doomed)
        self._release_ready(sorted({child for _, child, _ in edges} - doomed.keys()))

    def _unregistered(self, parents: dict[uuid.UUID, TaskState | None]) -> set[uuid.UUID]:
        """The parents that wait for parents of their own but whose ``submitted`` this coordinator
        has not read yet: they were recorded after the task that names them.

        A task may only wait for tasks recorded before it (:meth:`App.submit` checks it; a message
        from another AMQP client cannot be checked before it is recorded): that is what makes a
        dependency cycle impossible, since the first task of a cycle to be recorded names a parent
        recorded after it. The log is read in order, so a blocked parent recorded earlier has had
        its edges stored, and keeps them until it is released or cancelled.
        """
        blocked = [parent.hex for parent, state in parents.items()
                   if state is not None and state.status is TaskStatus.BLOCKED and state.waiting_on]
        if not blocked:
            return set()
        registered = self._store.dependencies.with_edges(blocked)
        return {uuid.UUID(parent) for parent in blocked if parent not in registered}

    def _release_ready(self, children: Sequence[str]) -> None:
        if not children:
            return
        still_open = self._store.dependencies.open_parents(children)
        ready = [child for child in children if child not in still_open]
        decided: list[TaskEvent] = []
        unreadable: dict[str, str] = {}
        for child in ready:
            state = self._state(uuid.UUID(child))
            if state is None or state.status is not TaskStatus.BLOCKED or not state.waiting_on:
                continue  # released or cancelled already (this page is read again)
            try:
                decided.append(self._release(state))
            except DecryptionError as e:
                unreadable[child] = (f"arguments_unreadable: the arguments of this task or its parents' results "
                                     f"cannot be opened (tenant {state.tenant!r}, key {e.key_id!r}): {e}")
        self.released += self._append(decided)
        self._store.dependencies.remove_children(ready)
        self._cancel(unreadable)

    def _release(self, state: TaskState) -> TaskReleased:
        """The release of ``state``, with its parents' results in front of its arguments if it receives them."""
        if state.receives is None:
            return release(state, results=[], actor=ACTOR, now=self._clock())
        parents = [self._state(parent) for parent in state.depends_on]
        sealed = state.sealed_arguments is not None or any(p is not None and p.sealed_result is not None
                                                           for p in parents)
        if not sealed:
            return release(state, results=[p.result if p is not None else None for p in parents], actor=ACTOR,
                           now=self._clock())
        payloads = self._payloads
        results = [payloads.result(p) if p is not None else None for p in parents]
        args, kwargs = payloads.arguments(state)
        opened = dataclasses.replace(state, args=args, kwargs=kwargs, sealed_arguments=None)
        released = release(opened, results=results, actor=ACTOR, now=self._clock())
        assert released.args is not None
        return dataclasses.replace(released, args=None, sealed_arguments=payloads.seal_arguments(
            state.tenant, state.task_id, released.args, kwargs))

    def _cancel(self, doomed: dict[str, str]) -> None:
        decided: list[TaskEvent] = []
        for child, reason in sorted(doomed.items()):
            state = self._state(uuid.UUID(child))
            if state is not None and not state.is_final:
                decided.append(cancel(state, reason=reason, actor=ACTOR, now=self._clock()))
        self.cancelled += self._append(decided)
        self._store.dependencies.remove_children(list(doomed))

    def _append(self, events: Sequence[TaskEvent]) -> int:
        """Append each event on its own (one transaction for all); return how many were appended."""
        if not events:
            return 0
        appended = 0
        for event, result in zip(events, self._store.append_groups([[e] for e in events]), strict=True):
            if isinstance(result, StoreUnavailable):
                raise result
            if isinstance(result, ConcurrencyConflict):
                continue  # the task moved on since it was read (cancelled by hand, say): nothing to do
            if isinstance(result, Exception):
                log.error("task %s: %s not recorded: %s", event.stream_id, event.TYPE, result)
                continue
            appended += 1
        return appended

    def _state(self, task_id: uuid.UUID) -> TaskState | None:
        return replay(e for e in self._store.read_stream(task_id) if isinstance(e, TaskEvent))
