"""The views, the runner and the queries (``projections/``) on in-memory stores.

Every test gets a store of its own, ``memory:///<uuid>``: the views of a ``memory://`` store live in
an in-memory SQLite database per URL, so a unique URL keeps examples apart. The property test
builds random task histories with the domain's commands, appends them to the store in random
groups while a live runner follows with a random batch size at every step, and checks the views
twice: against a rebuild from position 0 (table by table, row by row), and against a reference
computed here in plain Python from the histories themselves.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.codec import dumps
from broker_q.domain import task as domain
from broker_q.domain.events import (
    Event,
    IngressRejected,
    KeyRotated,
    KeysShredded,
    TaskEvent,
    TaskSubmitted,
    keys_stream_id,
)
from broker_q.domain.task import TaskState
from broker_q.errors import ValidationError
from broker_q.store import EventStore, open_store
from projections import queries
from projections.database import ViewDatabase, ViewDatabases, open_view_databases
from projections.queries import AuditQuery
from projections.runner import ProjectionRunner
from projections.views import BUCKETS, VIEWS, table
from tests.unit.test_replay import T0, Story

TENANTS = ("acme", "globex", "initech")
QUEUES = ("default", "mail", "video")
NAMES = ("t.add", "t.mail")
_IDS = uuid.UUID("5c0f2a9e-1d3b-4e6f-8a7c-9b0d1e2f3a4b")


@dataclass
class Views:
    """A memory:// store of its own, its views' database (one for every view) and a runner on them (set up)."""

    url: str
    store: EventStore
    databases: ViewDatabases
    runner: ProjectionRunner

    @property
    def database(self) -> ViewDatabase:
        (database,) = self.databases
        return database

    def close(self) -> None:
        self.databases.close()
        self.store.close()


def new_views() -> Views:
    url = f"memory:///{uuid.uuid4().hex}"
    store = open_store(url)
    databases = open_view_databases(url, VIEWS)
    runner = ProjectionRunner(store, databases.of("tasks"))
    runner.setup()
    return Views(url, store, databases, runner)


@pytest.fixture
def views() -> Iterator[Views]:
    opened = new_views()
    yield opened
    opened.close()


def rows(database: ViewDatabase, base: str, generation: int) -> list[tuple[Any, ...]]:
    with database.transaction(write=False) as cursor:
        cursor.execute(f"SELECT * FROM {table(base, generation)}")
        return sorted((tuple(row) for row in cursor.fetchall()), key=repr)


def snapshot(views: Views, name: str, generation: int | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of view ``name`` (of its live generation unless told)."""
    if generation is None:
        generation = views.runner.positions()[name].generation
    return {base: rows(views.database, base, generation) for base in VIEWS[name].tables}


def tables_of_generation(database: ViewDatabase, generation: int) -> list[str]:
    with database.transaction(write=False) as cursor:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?", (f"%_g{generation}",))
        return sorted(row[0] for row in cursor.fetchall())


def without_zero_counts(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    return {base: [r for r in found if base != "queue_counts" or r[-1] != 0] for base, found in tables.items()}


def rejected(n: int, tenant: str, at: datetime) -> IngressRejected:
    stream = uuid.uuid5(_IDS, f"rejected:{n}")
    return IngressRejected(stream_id=stream, version=1, timestamp=at, tenant=tenant, actor="relay",
                           correlation_id=stream, reason="not JSON", queue="default", message_id=None, size=3,
                           sha256="0" * 64)


# -- random histories ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One task's story: submitted (after parents, with an eta: blocked), released if it had parents,
    ``starts`` attempts (a takeover after the first), then ``ending``."""

    tenant: str
    queue: str
    name: str
    starts: int
    ending: str | None  # "succeeded", "dead_lettered", "cancelled" or None (still blocked, ready or started)
    eta: int | None = None
    """Milliseconds from its submission to its ``due_at``: before it (an eta past already), or after."""
    parents: int = 0
    released: bool = False

    @property
    def steps(self) -> list[str]:
        return ["submitted", *(["released"] if self.released else []), *["started"] * self.starts,
                *([self.ending] if self.ending else [])]


@st.composite
def plans(draw: st.DrawFn, tenants: Sequence[str], queues: Sequence[str]) -> Plan:
    eta = draw(st.none() | st.integers(-5_000, 0) | st.integers(1, 5_000) | st.integers(60_000, 600_000))
    parents = draw(st.sampled_from([0, 0, 1, 3]))
    released = bool(parents) and draw(st.booleans())
    starts = draw(st.integers(0, 3)) if released or not parents else 0  # no start before the release
    endings: list[str | None] = [None, "cancelled", *(["succeeded", "dead_lettered"] if starts else [])]
    return Plan(draw(st.sampled_from(tenants)), draw(st.sampled_from(queues)), draw(st.sampled_from(NAMES)), starts,
                draw(st.sampled_from(endings)), eta, parents, released)


@dataclass(frozen=True)
class History:
    plans: dict[uuid.UUID, Plan]
    log: list[Event]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Tasks of 1-3 tenants and 1-3 queues, their events interleaved at random into one log.

    Some wait: for an eta (past already, or later than their submission) and for parents (fictitious
    ones: the views do not look parents up), and some of those are released, before or after their
    eta. The coordinator's clock is no better than the others: a release may be stamped before the
    submission.

    The clock moves by 0 to 90 s between events (often by nothing or a few milliseconds, so times tie
    and every histogram bucket gets used), and a stamp may drift 2 s either way (clock skew).
    """
    tenants = TENANTS[:draw(st.integers(1, 3))]
    queues = QUEUES[:draw(st.integers(1, 3))]
    chosen = draw(st.lists(plans(tenants, queues), min_size=1, max_size=8))
    ids = [uuid.uuid5(_IDS, f"{draw(st.integers(0, 2**32))}:{i}") for i in range(len(chosen))]
    refused = draw(st.integers(0, 2))
    tokens = [i for i, plan in enumerate(chosen) for _ in plan.steps] + [-1] * refused
    clock = T0
    states: dict[uuid.UUID, TaskState] = {}
    taken = Counter[int]()
    log: list[Event] = []
    for index in draw(st.permutations(tokens)):
        clock += timedelta(milliseconds=draw(st.one_of(st.integers(0, 30), st.integers(0, 90_000))))
        now = clock + timedelta(milliseconds=draw(st.one_of(st.just(0), st.integers(-2000, 2000))))
        if index < 0:
            log.append(rejected(len(log), draw(st.sampled_from(tenants)), now))
            continue
        plan, task_id = chosen[index], ids[index]
        step = plan.steps[taken[index]]
        taken[index] += 1
        state = states.get(task_id)
        event: TaskEvent
        if state is None:
            due = None if plan.eta is None else now + timedelta(milliseconds=plan.eta)
            parents = [uuid.uuid5(_IDS, f"parent:{index}:{n}") for n in range(plan.parents)]
            event = domain.submit(task_id=task_id, task=plan.name, queue=plan.queue, args=[index], kwargs={},
                                  priority=index % 10, tenant=plan.tenant, actor="client:test", now=now,
                                  due_at=due, depends_on=parents, receives="results" if plan.parents > 1 else None)
        elif step == "released":
            event = domain.release(state, results=list(range(plan.parents)), actor="coordinator", now=now)
        elif step == "started":
            event = domain.start(state, worker=f"worker:{taken[index]}", now=now)
        elif step == "succeeded":
            event = domain.succeed(state, result={"n": index}, now=now)
        elif step == "dead_lettered":
            event = domain.dead_letter(state, error_type="ValueError", message=f"boom {index}",
                                       traceback="Traceback ...", now=now)
        else:
            event = domain.cancel(state, reason=f"not needed {index}", actor="client:test", now=now)
        states[task_id] = domain.evolve(state, event)
        log.append(event)
    return History(dict(zip(ids, chosen, strict=True)), log)


def follow(data: st.DataObject, views: Views, log: Sequence[Event]) -> list[int]:
    """Append ``log`` in random groups while the runner steps with random batch sizes; then catch up."""
    positions: list[int] = []
    pending = list(log)
    while pending:
        size = data.draw(st.integers(1, 5), label="appended together")
        group, pending = pending[:size], pending[size:]
        positions += views.store.append(group)
        for _ in range(data.draw(st.integers(0, 2), label="steps")):
            views.runner.batch_size = data.draw(st.integers(1, 7), label="batch size")
            assert views.runner.step() <= views.runner.batch_size
    while True:
        views.runner.batch_size = data.draw(st.integers(1, 7), label="batch size")
        if not views.runner.step():
            return positions


# -- the reference: plain Python over the histories ---------------------------------------------


def bucket(seconds: float) -> int:
    for index, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return index
    return len(BUCKETS)


@dataclass
class Reference:
    tasks: list[tuple[Any, ...]]
    counts: dict[tuple[str, str, str], int]
    outcomes: dict[tuple[str, str, str, str], int]
    durations: dict[tuple[str, str, str, int], tuple[int, float]]
    audit: list[tuple[Any, ...]]


def reference(history: History, positions: Sequence[int]) -> Reference:
    events: dict[uuid.UUID, list[tuple[int, TaskEvent]]] = {}
    audit = []
    for position, event in zip(positions, history.log, strict=True):
        task_id = event.stream_id.hex if isinstance(event, TaskEvent) else None
        audit.append((position, event.timestamp.timestamp(), event.tenant, event.actor, event.stream_id.hex, task_id,
                      event.TYPE))
        if isinstance(event, TaskEvent):
            events.setdefault(event.stream_id, []).append((position, event))
    tasks = []
    durations: dict[tuple[str, str, str, int], tuple[int, float]] = {}

    def observe(metric: str, plan: Plan, seconds: float) -> None:
        key = (metric, plan.tenant, plan.queue, bucket(max(seconds, 0.0)))
        count, total = durations.get(key, (0, 0.0))
        durations[key] = (count + 1, total + max(seconds, 0.0))

    outcomes = Counter[tuple[str, str, str, str]]()
    counts = Counter[tuple[str, str, str]]()
    for task_id, plan in history.plans.items():
        stream = events[task_id]
        assert [e.TYPE for _, e in stream] == plan.steps
        stamps = [e.timestamp.timestamp() for _, e in stream]
        submitted = stamps[0]
        first_event = stream[0][1]
        assert isinstance(first_event, TaskSubmitted)
        due = None if first_event.due_at is None else first_event.due_at.timestamp()
        # Blocked: after parents, or for an eta later than the submission. A release readies it,
        # unless that eta is later still; ready_at is when it became ready, or is due.
        state = "blocked" if plan.parents or (due is not None and due > submitted) else "ready"
        ready_at = max(submitted, due if due is not None else submitted)
        if plan.released:
            released = stamps[1]
            if not (due is not None and due > max(released, submitted)):
                state, ready_at = "ready", released
            outcomes[(plan.tenant, plan.queue, plan.name, "released")] += 1
        first = 2 if plan.released else 1
        starts = stamps[first:first + plan.starts]
        if starts:  # only the start from blocked or ready waited in a queue; a takeover did not
            observe("queue_wait", plan, starts[0] - ready_at)
            state = "started"
        finished = stamps[-1] if plan.ending else None
        if plan.ending in ("succeeded", "dead_lettered"):
            assert finished is not None
            observe("run", plan, finished - starts[-1])
        if plan.ending:
            state = plan.ending
            outcomes[(plan.tenant, plan.queue, plan.name, plan.ending)] += 1
        counts[(plan.tenant, plan.queue, state)] += 1
        index = list(history.plans).index(task_id)
        error = {"dead_lettered": ("ValueError", f"boom {index}"), "cancelled": ("Cancelled", f"not needed {index}")}
        tasks.append((
            task_id.hex, plan.tenant, plan.queue, plan.name, state, plan.starts, len(plan.steps),
            dumps({"n": index}).decode() if plan.ending == "succeeded" else None,
            *error.get(plan.ending or "", (None, None)),
            submitted, ready_at, starts[-1] if starts else None, finished, stream[-1][0],
        ))
    return Reference(
        tasks=sorted(tasks, key=repr),
        counts=dict(counts),
        outcomes=dict(outcomes),
        durations=durations,
        audit=audit,
    )


def check_against_reference(views: Views, expected: Reference, log: Sequence[Event]) -> None:
    generation = views.runner.positions()["tasks"].generation
    with views.database.transaction(write=False) as cursor:
        cursor.execute("SELECT task_id, tenant, queue, task, state, attempts, version, result, error_type, error, "
                       f"submitted_at, ready_at, started_at, finished_at, position FROM {table('tasks', generation)}")
        assert sorted(map(tuple, cursor.fetchall()), key=repr) == expected.tasks
        cursor.execute(f"SELECT tenant, queue, state, count FROM {table('queue_counts', generation)}")
        counts = {(t, q, s): n for t, q, s, n in cursor.fetchall()}
        assert {k: n for k, n in counts.items() if n} == expected.counts  # a zero count may be absent or 0
        assert min(counts.values(), default=0) >= 0
        cursor.execute(f"SELECT tenant, queue, task, outcome, count FROM {table('outcomes', generation)}")
        assert {(t, q, k, o): n for t, q, k, o, n in cursor.fetchall()} == expected.outcomes
        cursor.execute(f"SELECT metric, tenant, queue, bucket, count, total FROM {table('durations', generation)}")
        durations = {(m, t, q, b): (n, total) for m, t, q, b, n, total in cursor.fetchall()}
    assert durations == expected.durations
    per_metric = Counter[str]()
    for (metric, *_), (count, _) in durations.items():
        per_metric[metric] += count
    assert per_metric["queue_wait"] == len({e.stream_id for e in log if e.TYPE == "started"})
    assert per_metric["run"] == sum(e.TYPE in ("succeeded", "dead_lettered") for e in log)

    audit_generation = views.runner.positions()["audit"].generation
    with views.database.transaction(write=False) as cursor:
        cursor.execute("SELECT position, time, tenant, actor, stream_id, task_id, type "
                       f"FROM {table('audit', audit_generation)} ORDER BY position")
        audit = [tuple(row) for row in cursor.fetchall()]
    assert len(audit) == len(log)
    assert [row[-1] for row in audit] == [e.TYPE for e in log]
    assert audit == expected.audit


@settings(max_examples=120, deadline=None)
@given(history=histories(), data=st.data())
def test_live_views_equal_a_rebuild_and_a_reference(history: History, data: st.DataObject) -> None:
    views = new_views()
    try:
        positions = follow(data, views, history.log)
        head = views.store.max_position()
        assert head == positions[-1]
        assert {p.position for p in views.runner.positions().values()} == {head}
        check_against_reference(views, reference(history, positions), history.log)

        for name in VIEWS:
            before = views.runner.positions()[name].generation
            live = snapshot(views, name)
            views.runner.batch_size = data.draw(st.integers(1, 7), label="rebuild batch size")
            assert views.runner.rebuild(name) == len(history.log)
            after = views.runner.positions()[name]
            assert (after.generation, after.position, after.building) == (before + 1, head, None)
            rebuilt = snapshot(views, name, before + 1)
            # Zero counts aside (see test_zero_counts_do_not_depend_on_batch_boundaries), row for row:
            assert without_zero_counts(rebuilt) == without_zero_counts(live)
            assert not [t for t in tables_of_generation(views.database, before) if t.startswith(
                tuple(f"bq_{base}_" for base in VIEWS[name].tables))]
        check_against_reference(views, reference(history, positions), history.log)
        assert views.runner.step() == 0
    finally:
        views.close()


def test_zero_counts_do_not_depend_on_batch_boundaries(views: Views) -> None:
    story = Story()
    story.start(story.submit())
    views.store.append(story.log)
    views.runner.batch_size = 1
    views.runner.catch_up()
    live = snapshot(views, "tasks")
    views.runner.batch_size = 100
    views.runner.rebuild("tasks")
    assert snapshot(views, "tasks")["queue_counts"] == live["queue_counts"]


def test_a_release_readies_a_task_unless_its_eta_is_later_even_if_stamped_before_the_submission(
        views: Views) -> None:
    """The coordinator's clock may be behind the submitter's: the views say what the store says."""
    log: list[Event] = []
    expected: dict[uuid.UUID, tuple[str, float]] = {}
    parent = uuid.uuid5(_IDS, "parent")
    for n, (eta, release_after, state) in enumerate([
        (None, -2, "ready"), (-1, -2, "ready"), (0, -2, "ready"),     # released "before" being submitted
        (60, 30, "blocked"), (60, 90, "ready"), (None, 5, "ready"),
    ]):
        submit = domain.submit(task_id=uuid.uuid5(_IDS, f"child:{n}"), task="t.add", queue="default", args=[],
                               kwargs={}, priority=5, tenant="acme", actor="client:test", now=T0,
                               due_at=None if eta is None else T0 + timedelta(seconds=eta), depends_on=[parent])
        blocked = domain.evolve(None, submit)
        release = domain.release(blocked, results=[None], actor="coordinator",
                                 now=T0 + timedelta(seconds=release_after))
        released = domain.evolve(blocked, release)
        assert released.status == state
        assert released.ready_at is not None
        expected[submit.stream_id] = (state, released.ready_at.timestamp())
        log += [submit, release]
    views.store.append(log)
    views.runner.catch_up()
    for task_id, (state, ready_at) in expected.items():
        row = queries.task(views.databases, str(task_id))
        assert row is not None
        assert (row["state"], row["ready_at"]) == (state, datetime.fromtimestamp(ready_at, UTC).isoformat())
    assert [s.counts for s in queries.queues(views.databases)] == [{"ready": 5, "blocked": 1}]


# -- applying: once, and resuming -----------------------------------------------------------------


def test_a_new_runner_resumes_where_the_last_one_stopped(views: Views) -> None:
    story = Story()
    for n in range(7):
        task = story.submit()
        if n % 2:
            story.start(task)
    positions = views.store.append(story.log)
    views.runner.batch_size = 4
    assert views.runner.step() == 4
    successor = ProjectionRunner(views.store, open_view_databases(views.url, VIEWS).of("tasks"), batch_size=3)
    successor.setup()
    assert successor.positions()["tasks"].position == positions[3]
    assert successor.catch_up() == len(positions) - 4
    assert successor.catch_up() == 0
    assert views.runner.step() == 0  # the first runner sees the second's positions: nothing twice
    assert [(s.tenant, s.queue, s.counts) for s in queries.queues(views.databases)] == [
        ("acme", "default", {"ready": 4, "started": 3})]
    assert len(queries.audit(views.databases, AuditQuery())) == len(positions)


class Interleaving:
    """A store whose next ``read_log`` first runs ``before`` (another runner's whole step, say)."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.before: Any = None

    def read_log(self, after: int, limit: int, *, to_position: int | None = None) -> list[Any]:
        if self.before is not None:
            before, self.before = self.before, None
            before()
        return self.inner.read_log(after, limit, to_position=to_position)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_batch_read_before_another_runner_committed_is_not_applied_again(views: Views) -> None:
    story = Story()
    for _ in range(5):
        story.start(story.submit())
    positions = views.store.append(story.log)
    racing = Interleaving(views.store)
    late = ProjectionRunner(racing, views.database, batch_size=6)  # type: ignore[arg-type]
    views.runner.batch_size = 4
    racing.before = views.runner.step  # commits positions 1-4 between the late runner's read and its write
    assert late.step() == 6
    assert {p.position for p in late.positions().values()} == {positions[5]}
    late.catch_up()
    assert [s.counts for s in queries.queues(views.databases)] == [{"started": 5}]
    assert [r["position"] for r in queries.audit(views.databases, AuditQuery())] == positions


def test_a_view_added_later_catches_up_without_touching_the_others() -> None:
    url = f"memory:///{uuid.uuid4().hex}"
    store, databases = open_store(url), open_view_databases(url, VIEWS)
    database = databases.of("tasks")
    try:
        positions = store.append(story_of_ten().log)
        only_tasks = ProjectionRunner(store, database, [VIEWS["tasks"]], batch_size=5)
        only_tasks.setup()
        only_tasks.catch_up()
        assert set(only_tasks.positions()) == {"tasks"}
        tasks_before = snapshot(Views(url, store, databases, only_tasks), "tasks")
        both = ProjectionRunner(store, database, batch_size=3)
        both.setup()
        assert both.positions()["audit"].position == 0
        assert both.catch_up() == len(positions)  # read again from 0 for the audit view alone
        assert snapshot(Views(url, store, databases, both), "tasks") == tasks_before
        assert [r["position"] for r in queries.audit(databases, AuditQuery())] == positions
    finally:
        database.close()
        store.close()


def test_setup_is_idempotent_and_keeps_positions(views: Views) -> None:
    story = Story()
    story.submit()
    views.store.append(story.log)
    views.runner.catch_up()
    views.runner.setup()
    assert views.runner.positions()["tasks"].position == 1
    assert [s.counts for s in queries.queues(views.databases)] == [{"ready": 1}]


# -- rebuilding -----------------------------------------------------------------------------------


def story_of_ten() -> Story:
    story = Story()
    tasks = [story.submit(tenant="globex" if n % 3 == 0 else "acme") for n in range(10)]
    for task in tasks[:6]:
        story.start(task)
    story.succeed(tasks[0])
    story.fail(tasks[1])
    story.cancel(tasks[7])
    return story


def test_queries_answer_from_the_live_generation_during_a_rebuild(views: Views) -> None:
    story = story_of_ten()
    positions = views.store.append(story.log)
    views.runner.catch_up()
    now = (story.now + timedelta(seconds=5)).timestamp()
    before = queries.queues(views.databases, now=now)
    one = queries.task(views.databases, str(uuid.UUID(int=1)))
    seen: list[tuple[int, int, Any]] = []

    def progress(position: int, head: int) -> None:
        if position == head:  # the last call: see test_the_last_progress_call_can_query_the_views
            seen.append((position, head, None))
            return
        assert queries.queues(views.databases, now=now) == before
        assert queries.task(views.databases, str(uuid.UUID(int=1))) == one
        rebuilding = {s.name: s.rebuilding for s in queries.status(views.databases, views.store)}
        seen.append((position, head, rebuilding["tasks"]))
        assert rebuilding["audit"] is None

    assert len(positions) % 4  # so that only the last call has position == head
    views.runner.batch_size = 4
    assert views.runner.rebuild("tasks", progress=progress) == len(positions)
    *building, last = seen
    assert [p for p, _, _ in building] == positions[3::4]
    assert [r for _, _, r in building] == [{"generation": 2, "position": p} for p, _, _ in building]
    assert last == (positions[-1], positions[-1], None)
    assert queries.status(views.databases, views.store)[1].rebuilding is None
    assert queries.queues(views.databases, now=now) == before
    assert views.runner.positions()["tasks"].generation == 2
    assert tables_of_generation(views.database, 1) == ["bq_audit_g1"]


def test_the_last_progress_call_can_query_the_views(views: Views) -> None:
    story = story_of_ten()
    views.store.append(story.log)
    views.runner.catch_up()
    generations: list[int] = []
    views.runner.rebuild("tasks", progress=lambda position, head: generations.append(
        {s.name: s.generation for s in queries.status(views.databases, views.store)}["tasks"]))
    assert generations[-1] == 2


def test_an_interrupted_rebuild_leaves_the_live_view_working_and_starts_again(views: Views) -> None:
    story = story_of_ten()
    positions = views.store.append(story.log)
    views.runner.catch_up()

    def crash(position: int, head: int) -> None:
        raise RuntimeError("killed")

    views.runner.batch_size = 4
    with pytest.raises(RuntimeError, match="killed"):
        views.runner.rebuild("tasks", progress=crash)
    status = {s.name: s for s in queries.status(views.databases, views.store)}["tasks"]
    assert (status.generation, status.rebuilding) == (1, {"generation": 2, "position": positions[3]})
    # The live view goes on following the log meanwhile.
    task = story.submit(tenant="initech")
    views.store.append(story.log[-1:])
    assert views.runner.step() == 1
    assert queries.task(views.databases, str(task))["state"] == "ready"  # type: ignore[index]
    live = snapshot(views, "tasks")

    views.runner.batch_size = 5
    views.runner.rebuild("tasks")
    position = views.runner.positions()["tasks"]
    assert (position.generation, position.position, position.building) == (2, len(story.log), None)
    assert without_zero_counts(snapshot(views, "tasks")) == without_zero_counts(live)
    assert tables_of_generation(views.database, 3) == []


def test_rebuilding_an_empty_log_or_an_unknown_view(views: Views) -> None:
    assert views.runner.rebuild("audit") == 0
    assert views.runner.positions()["audit"].generation == 2
    assert queries.audit(views.databases, AuditQuery()) == []
    with pytest.raises(KeyError):
        views.runner.rebuild("nosuch")


def test_two_handles_on_a_memory_store_can_be_used_from_two_threads(views: Views) -> None:
    story = Story()
    story.submit()
    views.store.append(story.log)
    views.runner.catch_up()
    other = open_view_databases(views.url, VIEWS)
    inside, release = threading.Event(), threading.Event()

    def hold_a_read_transaction() -> None:
        with views.database.transaction(write=False) as cursor:
            cursor.execute("SELECT 1")
            inside.set()
            release.wait(timeout=10)  # only a fix that serialises the handles would keep us waiting

    holder = threading.Thread(target=hold_a_read_transaction)
    holder.start()
    try:
        assert inside.wait(timeout=10)
        assert [s.counts for s in queries.queues(other)] == [{"ready": 1}]
    finally:
        release.set()
        holder.join()


# -- queries --------------------------------------------------------------------------------------


def submitted(tenant: str, queue: str, at: datetime, n: int, name: str = "t.add") -> TaskEvent:
    """A submit with an id that does not sort like ``n`` (so that order by id is tested, not by insertion)."""
    return domain.submit(task_id=uuid.uuid5(_IDS, str(n)), task=name, queue=queue, args=[n], kwargs={}, priority=5,
                         tenant=tenant, actor="client:test", now=at)


def walk(fetch: Any, limit: int) -> list[str]:
    """Every id of every page, following ``next``; checks page sizes and the end."""
    found: list[str] = []
    after = None
    for _ in range(1000):
        page = fetch(limit=limit, after=after)
        assert len(page.items) <= limit
        found += [item["id"] for item in page.items]
        if page.next is None:
            return found
        assert len(page.items) == limit
        after = page.next
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("limit", [1, 3, 7, 13, 1000])
def test_task_pages_walk_every_row_once_in_order(views: Views, limit: int) -> None:
    wanted = [submitted("acme", "default", T0 + timedelta(seconds=n // 3), n) for n in range(13)]  # ties by 3
    others = [submitted("acme", "mail", T0, 100), submitted("globex", "default", T0 + timedelta(seconds=2), 101)]
    busy = submitted("acme", "default", T0, 102)
    started = domain.start(domain.evolve(None, busy), worker="w", now=T0)
    views.store.append([*reversed(wanted), *others, busy, started])
    views.runner.catch_up()
    expected = [str(e.stream_id) for e in sorted(wanted, key=lambda e: (e.timestamp, e.stream_id.hex))]

    ids = walk(lambda **page: queries.tasks(views.databases, queue="default", state="ready", tenant="acme", **page),
               limit)
    assert ids == expected
    assert len(set(ids)) == 13

    everyone = walk(lambda **page: queries.tasks(views.databases, queue="default", state="ready", **page), limit)
    assert everyone == [str(e.stream_id) for e in sorted([*wanted, others[1]],
                                                         key=lambda e: (e.timestamp, e.stream_id.hex))]
    page = queries.tasks(views.databases, queue="default", state="started", limit=limit)
    assert ([i["id"] for i in page.items], page.next) == ([str(busy.stream_id)], None)
    first = queries.tasks(views.databases, queue="default", state="ready", tenant="acme", limit=1).items[0]
    assert first["id"] == expected[0]
    assert (first["state"], first["queue"], first["attempts"], first["started_at"]) == ("ready", "default", 0, None)
    assert first["ready_at"] == T0.isoformat()


def test_dead_letters_are_failed_tasks_most_recent_first(views: Views) -> None:
    log: list[Event] = []
    failed: list[TaskEvent] = []
    for n in range(7):
        submit = submitted("globex" if n == 3 else "acme", "default", T0, n)
        start = domain.start(domain.evolve(None, submit), worker="w", now=T0)
        state = domain.evolve(domain.evolve(None, submit), start)
        at = T0 + timedelta(seconds=10 + n // 2)  # ties by two
        end: TaskEvent
        if n == 5:
            end = domain.succeed(state, result=1, now=at)
        elif n == 6:
            end = domain.cancel(state, reason="r", actor="client", now=at)
        else:
            end = domain.dead_letter(state, error_type="KeyError", message=f"k{n}", traceback=None, now=at)
            failed.append(end)
        log += [submit, start, end]
    views.store.append(log)
    views.runner.catch_up()
    expected = [str(e.stream_id) for e in sorted(failed, key=lambda e: (e.timestamp, e.stream_id.hex), reverse=True)]

    for limit in (1, 2, 50):
        assert walk(lambda **page: queries.dead_letters(views.databases, **page), limit) == expected
    acme = walk(lambda **page: queries.dead_letters(views.databases, tenant="acme", **page), 2)
    assert acme == [i for i in expected if i != str(uuid.uuid5(_IDS, "3"))]
    item = queries.dead_letters(views.databases, limit=1).items[0]
    assert (item["state"], item["error_type"], item["error"]) == ("dead_lettered", "KeyError", "k4")


def test_audit_filters(views: Views) -> None:
    story = Story()
    a = story.submit()
    b = story.submit(tenant="globex")
    story.start(a, worker="worker:1")
    story.start(b, worker="worker:2")
    story.succeed(a)
    story.fail(b)
    c = story.submit(after=10)
    story.cancel(c)
    log: list[Event] = [*story.log[:4], rejected(0, "acme", story.log[3].timestamp), *story.log[4:]]
    positions = views.store.append(log)
    views.runner.catch_up()
    db = views.databases

    def select(query: AuditQuery | None = None, **options: Any) -> list[tuple[int, str]]:
        return [(r["position"], r["type"]) for r in queries.audit(db, query or AuditQuery(), **options)]

    everything = list(zip(positions, [e.TYPE for e in log], strict=True))
    assert select() == everything
    assert select(AuditQuery(tenant="globex")) == [everything[i] for i in (1, 3, 6)]
    assert select(AuditQuery(actor="worker:1")) == [everything[i] for i in (2, 5)]
    assert select(AuditQuery(task=str(a))) == [everything[i] for i in (0, 2, 5)]
    assert select(AuditQuery(task=c.hex)) == [everything[i] for i in (7, 8)]
    assert select(AuditQuery(types=["started", "ingress_rejected"])) == [everything[i] for i in (2, 3, 4)]
    assert select(AuditQuery(since=log[2].timestamp, until=log[5].timestamp)) == everything[2:6]  # inclusive
    assert select(AuditQuery(since=story.now + timedelta(seconds=1))) == []
    assert select(after=positions[5]) == everything[6:]
    assert select(after=positions[1], limit=2) == everything[2:4]
    assert select(AuditQuery(tenant="acme", types=["succeeded", "cancelled"], since=log[6].timestamp)) == [
        everything[8]]
    record = queries.audit(db, AuditQuery(types=["dead_lettered"]))[0]
    assert record == {"position": positions[6], "time": log[6].timestamp.isoformat(), "tenant": "globex",
                      "actor": "worker:2", "stream_id": str(b), "task_id": str(b), "type": "dead_lettered",
                      "summary": "dead-lettered: ValueError: boom"}
    refusal = queries.audit(db, AuditQuery(types=["ingress_rejected"]))[0]
    assert (refusal["task_id"], refusal["actor"]) == (None, "relay")
    with pytest.raises(ValidationError, match="task id"):
        queries.audit(db, AuditQuery(task="nope"))
    with pytest.raises(ValidationError, match="limit"):
        queries.audit(db, AuditQuery(), limit=0)


def test_queues_count_states_and_age_the_oldest_ready_task(views: Views) -> None:
    story = Story()
    a = story.submit(after=1)                                   # T0+1
    story.submit(after=1)                                       # T0+2
    story.start(story.submit(after=1))                          # T0+3, started at T0+4
    story.start(story.submit(queue="mail", after=1))            # nothing ready in acme/mail
    story.submit(tenant="globex", after=10)                     # T0+16
    views.store.append(story.log)
    views.runner.catch_up()
    now = (T0 + timedelta(seconds=100)).timestamp()
    summaries = {(s.tenant, s.queue): s for s in queries.queues(views.databases, now=now)}
    assert {k: (s.counts, s.oldest_waiting_seconds) for k, s in summaries.items()} == {
        ("acme", "default"): ({"ready": 2, "started": 1}, 99.0),
        ("acme", "mail"): ({"started": 1}, None),
        ("globex", "default"): ({"ready": 1}, 84.0),
    }
    assert [(s.tenant, s.queue) for s in queries.queues(views.databases, tenant="globex", now=now)] == [
        ("globex", "default")]
    assert queries.queues(views.databases, tenant="nobody", now=now) == []

    story.start(a)  # the oldest ready task leaves the queue: the next one is now the oldest
    views.store.append(story.log[-1:])
    views.runner.catch_up()
    summaries = {(s.tenant, s.queue): s for s in queries.queues(views.databases, now=now)}
    assert (summaries[("acme", "default")].counts, summaries[("acme", "default")].oldest_waiting_seconds) == (
        {"ready": 1, "started": 2}, 98.0)
    early = {(s.tenant, s.queue): s for s in queries.queues(views.databases, now=T0.timestamp())}
    assert early[("acme", "default")].oldest_waiting_seconds == 0.0  # a clock behind the event: never negative


def test_status_shows_each_views_lag(views: Views) -> None:
    empty = queries.status(views.databases, views.store)
    assert [(s.name, s.position, s.head, s.lag_events, s.lag_seconds, s.updated_at) for s in empty] == [
        ("audit", 0, 0, 0, 0.0, None), ("tasks", 0, 0, 0, 0.0, None)]
    story = Story()
    for _ in range(3):
        story.start(story.submit(after=10), after=10)
    positions = views.store.append(story.log)
    views.runner.batch_size = 4
    views.runner.step()
    behind = {s.name: s for s in queries.status(views.databases, views.store)}
    for name in ("audit", "tasks"):
        s = behind[name]
        assert (s.generation, s.position, s.head, s.lag_events) == (1, positions[3], positions[-1], 2)
        assert s.lag_seconds == (story.log[-1].timestamp - story.log[3].timestamp).total_seconds() == 20.0
        assert s.updated_at is not None
        assert s.rebuilding is None
    views.runner.catch_up()
    assert [(s.position, s.lag_events, s.lag_seconds) for s in queries.status(views.databases, views.store)] == [
        (positions[-1], 0, 0.0)] * 2


def test_a_task_by_id(views: Views) -> None:
    story = Story()
    task = story.submit()
    story.start(task, worker="worker:7")
    story.succeed(task, result={"sum": 3})
    views.store.append(story.log)
    views.runner.catch_up()
    row = queries.task(views.databases, str(task))
    assert row is not None
    assert (row["id"], row["state"], row["attempts"], row["worker"], row["result"], row["version"]) == (
        str(task), "succeeded", 1, "worker:7", {"sum": 3}, 3)
    assert row["finished_at"] == story.now.isoformat()
    assert queries.task(views.databases, task.hex) == row
    assert queries.task(views.databases, str(uuid.uuid4())) is None
    with pytest.raises(ValidationError, match="not a task id"):
        queries.task(views.databases, "nope")


def test_queries_refuse_bad_pages(views: Views) -> None:
    with pytest.raises(ValidationError, match="not a page cursor"):
        queries.tasks(views.databases, queue="default", state="ready", after="yesterday/abc")
    with pytest.raises(ValidationError, match="limit"):
        queries.tasks(views.databases, queue="default", state="ready", limit=0)
    with pytest.raises(ValidationError, match="limit"):
        queries.dead_letters(views.databases, limit=1001)


def test_a_sealed_result_stays_sealed_in_the_views_and_key_events_are_audited(views: Views) -> None:
    story = Story()
    task = story.submit()
    story.start(task)
    story.succeed(task, result=None)
    story.log[-1] = dataclasses.replace(story.log[-1], sealed_result="bq1:k1.0a0b0c0d:c2VhbGVk")
    rotated = KeyRotated(stream_id=keys_stream_id("acme"), version=1, timestamp=story.now, tenant="acme",
                         actor="operator:ann@ops", correlation_id=keys_stream_id("acme"), key_id="k2.0e0f0a0b",
                         generation=2, previous_key_id="k1.0a0b0c0d")
    shredded = KeysShredded(stream_id=keys_stream_id("acme"), version=2, timestamp=story.now, tenant="acme",
                            actor="operator:ann@ops", correlation_id=keys_stream_id("acme"),
                            key_ids=["k1.0a0b0c0d", "k2.0e0f0a0b"], reason="tenant left")
    views.store.append([*story.log, rotated, shredded])
    views.runner.catch_up()
    row = queries.task(views.databases, str(task))
    assert row is not None
    assert (row["state"], row["result"]) == ("succeeded", "bq1:k1.0a0b0c0d:c2VhbGVk")
    audited = queries.audit(views.databases, AuditQuery(tenant="acme", types=["key_rotated", "keys_shredded"]))
    assert [(r["type"], r["task_id"], r["actor"]) for r in audited] == [
        ("key_rotated", None, "operator:ann@ops"), ("keys_shredded", None, "operator:ann@ops")]
    assert audited[0]["summary"] == "key k2.0e0f0a0b (generation 2) is now current"
    assert "k1.0a0b0c0d, k2.0e0f0a0b" in audited[1]["summary"]
