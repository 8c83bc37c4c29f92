"""The projection runner on the durable stores: an SQLite file (views in the file beside it) and a
PostgreSQL schema (views in the same schema), through ``durable_store_url``.

What the issue promises, each proved here: catch-up then live follow woken by the store's change
signal; queries that keep answering, with consistent totals, while a rebuild runs beside the live
view; a restart (new runner, new connection) that resumes without applying anything twice, also
after a batch that failed half-way; and a projection process killed with SIGKILL in the middle of
its catch-up, whose views after a restart hold exact counts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker_q import App
from broker_q.domain import task as domain
from broker_q.domain.events import Event, TaskEvent
from broker_q.errors import BrokerQError
from broker_q.store import EventStore, Recorded, open_store
from projections import queries
from projections.database import Cursor, ViewDatabase, open_view_database
from projections.queries import AuditQuery
from projections.runner import ProjectionRunner
from projections.views import VIEWS, TasksView, table
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
STATES = ("ready", "started", "succeeded", "dead_lettered", "cancelled")


@dataclass(frozen=True)
class Generated:
    """A log made fast with the domain's functions, and what each task's final state is."""

    events: list[Event]
    final: dict[uuid.UUID, tuple[str, str, str]]  # task -> (tenant, queue, state)

    def counts(self, tasks: Sequence[uuid.UUID] | None = None) -> dict[tuple[str, str, str], int]:
        chosen = self.final if tasks is None else {t: self.final[t] for t in tasks}
        return dict(Counter(chosen.values()))


def generate(n_events: int, *, seed: int = 0) -> Generated:
    """Tasks cycling through every final state over two tenants and three queues, task after task."""
    events: list[Event] = []
    final: dict[uuid.UUID, tuple[str, str, str]] = {}
    i = 0
    while len(events) < n_events:
        task_id = uuid.UUID(int=seed << 64 | i + 1)
        tenant, queue, state = ("acme", "globex")[i % 2], ("default", "mail", "video")[i % 3], STATES[i % 5]
        now = T0 + timedelta(milliseconds=i)
        submitted = domain.submit(task_id=task_id, task="t.add", queue=queue, args=[i], kwargs={}, priority=5,
                                  tenant=tenant, actor="client:test", now=now)
        events.append(submitted)
        if state in ("started", "succeeded", "dead_lettered"):
            events.append(domain.started_event(task_id=task_id, version=2, attempt=1, worker="worker:1",
                                               tenant=tenant, correlation_id=task_id, now=now + timedelta(seconds=1)))
        if state == "succeeded":
            events.append(domain.succeeded_event(task_id, 3, tenant, "worker:1", task_id, i,
                                                 now + timedelta(seconds=3)))
        elif state == "dead_lettered":
            events.append(domain.dead_lettered_event(task_id, 3, tenant, "worker:1", task_id, "ValueError", "boom",
                                                     None, now + timedelta(seconds=3)))
        elif state == "cancelled":
            events.append(domain.cancel(domain.evolve(None, submitted), reason="no", actor="client:test",
                                        now=now + timedelta(seconds=2)))
        final[task_id] = (tenant, queue, state)
        i += 1
    return Generated(events, final)


def append_in_groups(store: EventStore, events: Sequence[Event], size: int = 1000) -> list[int]:
    return [p for start in range(0, len(events), size) for p in store.append(events[start:start + size])]


@pytest.fixture
def store(durable_store_url: str) -> Iterator[EventStore]:
    opened = open_store(durable_store_url)
    yield opened
    opened.close()


@pytest.fixture
def database(durable_store_url: str) -> Iterator[ViewDatabase]:
    opened = open_view_database(durable_store_url)
    yield opened
    opened.close()


def view_counts(database: ViewDatabase) -> dict[tuple[str, str, str], int]:
    """The non-zero task counts of the live tasks view, per tenant, queue and state."""
    return {(s.tenant, s.queue, state): n for s in queries.queues(database) for state, n in s.counts.items()}


def counts_once_set_up(database: ViewDatabase) -> dict[tuple[str, str, str], int] | None:
    """:func:`view_counts`, or ``None`` while the runner has not created its tables yet."""
    try:
        return view_counts(database)
    except BrokerQError:
        return None


def table_counts(database: ViewDatabase) -> dict[str, int]:
    """Rows in the live tables, and the sums the counters hold: each must match the events applied."""
    with database.transaction(write=False) as cursor:
        cursor.execute("SELECT name, generation FROM bq_views")
        generations = dict(cursor.fetchall())
        found = {}
        for base, view in (("tasks", "tasks"), ("audit", "audit")):
            cursor.execute(f"SELECT COUNT(*) FROM {table(base, generations[view])}")
            found[base] = int(cursor.fetchone()[0])
        for base in ("queue_counts", "outcomes", "durations"):
            cursor.execute(f"SELECT COALESCE(SUM(count), 0) FROM {table(base, generations['tasks'])}")
            found[base] = int(cursor.fetchone()[0])
    return found


def expected_table_counts(events: Sequence[Event]) -> dict[str, int]:
    types = Counter(e.TYPE for e in events)
    return {"tasks": types["submitted"], "audit": len(events), "queue_counts": types["submitted"],
            "outcomes": types["succeeded"] + types["dead_lettered"] + types["cancelled"],
            "durations": types["started"] + types["succeeded"] + types["dead_lettered"]}


# -- following the log ----------------------------------------------------------------------------


async def test_catches_up_then_follows_the_log_live(durable_store_url: str, database: ViewDatabase) -> None:
    app = App(store=durable_store_url)
    before = [app.submit("t.add", [n], queue="mail") for n in range(3)]
    runner = ProjectionRunner(app.store, database)
    stop = asyncio.Event()
    # A poll every minute: within the waits below, only the store's change signal can wake the runner.
    following = asyncio.create_task(runner.run(stop, store_url=durable_store_url, poll_interval=60))
    try:
        await wait_for(lambda: following.done() or counts_once_set_up(database) == {("default", "mail", "ready"): 3},
                       what="the catch-up of the tasks submitted before the runner started")
        assert not following.done()
        assert [queries.task(database, str(h.id))["state"] for h in before] == ["ready"] * 3  # type: ignore[index]
        for n in range(1, 4):
            handle = app.submit("t.add", [n], queue="default", tenant="globex")
            await wait_for(lambda h=handle: queries.task(database, str(h.id)) is not None, timeout=15,
                           what=f"live task {n} to show in the view")
            assert view_counts(database)[("globex", "default", "ready")] == n
        head = app.store.max_position()
        await wait_for(lambda: {p.position for p in runner.positions().values()} == {head},
                       what="the audit view to reach the head")
        assert [r["type"] for r in queries.audit(database, AuditQuery())] == ["submitted"] * 6
    finally:
        stop.set()
        await asyncio.wait_for(following, 30)
        app.close()


# -- rebuilding beside the live view --------------------------------------------------------------


def test_queries_keep_answering_with_consistent_totals_during_a_rebuild(
        durable_store_url: str, store: EventStore, database: ViewDatabase, request: pytest.FixtureRequest) -> None:
    generated = generate(2500)
    append_in_groups(store, generated.events)
    runner = ProjectionRunner(store, database)
    runner.setup()
    runner.catch_up()
    # While each rebuild runs, tasks come in (one batch of the live runner): every answer must be the
    # counts of one stage, never a mix, never an error.
    stages = [generated.counts()]
    answered = threading.Condition()
    results: list[dict[tuple[str, str, str], int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def query_in_a_loop() -> None:
        reader = open_view_database(durable_store_url)
        try:
            while not stop.is_set():
                try:
                    counts = view_counts(reader)
                except Exception as e:
                    errors.append(e)
                    counts = {}
                with answered:
                    results.append(counts)
                    answered.notify_all()
        finally:
            reader.close()

    live = ProjectionRunner(store, open_view_database(durable_store_url))
    calls: list[int] = []

    def progress(position: int, head: int) -> None:
        if len(calls) < 3:  # let the queries run between the first batches, however threads are scheduled
            with answered:
                seen = len(results)
                assert answered.wait_for(lambda: len(results) > seen + 1, timeout=10)
        if not calls:  # events that come in during the rebuild must be in the generation it swaps in
            late = generate(60, seed=len(stages))
            append_in_groups(store, late.events)
            assert live.catch_up() == len(late.events)
            stages.append(dict(Counter(stages[-1]) + Counter(late.counts())))
        calls.append(position)

    querying = threading.Thread(target=query_in_a_loop)
    querying.start()
    try:
        for generation in (2, 3, 4):
            calls.clear()
            runner.batch_size = 500
            runner.rebuild("tasks", progress=progress)
            assert runner.positions()["tasks"].generation == generation
            assert len(calls) >= 5
    finally:
        stop.set()
        querying.join(30)
        live.database.close()
    assert errors == []
    assert len(results) > 3 * 6
    assert [r for r in results if r not in stages] == []
    assert view_counts(database) == stages[-1]
    assert table_counts(database) == expected_table_counts([r.event for r in store.read_log(0, 10**6)])


# -- resuming ---------------------------------------------------------------------------------------


def test_a_new_runner_resumes_and_applies_nothing_twice(durable_store_url: str, store: EventStore,
                                                        database: ViewDatabase) -> None:
    generated = generate(1000)
    positions = append_in_groups(store, generated.events, size=250)
    first = ProjectionRunner(store, database, batch_size=150)
    first.setup()
    for _ in range(3):
        first.step()
    assert {p.position for p in first.positions().values()} == {positions[449]}
    database.close()

    second = ProjectionRunner(store, open_view_database(durable_store_url), batch_size=400)
    second.setup()
    assert second.catch_up() == len(positions) - 450
    assert second.catch_up() == 0
    assert view_counts(second.database) == generated.counts()
    assert table_counts(second.database) == expected_table_counts(generated.events)
    second.database.close()


class FailingTasksView(TasksView):
    """Writes a batch's rows, then fails before the batch commits: the crash inside a transaction."""

    fail_on_call = 2

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, cursor: Cursor, generation: int, batch: Sequence[Recorded]) -> None:
        self.calls += 1
        super().apply(cursor, generation, batch)
        if self.calls == self.fail_on_call:
            raise RuntimeError("crashed half-way through a batch")


def test_a_batch_that_fails_half_way_leaves_nothing_behind(durable_store_url: str, store: EventStore,
                                                           database: ViewDatabase) -> None:
    generated = generate(600)
    positions = append_in_groups(store, generated.events)
    failing = ProjectionRunner(store, database, [VIEWS["audit"], FailingTasksView()], batch_size=200)
    failing.setup()
    assert failing.step() == 200
    with pytest.raises(RuntimeError, match="half-way"):
        failing.step()
    assert {p.position for p in failing.positions().values()} == {positions[199]}
    assert table_counts(database) == expected_table_counts(generated.events[:200])

    restarted = ProjectionRunner(store, open_view_database(durable_store_url), batch_size=200)
    assert restarted.catch_up() == len(positions) - 200
    assert view_counts(restarted.database) == generated.counts()
    assert table_counts(restarted.database) == expected_table_counts(generated.events)
    restarted.database.close()


# -- SIGKILL in the middle of the catch-up ------------------------------------------------------------

BATCH = 10_000
"""The batch size of ``broker-q projections run`` (the runner's default)."""


def positions_or_none(runner: ProjectionRunner) -> dict[str, int] | None:
    try:
        return {name: p.position for name, p in runner.positions().items()}
    except Exception:  # the process has not created its tables yet
        return None


def projections_process(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "broker_q.cli", "--store", url, "projections", "run"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_a_projection_process_killed_mid_batch_restarts_with_exact_counts(
        durable_store_url: str, store: EventStore, database: ViewDatabase, tmp_path: Path) -> None:
    generated = generate(60_000)
    positions = append_in_groups(store, generated.events)
    head = positions[-1]
    assert ProjectionRunner(store, database).batch_size == BATCH
    boundaries = set(positions[BATCH - 1::BATCH])
    observer = ProjectionRunner(store, database)
    log = tmp_path / "projections.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(projections_process(durable_store_url, log))

        def partway() -> bool:
            found = positions_or_none(observer)
            return bool(found) and 0 < found["tasks"] < head  # type: ignore[index]

        await wait_for(lambda: partway() or processes[0].poll() is not None, timeout=60,
                       what="the catch-up to be part-way")
        processes[0].send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(processes[0].wait, 10) == -signal.SIGKILL, log.read_text()

        at = positions_or_none(observer)
        assert at is not None
        assert at["tasks"] == at["audit"]
        assert at["tasks"] in boundaries
        assert at["tasks"] < head, "the process was killed after it had finished: nothing was proved"
        applied = [e for p, e in zip(positions, generated.events, strict=True) if p <= at["tasks"]]
        assert table_counts(database) == expected_table_counts(applied)
        seen = [e.stream_id for e in applied if e.TYPE == "submitted"]
        prefix_states = reference_states(applied)
        assert view_counts(database) == dict(Counter(
            (generated.final[t][0], generated.final[t][1], prefix_states[t]) for t in seen))

        processes.append(projections_process(durable_store_url, log))
        await wait_for(lambda: positions_or_none(observer) == {"audit": head, "tasks": head}, timeout=60,
                       what="the restarted process to reach the head")
        assert view_counts(database) == generated.counts()
        assert table_counts(database) == expected_table_counts(generated.events)
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(processes[1].wait, 30) == 0, log.read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def reference_states(events: Sequence[Event]) -> dict[uuid.UUID, str]:
    """Each task's state after ``events``: the type of its last event, in the view's words."""
    states: dict[uuid.UUID, str] = {}
    for event in events:
        if isinstance(event, TaskEvent):
            states[event.stream_id] = "ready" if event.TYPE == "submitted" else event.TYPE
    return states
