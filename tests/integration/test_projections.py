"""The projection runner on the durable stores: an SQLite file (each view in a file of its own beside
it, and a runner each) and a PostgreSQL schema (the views in the same schema, one runner), through
``durable_store_url``.

What the issue promises, each proved here: catch-up then live follow woken by the store's change
signal; queries that keep answering, with consistent totals, while a rebuild runs beside the live
view; a restart (new runner, new connection) that resumes without applying anything twice, also
after a batch that failed half-way; and projection processes killed with SIGKILL in the middle of
their catch-up, whose views after a restart hold exact counts.
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
from projections.database import Cursor, ViewDatabases, open_view_databases
from projections.queries import AuditQuery
from projections.runner import ProjectionRunner, runners
from projections.views import VIEWS, TasksView, table
from tests.helpers import alive, child_pids, wait_for

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
def databases(durable_store_url: str) -> Iterator[ViewDatabases]:
    opened = open_view_databases(durable_store_url, VIEWS)
    yield opened
    opened.close()


def positions_of(found: Sequence[ProjectionRunner]) -> dict[str, int]:
    """The position of every view of ``found`` runners."""
    return {name: p.position for runner in found for name, p in runner.positions().items()}


def view_counts(databases: ViewDatabases) -> dict[tuple[str, str, str], int]:
    """The non-zero task counts of the live tasks view, per tenant, queue and state."""
    return {(s.tenant, s.queue, state): n for s in queries.queues(databases) for state, n in s.counts.items()}


def counts_once_set_up(databases: ViewDatabases) -> dict[tuple[str, str, str], int] | None:
    """:func:`view_counts`, or ``None`` while the runner has not created its tables yet."""
    try:
        return view_counts(databases)
    except BrokerQError:
        return None


def table_counts(databases: ViewDatabases, views: Sequence[str] = tuple(VIEWS)) -> dict[str, int]:
    """Rows in the live tables of ``views``, and the sums the counters hold: each must match the events applied."""
    found = {}
    for view in views:
        with databases.of(view).transaction(write=False) as cursor:
            cursor.execute("SELECT generation FROM bq_views WHERE name = ?", (view,))
            generation = cursor.fetchone()[0]
            for base in VIEWS[view].tables:
                aggregate = "COUNT(*)" if base in ("tasks", "audit") else "COALESCE(SUM(count), 0)"
                cursor.execute(f"SELECT {aggregate} FROM {table(base, generation)}")
                found[base] = int(cursor.fetchone()[0])
    return found


def expected_table_counts(events: Sequence[Event], views: Sequence[str] = tuple(VIEWS)) -> dict[str, int]:
    types = Counter(e.TYPE for e in events)
    expected = {"tasks": types["submitted"], "audit": len(events), "queue_counts": types["submitted"],
                "outcomes": types["succeeded"] + types["dead_lettered"] + types["cancelled"],
                "durations": types["started"] + types["succeeded"] + types["dead_lettered"]}
    return {base: expected[base] for view in views for base in VIEWS[view].tables}


# -- following the log ----------------------------------------------------------------------------


async def test_catches_up_then_follows_the_log_live(durable_store_url: str, databases: ViewDatabases) -> None:
    app = App(store=durable_store_url)
    before = [app.submit("t.add", [n], queue="mail") for n in range(3)]
    following = runners(app.store, databases)
    assert len(following) == (2 if durable_store_url.startswith("sqlite") else 1)
    stop = asyncio.Event()
    # A poll every minute: within the waits below, only the store's change signal can wake the runners.
    running = [asyncio.create_task(r.run(stop, store_url=durable_store_url, poll_interval=60)) for r in following]
    try:
        await wait_for(lambda: any(t.done() for t in running)
                       or counts_once_set_up(databases) == {("default", "mail", "ready"): 3},
                       what="the catch-up of the tasks submitted before the runners started")
        assert not any(t.done() for t in running)
        assert [queries.task(databases, str(h.id))["state"] for h in before] == ["ready"] * 3  # type: ignore[index]
        for n in range(1, 4):
            handle = app.submit("t.add", [n], queue="default", tenant="globex")
            await wait_for(lambda h=handle: queries.task(databases, str(h.id)) is not None, timeout=15,
                           what=f"live task {n} to show in the view")
            assert view_counts(databases)[("globex", "default", "ready")] == n
        head = app.store.max_position()
        await wait_for(lambda: positions_of(following) == {"audit": head, "tasks": head},
                       what="the audit view to reach the head")
        assert [r["type"] for r in queries.audit(databases, AuditQuery())] == ["submitted"] * 6
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 30)
        app.close()


# -- rebuilding beside the live view --------------------------------------------------------------


def test_queries_keep_answering_with_consistent_totals_during_a_rebuild(
        durable_store_url: str, store: EventStore, databases: ViewDatabases) -> None:
    generated = generate(2500)
    append_in_groups(store, generated.events)
    for each in runners(store, databases):
        each.setup()
        each.catch_up()
    runner = ProjectionRunner(store, databases.of("tasks"))
    # While each rebuild runs, tasks come in (one batch of the live runners): every answer must be the
    # counts of one stage, never a mix, never an error.
    stages = [generated.counts()]
    answered = threading.Condition()
    results: list[dict[tuple[str, str, str], int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def query_in_a_loop() -> None:
        reader = open_view_databases(durable_store_url, VIEWS)
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

    live_databases = open_view_databases(durable_store_url, VIEWS)
    live = runners(store, live_databases)
    calls: list[int] = []

    def progress(position: int, head: int) -> None:
        if len(calls) < 3:  # let the queries run between the first batches, however threads are scheduled
            with answered:
                seen = len(results)
                assert answered.wait_for(lambda: len(results) > seen + 1, timeout=10)
        if not calls:  # events that come in during the rebuild must be in the generation it swaps in
            late = generate(60, seed=len(stages))
            append_in_groups(store, late.events)
            assert [r.catch_up() for r in live] == [len(late.events)] * len(live)
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
        live_databases.close()
    assert errors == []
    assert len(results) > 3 * 6
    assert [r for r in results if r not in stages] == []
    assert view_counts(databases) == stages[-1]
    assert table_counts(databases) == expected_table_counts([r.event for r in store.read_log(0, 10**6)])


# -- resuming ---------------------------------------------------------------------------------------


def test_a_new_runner_resumes_and_applies_nothing_twice(durable_store_url: str, store: EventStore,
                                                        databases: ViewDatabases) -> None:
    generated = generate(1000)
    positions = append_in_groups(store, generated.events, size=250)
    first = runners(store, databases, batch_size=150)
    for runner in first:
        runner.setup()
        for _ in range(3):
            runner.step()
    assert set(positions_of(first).values()) == {positions[449]}
    databases.close()

    second = runners(store, open_view_databases(durable_store_url, VIEWS), batch_size=400)
    for runner in second:
        runner.setup()
        assert runner.catch_up() == len(positions) - 450
        assert runner.catch_up() == 0
    assert view_counts(databases) == generated.counts()
    assert table_counts(databases) == expected_table_counts(generated.events)
    for runner in second:
        runner.database.close()


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
                                                           databases: ViewDatabases) -> None:
    generated = generate(600)
    positions = append_in_groups(store, generated.events)
    database = databases.of("tasks")  # with the audit view too on PostgreSQL: one transaction for both
    applied = [FailingTasksView() if name == "tasks" else VIEWS[name] for name in database.views]
    failing = ProjectionRunner(store, database, applied, batch_size=200)
    failing.setup()
    assert failing.step() == 200
    with pytest.raises(RuntimeError, match="half-way"):
        failing.step()
    assert set(positions_of([failing]).values()) == {positions[199]}
    assert table_counts(databases, database.views) == expected_table_counts(generated.events[:200], database.views)

    restarted = runners(store, open_view_databases(durable_store_url, VIEWS), batch_size=200)
    for runner in restarted:
        runner.setup()
        resumed = "tasks" in runner.database.views  # the audit view on SQLite had never been applied
        assert runner.catch_up() == len(positions) - (200 if resumed else 0)
    assert set(positions_of(restarted).values()) == {positions[-1]}
    assert view_counts(databases) == generated.counts()
    assert table_counts(databases) == expected_table_counts(generated.events)
    for runner in restarted:
        runner.database.close()


# -- SIGKILL in the middle of the catch-up ------------------------------------------------------------

BATCH = 10_000
"""The batch size of ``broker-q projections run`` (the runners' default)."""


def positions_or_none(observers: Sequence[ProjectionRunner]) -> dict[str, int] | None:
    try:
        return positions_of(observers)
    except Exception:  # the process has not created its tables yet
        return None


def projections_process(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "broker_q.cli", "--store", url, "projections", "run"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def kill_with_its_runners(process: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL ``process`` and the runner processes it supervises (on SQLite); return their pids.

    It is stopped first, so that it cannot start a killed runner again before it is killed itself.
    """
    process.send_signal(signal.SIGSTOP)
    children = child_pids(process.pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    return children


async def test_projection_processes_killed_mid_batch_restart_with_exact_counts(
        durable_store_url: str, store: EventStore, databases: ViewDatabases, tmp_path: Path) -> None:
    generated = generate(60_000)
    positions = append_in_groups(store, generated.events)
    head = positions[-1]
    observers = runners(store, databases)
    assert {r.batch_size for r in observers} == {BATCH}
    boundaries = set(positions[BATCH - 1::BATCH])
    log = tmp_path / "projections.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(projections_process(durable_store_url, log))

        def partway() -> bool:
            found = positions_or_none(observers)
            return found is not None and set(found) == set(VIEWS) and all(0 < p < head for p in found.values())

        await wait_for(lambda: partway() or processes[0].poll() is not None, timeout=60,
                       what="the catch-up of every view to be part-way")
        children = kill_with_its_runners(processes[0])
        assert len(children) == (len(VIEWS) if durable_store_url.startswith("sqlite") else 0), log.read_text()
        assert await asyncio.to_thread(processes[0].wait, 10) == -signal.SIGKILL, log.read_text()
        await wait_for(lambda: not any(map(alive, children)), what="the killed runner processes to be gone")

        at = positions_or_none(observers)
        assert at is not None
        for view, position in at.items():
            assert position in boundaries
            assert position < head, f"the {view} runner was killed after it had finished: nothing was proved"
            applied = [e for p, e in zip(positions, generated.events, strict=True) if p <= position]
            assert table_counts(databases, [view]) == expected_table_counts(applied, [view])
        applied = [e for p, e in zip(positions, generated.events, strict=True) if p <= at["tasks"]]
        seen = [e.stream_id for e in applied if e.TYPE == "submitted"]
        prefix_states = reference_states(applied)
        assert view_counts(databases) == dict(Counter(
            (generated.final[t][0], generated.final[t][1], prefix_states[t]) for t in seen))

        processes.append(projections_process(durable_store_url, log))
        await wait_for(lambda: positions_or_none(observers) == {"audit": head, "tasks": head}, timeout=60,
                       what="the restarted processes to reach the head")
        assert view_counts(databases) == generated.counts()
        assert table_counts(databases) == expected_table_counts(generated.events)
        children = child_pids(processes[1].pid)
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(processes[1].wait, 30) == 0, log.read_text()
        assert not any(map(alive, children)), "a runner process outlived the projections process"
    finally:
        for process in processes:
            if process.poll() is None:
                kill_with_its_runners(process)
                process.wait(10)


def reference_states(events: Sequence[Event]) -> dict[uuid.UUID, str]:
    """Each task's state after ``events``: the type of its last event, in the view's words."""
    states: dict[uuid.UUID, str] = {}
    for event in events:
        if isinstance(event, TaskEvent):
            states[event.stream_id] = "ready" if event.TYPE == "submitted" else event.TYPE
    return states
