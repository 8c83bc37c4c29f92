"""The coordinator (``broker_q/coordinator.py``) on the memory store, fed pages of the log as the relay feeds it.

Tasks are told with the domain's commands and appended as clients and workers append them; the
coordinator reads the log a page at a time (:func:`follow`, which also reads the events it appended
itself, as the relay does) and its decisions are checked in the tasks' streams. The property tests
check random graphs, random interleavings of clients, workers and pages, and every way to cut one
log into pages, against a reference written out here.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.coordinator import ACTOR, Coordinator
from broker_q.domain import task as domain
from broker_q.domain.events import TaskEvent, TaskReleased
from broker_q.domain.task import TaskState, TaskStatus, replay
from broker_q.payloads import Payloads
from broker_q.store import EventStore, Recorded, open_store

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
BLOCKED, READY = TaskStatus.BLOCKED, TaskStatus.READY
SUCCEEDED, DEAD_LETTERED, CANCELLED = TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTERED, TaskStatus.CANCELLED


def new_store() -> EventStore:
    return open_store(f"memory:///{uuid.uuid4().hex}")


class Tasks:
    """Clients and workers: each command is appended at once, at the task's next version."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.now = T0
        self.count = 0

    def _append(self, event: TaskEvent) -> None:
        self.now += timedelta(seconds=1)
        self.store.append([event])

    def state(self, task_id: uuid.UUID) -> TaskState:
        state = replay(e for e in self.store.read_stream(task_id) if isinstance(e, TaskEvent))
        assert state is not None
        return state

    def types(self, task_id: uuid.UUID) -> list[str]:
        return [e.TYPE for e in self.store.read_stream(task_id)]

    def submit(self, *parents: uuid.UUID, receives: str | None = None, args: list[Any] | None = None,
               tenant: str = "acme") -> uuid.UUID:
        """A new task; its id is ``uuid.UUID(int=n)`` for the n-th task, so a test can name a task
        before it is recorded, as another AMQP client may (its id comes from an idempotency key)."""
        self.count += 1
        task_id = uuid.UUID(int=self.count)
        self._append(domain.submit(task_id=task_id, task="t.step", queue="default", args=args or [], kwargs={},
                                   priority=5, tenant=tenant, actor="client:test", now=self.now,
                                   depends_on=parents, receives=receives))
        return task_id

    def start(self, task_id: uuid.UUID) -> None:
        self._append(domain.start(self.state(task_id), worker="worker:test", now=self.now))

    def succeed(self, task_id: uuid.UUID, result: Any = None) -> None:
        self.start(task_id)
        self._append(domain.succeed(self.state(task_id), result=result, now=self.now))

    def dead_letter(self, task_id: uuid.UUID) -> None:
        self.start(task_id)
        self._append(domain.dead_letter(self.state(task_id), error_type="ValueError", message="boom", traceback=None,
                                        now=self.now))

    def cancel(self, task_id: uuid.UUID, reason: str = "by hand") -> None:
        self._append(domain.cancel(self.state(task_id), reason=reason, actor="operator:test", now=self.now))


def pages(store: EventStore, after: int, size: int) -> list[list[Recorded]]:
    """The log after ``after``, cut into pages of ``size``, as it is now."""
    records = store.read_log(after, 1_000_000)
    return [records[i:i + size] for i in range(0, len(records), size)]


def follow(coordinator: Coordinator, store: EventStore, after: int = 0, size: int = 100) -> int:
    """Feed every page after ``after`` to the coordinator as the relay does, until the log ends (the
    coordinator's own events included); return the last position read."""
    while records := store.read_log(after, size):
        if coordinator.concerns(records):
            coordinator.process(records)
        after = records[-1].position
    return after


def reason(parent: uuid.UUID, what: str) -> str:
    return f"upstream_failed: parent {parent} {what}"


# -- releases -------------------------------------------------------------------------------------


def test_a_parent_that_succeeded_before_the_child_was_submitted_releases_it_at_once() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent = tasks.submit()
    tasks.succeed(parent, {"total": 3})
    follow(coordinator, store)
    child = tasks.submit(parent, receives="result", args=["own"])
    assert tasks.state(child).status is BLOCKED
    follow(coordinator, store)
    assert tasks.types(child) == ["submitted", "released"]
    state = tasks.state(child)
    assert (state.status, state.args, state.waiting_on) == (READY, [{"total": 3}, "own"], ())
    released = store.read_stream(child)[-1]
    assert released.actor == ACTOR
    assert (coordinator.released, coordinator.cancelled) == (1, 0)
    assert not store.dependencies.any()


def test_a_child_waits_for_every_parent_that_succeeds_after_its_submission() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    first, second = tasks.submit(), tasks.submit()
    child = tasks.submit(first, second, args=[1])
    position = follow(coordinator, store)
    assert tasks.state(child).status is BLOCKED
    assert store.dependencies.open_parents([child.hex]) == {child.hex: 2}
    tasks.succeed(second, "two")
    position = follow(coordinator, store, position)
    assert tasks.types(child) == ["submitted"]
    assert store.dependencies.open_parents([child.hex]) == {child.hex: 1}
    tasks.succeed(first, "one")
    follow(coordinator, store, position)
    assert tasks.types(child) == ["submitted", "released"]
    assert (tasks.state(child).status, tasks.state(child).args) == (READY, [1])  # it receives nothing
    assert not store.dependencies.any()


def test_a_parent_that_succeeds_in_the_same_page_as_the_childs_submission_releases_it() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent = tasks.submit()
    child = tasks.submit(parent, receives="results")
    tasks.succeed(parent, 7)
    follow(coordinator, store, size=1000)
    assert tasks.types(child) == ["submitted", "released"]
    assert tasks.state(child).args == [[7]]


def test_a_page_processed_twice_appends_nothing_twice() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    ok, bad = tasks.submit(), tasks.submit()
    released, cancelled = tasks.submit(ok, receives="result"), tasks.submit(ok, bad)
    grandchild = tasks.submit(cancelled)
    tasks.succeed(ok, "fine")
    tasks.dead_letter(bad)
    after = 0
    while records := store.read_log(after, 3):
        for _ in range(2):  # a crash before the position was recorded: the same page again
            coordinator.process(records)
        after = records[-1].position
    log = store.read_log(0, 1000)
    assert Counter(r.event.TYPE for r in log)["released"] == 1
    assert Counter(r.event.TYPE for r in log)["cancelled"] == 2
    assert tasks.types(released) == ["submitted", "released"]
    assert tasks.types(cancelled) == tasks.types(grandchild) == ["submitted", "cancelled"]

    # Another coordinator (a relay that took over with an older position) reads it all again.
    again = Coordinator(store)
    for page in pages(store, 0, 4):
        again.process(page)
    assert store.read_log(0, 1000) == log
    assert (again.released, again.cancelled) == (0, 0)
    assert (coordinator.released, coordinator.cancelled) == (1, 2)
    assert not store.dependencies.any()


@pytest.mark.parametrize("page_size", [1, 7, 1000])
def test_a_chord_of_300_parents_releases_its_callback_once_with_every_result_in_order(page_size: int) -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parents = [tasks.submit(args=[n]) for n in range(300)]
    callback = tasks.submit(*parents, receives="results", args=["mine"])
    for parent in parents:
        tasks.start(parent)
    position = follow(coordinator, store, size=page_size)
    # They finish in any order, all in the same instant on many workers: one append of 300 events.
    order = list(enumerate(parents))
    random.Random(page_size).shuffle(order)
    store.append([domain.succeed(tasks.state(p), result={"n": n}, now=tasks.now) for n, p in order])
    follow(coordinator, store, position, size=page_size)
    assert tasks.types(callback) == ["submitted", "released"]
    assert tasks.state(callback).args == [[{"n": n} for n in range(300)], "mine"]
    assert coordinator.released == 1
    for page in pages(store, 0, page_size):  # the whole log again: still once
        coordinator.process(page)
    assert tasks.types(callback) == ["submitted", "released"]
    assert not store.dependencies.any()


# -- cancellations --------------------------------------------------------------------------------


def test_a_dead_lettered_parent_cancels_its_children_then_their_children() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent, sibling = tasks.submit(), tasks.submit()
    child = tasks.submit(parent, sibling)
    other_child = tasks.submit(parent)
    grandchild = tasks.submit(child)
    position = follow(coordinator, store)
    tasks.dead_letter(parent)
    failure = store.max_position()
    coordinator.process(store.read_log(position, failure - position))  # the page ends with the failure
    for task_id in (child, other_child):
        assert tasks.types(task_id) == ["submitted", "cancelled"]
        assert tasks.state(task_id).cancel_reason == reason(parent, "was dead_lettered")
        assert store.read_stream(task_id)[-1].actor == ACTOR
    assert tasks.types(grandchild) == ["submitted"]  # until the child's own cancelled is read
    follow(coordinator, store, failure)
    assert tasks.types(grandchild) == ["submitted", "cancelled"]
    assert tasks.state(grandchild).cancel_reason == reason(child, "was cancelled")
    assert tasks.types(sibling) == ["submitted"]  # a parent is never touched
    assert coordinator.cancelled == 3
    assert not store.dependencies.any()


@pytest.mark.parametrize("failure", ["dead_lettered", "cancelled"])
def test_a_parent_that_failed_before_the_child_was_submitted_cancels_it_at_once(failure: str) -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent, fine = tasks.submit(), tasks.submit()
    if failure == "dead_lettered":
        tasks.dead_letter(parent)
    else:
        tasks.cancel(parent)
    position = follow(coordinator, store)
    child = tasks.submit(fine, parent)
    follow(coordinator, store, position)
    assert tasks.types(child) == ["submitted", "cancelled"]
    assert tasks.state(child).cancel_reason == reason(parent, f"was {failure}")
    assert not store.dependencies.any()


def test_an_unknown_parent_cancels_the_child() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    known, unknown = tasks.submit(), uuid.uuid4()
    child = tasks.submit(known, unknown)
    follow(coordinator, store)
    assert tasks.types(child) == ["submitted", "cancelled"]
    assert tasks.state(child).cancel_reason == reason(unknown, "does not exist")
    tasks.succeed(known)
    follow(coordinator, store)
    assert tasks.types(child) == ["submitted", "cancelled"]
    assert not store.dependencies.any()


def test_a_parent_of_another_tenant_cancels_the_child() -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    theirs = tasks.submit(tenant="other")
    child = tasks.submit(theirs)
    follow(coordinator, store)
    assert tasks.state(child).cancel_reason == reason(theirs, "belongs to another tenant")


def cuts_of(total: int) -> list[list[int]]:
    """Every way to cut positions 1..total into pages: the last position of each page but the last."""
    return [[p for p, cut in enumerate(cuts, start=1) if cut]
            for cuts in itertools.product([False, True], repeat=total - 1)]


def read_in_pages(coordinator: Coordinator, store: EventStore, ends: list[int]) -> None:
    """Feed the log to the coordinator in pages ending at ``ends``, then to its end (its own events too)."""
    after = 0
    while True:
        end = next((p for p in ends if p > after), None)
        records = store.read_log(after, 1000 if end is None else end - after)
        if not records:
            return
        if coordinator.concerns(records):
            coordinator.process(records)
        after = records[-1].position


@pytest.mark.parametrize("length", [2, 3])
def test_a_dependency_cycle_is_cancelled_whole_however_the_log_is_cut(length: int) -> None:
    """Tasks that wait for each other in a ring, as AMQP clients can send them (ids known in
    advance): each is cancelled, the first for a parent recorded after it, the others upstream.
    (A task naming itself is refused by the domain before it is recorded.)"""
    for ends in cuts_of(length + 1):
        store = new_store()
        tasks = Tasks(store)
        tasks.submit()  # task 1: not in the ring, so the ring's ids are 2..length+1
        ring = [uuid.UUID(int=n) for n in range(2, length + 2)]
        for index in range(length):
            assert tasks.submit(ring[(index + 1) % length]) == ring[index]
        read_in_pages(Coordinator(store), store, ends)
        assert [tasks.state(t).status for t in ring] == [CANCELLED] * length, ends
        assert tasks.state(ring[0]).cancel_reason == reason(ring[1], "was recorded after this task"), ends
        assert not store.dependencies.any()


def test_a_parent_without_parents_recorded_after_its_child_is_waited_for() -> None:
    """A parent sent by another client may be recorded after the child that names it: that cannot
    close a cycle (the parent waits for nothing), so the child waits for it as for any parent."""
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent = uuid.UUID(int=2)
    child = tasks.submit(parent)
    assert tasks.submit() == parent
    follow(coordinator, store)
    assert tasks.state(child).status is BLOCKED
    tasks.succeed(parent)
    follow(coordinator, store)
    assert tasks.types(child) == ["submitted", "released"]


@pytest.mark.parametrize("parent_ends", ["succeeded", "dead_lettered"])
def test_a_child_cancelled_by_hand_while_blocked_is_neither_released_nor_cancelled_again(parent_ends: str) -> None:
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    parent = tasks.submit()
    child = tasks.submit(parent)
    grandchild = tasks.submit(child)
    position = follow(coordinator, store)
    tasks.cancel(child, "not wanted")
    position = follow(coordinator, store, position)
    assert tasks.state(grandchild).cancel_reason == reason(child, "was cancelled")
    if parent_ends == "succeeded":
        tasks.succeed(parent)
    else:
        tasks.dead_letter(parent)
    follow(coordinator, store, position)
    assert tasks.types(child) == ["submitted", "cancelled"]
    assert tasks.state(child).cancel_reason == "not wanted"
    assert (coordinator.released, coordinator.cancelled) == (0, 1)  # the grandchild alone
    assert not store.dependencies.any()


# -- reads ----------------------------------------------------------------------------------------


class CountingStore:
    """A store that counts the streams read (``read_stream``) by whoever uses it."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.reads: Counter[uuid.UUID] = Counter()

    def read_stream(self, stream_id: uuid.UUID, **options: Any) -> list[Any]:
        self.reads[stream_id] += 1
        return self.inner.read_stream(stream_id, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("receives", [None, "results"])
def test_a_success_of_one_of_many_parents_reads_no_stream_and_the_release_reads_each_once(
        receives: str | None) -> None:
    parents_count = 50
    store = new_store()
    counting = CountingStore(store)
    tasks, coordinator = Tasks(store), Coordinator(counting)  # type: ignore[arg-type]
    parents = [tasks.submit() for _ in range(parents_count)]
    child = tasks.submit(*parents, receives=receives)
    position = follow(coordinator, store)
    assert counting.reads == Counter(parents)  # the submission: each parent once, to learn its state
    per_success: list[int] = []
    for parent in parents:
        tasks.succeed(parent, parent.int)
        counting.reads.clear()
        position = follow(coordinator, store, position)
        per_success.append(sum(counting.reads.values()))
    # Only the last success reads: the child, and the parents' results if it receives them.
    assert per_success[:-1] == [0] * (parents_count - 1)
    expected = Counter([child, *(parents if receives else [])])
    assert counting.reads == expected, f"{sum(counting.reads.values())} reads at the release"
    assert tasks.types(child) == ["submitted", "released"]


# -- takeover -------------------------------------------------------------------------------------


def test_a_coordinator_that_takes_over_releases_children_whose_edges_another_one_stored() -> None:
    """Two relays share one store and its lease: each has its own coordinator, active in turn."""
    store = new_store()
    tasks, first, second = Tasks(store), Coordinator(store), Coordinator(store)
    done = tasks.submit()
    tasks.succeed(done)
    position = follow(first, store)  # no edge anywhere: the first coordinator remembers there is none
    parent = tasks.submit()
    child = tasks.submit(parent)
    second.take_over()
    position = follow(second, store, position)  # the first lost its lease meanwhile
    assert store.dependencies.any()
    tasks.succeed(parent)
    first.take_over()  # it has the lease again
    follow(first, store, position)
    assert tasks.types(child) == ["submitted", "released"]


# -- page boundaries and random graphs -------------------------------------------------------------


def final_states(tasks: Tasks, ids: Sequence[uuid.UUID]) -> list[tuple[Any, ...]]:
    return [(s.status, s.args, s.cancel_reason, tuple(tasks.types(t)))
            for t in ids for s in [tasks.state(t)]]


def test_every_cut_of_the_log_into_pages_gives_the_same_outcome() -> None:
    """One log, read in pages cut at every subset of its positions (the coordinator's own events included)."""

    def story(store: EventStore) -> tuple[Tasks, list[uuid.UUID]]:
        tasks = Tasks(store)
        a, b = tasks.submit(), tasks.submit()
        c = tasks.submit(a, receives="result")  # released
        tasks.succeed(a, "a")
        d = tasks.submit(a, b)                   # its parent a is done already; b fails after
        tasks.dead_letter(b)
        e = tasks.submit(d)                      # cancelled once d's cancelled is read
        return tasks, [a, b, c, d, e]

    store = new_store()
    tasks, ids = story(store)
    follow(Coordinator(store), store, size=1)
    expected = final_states(tasks, ids)
    assert [s[0] for s in expected] == [SUCCEEDED, DEAD_LETTERED, READY, CANCELLED, CANCELLED]
    assert expected[2][1] == ["a"]
    total = store.max_position()
    assert [r.position for r in store.read_log(0, 1000)] == list(range(1, total + 1))
    for cuts in itertools.product([False, True], repeat=total - 1):
        store = new_store()
        tasks, ids = story(store)
        coordinator = Coordinator(store)
        ends = [p for p, cut in enumerate(cuts, start=1) if cut]
        after = 0
        while True:
            end = next((p for p in ends if p > after), None)
            records = store.read_log(after, 1000 if end is None else end - after)
            if not records:
                break
            if coordinator.concerns(records):
                coordinator.process(records)
            after = records[-1].position
        assert final_states(tasks, ids) == expected, cuts
        assert store.max_position() == total


@dataclass(frozen=True)
class Node:
    parents: tuple[int, ...]
    """Earlier tasks of the graph (a task can only wait for tasks older than itself)."""
    unknown_parent: bool
    receives: str | None
    outcome: str
    """What its worker does once it may run: 'succeed' or 'dead_letter'; or 'cancel': an operator
    cancels it at some moment, whatever its state."""


@st.composite
def graphs(draw: st.DrawFn) -> list[Node]:
    nodes: list[Node] = []
    for index in range(draw(st.integers(1, 7))):
        parents = tuple(draw(st.lists(st.integers(0, index - 1), unique=True, max_size=3))) if index else ()
        unknown = draw(st.integers(0, 9)) == 0
        receives = draw(st.sampled_from([None, "results", *(["result"] if len(parents) + unknown == 1 else [])]))
        nodes.append(Node(parents, unknown, receives if parents or unknown else None,
                          draw(st.sampled_from(["succeed", "succeed", "dead_letter", "cancel"]))))
    return nodes


@dataclass
class Expected:
    status: dict[int, TaskStatus] = field(default_factory=dict)
    results: dict[int, Any] = field(default_factory=dict)


def expected_outcome(nodes: Sequence[Node]) -> Expected:
    """The reference: a task runs only if every parent succeeded, and is cancelled if any did not."""
    expected = Expected()
    for index, node in enumerate(nodes):
        upstream_failed = node.unknown_parent or any(expected.status[p] is not SUCCEEDED for p in node.parents)
        if node.outcome == "cancel" or upstream_failed:
            expected.status[index] = CANCELLED
        elif node.outcome == "succeed":
            expected.status[index] = SUCCEEDED
            expected.results[index] = {"task": index}
        else:
            expected.status[index] = DEAD_LETTERED
    return expected


@settings(max_examples=150, deadline=None)
@given(nodes=graphs(), data=st.data())
def test_random_graphs_and_interleavings_end_as_the_reference_says(nodes: list[Node], data: st.DataObject) -> None:
    """Clients submit in order, workers run what is ready, operators cancel, and the coordinator reads
    pages of random sizes, in a random interleaving; at the end every task is where the reference says."""
    store = new_store()
    tasks, coordinator = Tasks(store), Coordinator(store)
    ids: list[uuid.UUID] = []
    unknown = {index: uuid.uuid5(uuid.NAMESPACE_OID, str(index)) for index, node in enumerate(nodes)
               if node.unknown_parent}
    position = 0
    while True:
        actions: list[tuple[str, int]] = []
        if len(ids) < len(nodes):
            actions.append(("submit", len(ids)))
        for index, task_id in enumerate(ids):
            state = tasks.state(task_id)
            if nodes[index].outcome == "cancel" and not state.is_final:
                actions.append(("cancel", index))
            elif nodes[index].outcome != "cancel" and state.status is READY:
                actions.append(("run", index))
        if store.max_position() > position:
            actions.append(("page", 0))
        if not actions:
            break
        action, index = data.draw(st.sampled_from(actions))
        if action == "submit":
            node = nodes[index]
            parents = [ids[p] for p in node.parents] + ([unknown[index]] if node.unknown_parent else [])
            ids.append(tasks.submit(*parents, receives=node.receives, args=[index]))
        elif action == "cancel":
            tasks.cancel(ids[index])
        elif action == "run" and nodes[index].outcome == "succeed":
            tasks.succeed(ids[index], {"task": index})
        elif action == "run":
            tasks.dead_letter(ids[index])
        else:
            records = store.read_log(position, data.draw(st.integers(1, 6), label="page size"))
            if coordinator.concerns(records):
                coordinator.process(records)
            position = records[-1].position

    expected = expected_outcome(nodes)
    for index, (task_id, node) in enumerate(zip(ids, nodes, strict=True)):
        state = tasks.state(task_id)
        assert state.status is expected.status[index], index
        types = tasks.types(task_id)
        assert types.count("released") <= 1
        if state.status is not CANCELLED and (node.parents or node.unknown_parent):
            assert types[:2] == ["submitted", "released"]
            results = [expected.results[p] for p in node.parents]
            own = {None: [index], "result": [*results[:1], index], "results": [results, index]}
            assert state.args == own[node.receives]
        if state.status is CANCELLED and state.cancel_reason != "by hand":
            assert store.read_stream(task_id)[-1].actor == ACTOR
            parents = {str(ids[p]): expected.status[p] for p in node.parents}
            parents.update({str(unknown[index]): "does not exist"} if node.unknown_parent else {})
            named = state.cancel_reason.removeprefix("upstream_failed: parent ").split(" ", 1)
            assert named[0] in parents
            assert named[1] == ("does not exist" if parents[named[0]] == "does not exist"
                                else f"was {parents[named[0]]}")
            assert parents[named[0]] is not SUCCEEDED
    assert not store.dependencies.any()  # no edge outlives the fate of its child


# -- sealed payloads ----------------------------------------------------------------------------


def _sealing(store: EventStore) -> Payloads:
    return Payloads(lambda: store.keys, sealing=True)


def test_sealed_results_are_opened_and_sealed_again_for_the_child_that_receives_them() -> None:
    store = new_store()
    tasks, payloads = Tasks(store), _sealing(store)
    parent = tasks.submit()
    tasks.start(parent)
    done = domain.succeed(tasks.state(parent), result={"total": "s3cret"}, now=tasks.now)
    tasks._append(payloads.succeeded(done, arguments_sealed=True))
    child = uuid.UUID(int=99)
    tasks._append(payloads.submitted(domain.submit(
        task_id=child, task="t.step", queue="default", args=[1], kwargs={"k": "v"}, priority=5, tenant="acme",
        actor="client:test", now=tasks.now, depends_on=[parent], receives="result")))
    follow(Coordinator(store), store)
    released = store.read_stream(child)[1]
    assert isinstance(released, TaskReleased)
    assert released.args is None
    assert released.sealed_arguments is not None
    assert "s3cret" not in released.sealed_arguments
    assert payloads.open_arguments("acme", child, released.sealed_arguments) == ([{"total": "s3cret"}, 1],
                                                                               {"k": "v"})


def test_a_plain_child_of_a_sealed_parent_gets_its_arguments_sealed_never_the_result_plain() -> None:
    store = new_store()
    tasks, payloads = Tasks(store), _sealing(store)
    parent = tasks.submit()
    tasks.start(parent)
    tasks._append(payloads.succeeded(domain.succeed(tasks.state(parent), result="s3cret", now=tasks.now),
                                     arguments_sealed=True))
    child = tasks.submit(parent, receives="result", args=["own"])
    follow(Coordinator(store), store)
    state = tasks.state(child)
    assert (state.status, state.args) == (READY, [])
    assert payloads.arguments(state) == (["s3cret", "own"], {})


def test_a_result_that_does_not_open_cancels_the_child_naming_the_key_and_nothing_runs_on_it() -> None:
    store = new_store()
    tasks, payloads = Tasks(store), _sealing(store)
    parent = tasks.submit()
    tasks.start(parent)
    done = payloads.succeeded(domain.succeed(tasks.state(parent), result=1, now=tasks.now), arguments_sealed=True)
    assert done.sealed_result is not None
    flipped = done.sealed_result[:-3] + ("A" if done.sealed_result[-3] != "A" else "B") + done.sealed_result[-2:]
    tasks._append(dataclasses.replace(done, sealed_result=flipped))
    child = tasks.submit(parent, receives="result")
    grandchild = tasks.submit(child)
    coordinator = Coordinator(store)
    follow(coordinator, store)
    state = tasks.state(child)
    key_id = flipped.split(":")[1]
    assert state.status is CANCELLED
    assert state.cancel_reason is not None
    assert state.cancel_reason.startswith("arguments_unreadable:")
    assert f"'{key_id}'" in state.cancel_reason
    assert "'acme'" in state.cancel_reason
    assert tasks.state(grandchild).cancel_reason == reason(child, "was cancelled")
    assert coordinator.released == 0
