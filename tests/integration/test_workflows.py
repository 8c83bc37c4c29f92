"""Workflows end to end: chains, groups, chords and DAGs through the relay's coordinator and real workers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker_q import App, TaskCancelled, TaskFailed, TaskStatus, chord, dag, group
from broker_q.app import utcnow
from broker_q.coordinator import Coordinator
from broker_q.domain import task as task_domain
from broker_q.domain.events import TaskReleased, TaskStarted
from broker_q.domain.workflow import WorkflowOutcome
from broker_q.errors import DomainError
from broker_q.store import open_store
from tests.helpers import running, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _types(app: App, task_id: Any) -> list[str]:
    return [e.TYPE for e in app.history(task_id)]


def _math(app: App) -> None:
    @app.task(name="add")
    async def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="total")
    async def total(values: list[int]) -> int:
        return sum(values)


async def test_a_chain_passes_each_result_to_the_next(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    _math(app)
    add, mul = app.tasks["add"], app.tasks["mul"]
    async with running(app):
        handle = await (add.s(1, 2) | add.s(y=10) | mul.s(3)).submit()
        assert await handle.result(timeout=30) == 39
    last = handle.step("mul").id
    assert _types(app, last) == ["submitted", "released", "started", "succeeded"]
    released = app.history(last)[1]
    assert isinstance(released, TaskReleased)
    assert released.args is None
    assert released.sealed_arguments is not None
    assert app.payloads.open_arguments(released.tenant, last, released.sealed_arguments) == ([13, 3], {})  # the
    # result before it, then its own arguments
    assert app.workflow(handle.id).state is WorkflowOutcome.SUCCEEDED


async def test_a_group_s_results_come_in_member_order_whatever_order_they_finish_in(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    finished: list[int] = []
    turn = [asyncio.Event() for _ in range(6)]

    @app.task(name="member")
    async def member(i: int) -> str:
        await turn[i].wait()  # the last member finishes first
        finished.append(i)
        if i > 0:
            turn[i - 1].set()
        return f"m{i}"

    async with running(app):
        handle = await group(member.s(i) for i in range(6)).submit()
        await wait_for(lambda: sum(app.get_task(s.task_id).status is TaskStatus.STARTED
                                   for s in handle.state().steps) == 6, timeout=20, what="every member started")
        turn[5].set()
        assert await handle.result(timeout=30) == [f"m{i}" for i in range(6)]
    assert finished == [5, 4, 3, 2, 1, 0]


async def test_a_chord_callback_runs_once_when_its_members_finish_together_on_two_workers(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """Two workers and two relays (one holds the lease and coordinates): members finish at the same
    moment on both workers; the coordinator releases the callback once, and it runs once."""
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    members = 8
    running_now: list[int] = []
    together = asyncio.Event()
    calls: list[list[int]] = []

    @app.task(name="member")
    async def member(i: int) -> int:
        running_now.append(i)
        if len(running_now) == members:
            together.set()
        await together.wait()  # every member of this chord returns in the same instant
        return i * i

    @app.task(name="callback")
    async def callback(results: list[int]) -> int:
        calls.append(results)
        return sum(results)

    async with running(app, concurrency=members // 2) as first, running(app, concurrency=members // 2) as second:
        for _ in range(3):
            running_now.clear()
            together.clear()
            calls.clear()
            handle = await chord(group(member.s(i) for i in range(members)), callback.s()).submit()
            assert await handle.result(timeout=30) == sum(i * i for i in range(members))
            assert calls == [[i * i for i in range(members)]]
            state = handle.state()
            workers = {e.worker for s in state.steps[:-1] for e in app.history(s.task_id)
                       if isinstance(e, TaskStarted)}
            assert workers == {first.id, second.id}
            assert _types(app, state.steps[-1].task_id) == ["submitted", "released", "started", "succeeded"]


def test_two_coordinators_reading_the_same_successes_at_once_release_the_callback_once(durable_store_url: str) -> None:
    """Even with two coordinators at work (the relay's lease allows one; here it is bypassed), each on its
    own connection, reading the same page of member successes at the same moment: the store's unique
    (stream, version) lets one ``released`` of the callback in, so its one attempt runs once."""
    app = App(store=durable_store_url)
    _math(app)
    members = 200
    handle = (group(app.tasks["add"].s(i) for i in range(members)) | app.tasks["total"].s()).delay()
    steps = handle.state().steps
    stores = [open_store(durable_store_url, master_key=app.master_key()) for _ in range(2)]
    coordinators = [Coordinator(store) for store in stores]
    try:
        for coordinator in coordinators:  # both have stored the edges of the callback
            coordinator.process(app.store.read_log(0, members + 2))
        after = app.store.max_position()
        for step in steps[:-1]:  # every member succeeds, as workers would record it
            state = app.get_task(step.task_id)
            started = task_domain.start(state, worker="worker:test", now=utcnow())
            app.store.append([started, task_domain.succeed(task_domain.evolve(state, started),
                                                           result=app.payloads.arguments(state)[0][0], now=utcnow())])
        page = app.store.read_log(after, 10 * members)
        barrier = threading.Barrier(2)

        def coordinate(coordinator: Coordinator) -> None:
            barrier.wait()
            coordinator.process(page)

        threads = [threading.Thread(target=coordinate, args=(c,)) for c in coordinators]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(c.released for c in coordinators) == 1
        assert _types(app, steps[-1].task_id) == ["submitted", "released"]
        released = app.history(steps[-1].task_id)[1]
        assert isinstance(released, TaskReleased)
        assert released.sealed_arguments is not None
        assert app.payloads.open_arguments(released.tenant, released.stream_id, released.sealed_arguments) == (
            [list(range(members))], {})
    finally:
        for store in stores:
            store.close()
        app.close()


async def test_a_chord_of_a_thousand_members_runs_its_callback_once(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    members = 1000
    calls: list[int] = []

    @app.task(name="square")
    async def square(i: int) -> int:
        return i * i

    @app.task(name="collect")
    async def collect(results: list[int]) -> int:
        calls.append(len(results))
        assert results == [i * i for i in range(members)]
        return sum(results)

    async with running(app):
        began = time.perf_counter()
        handle = await (group(square.s(i) for i in range(members)) | collect.s()).submit()
        submitted = time.perf_counter() - began
        assert app.store.max_position() == members + 2  # one append: the workflow, every member, the callback
        assert await handle.result(timeout=100) == sum(i * i for i in range(members))
        took = time.perf_counter() - began
    assert calls == [members]
    callback = handle.step("collect").id
    assert _types(app, callback) == ["submitted", "released", "started", "succeeded"]
    with capsys.disabled():
        print(f"\n1,000-member chord on {durable_store_url.split(':')[0]}: submitted in {submitted:.2f}s, "
              f"callback done after {took:.2f}s")
    assert took < 60


async def test_a_chain_of_groups_gives_each_member_the_result_before_and_the_next_step_their_list(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    _math(app)
    add, mul, total = app.tasks["add"], app.tasks["mul"], app.tasks["total"]
    async with running(app):
        handle = await (add.s(2, 3) | group(add.s(1), mul.s(10), add.s(y=100)) | total.s()).submit()
        assert await handle.result(timeout=30) == (5 + 1) + (5 * 10) + (5 + 100)
        members = await (add.s(1, 1) | group(add.s(1), mul.s(3))).submit()
        assert await members.result(timeout=30) == [3, 6]  # a final group: the list of its results


async def test_a_diamond_dag_runs_each_step_after_its_parents_and_shows_its_critical_path(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    order: list[str] = []

    @app.task(name="etl.extract")
    async def extract(source: str) -> list[int]:
        order.append("extract")
        return [3, 1, 2]

    @app.task(name="etl.clean")
    async def clean(inputs: list[list[int]]) -> list[int]:
        order.append("clean")
        return sorted(inputs[0])

    @app.task(name="etl.enrich")
    async def enrich(inputs: list[list[int]]) -> list[int]:
        await asyncio.sleep(0.3)  # the long branch
        order.append("enrich")
        return [x * 10 for x in inputs[0]]

    @app.task(name="etl.load")
    async def load(inputs: list[list[int]]) -> dict[str, list[int]]:
        order.append("load")
        return {"clean": inputs[0], "enriched": inputs[1], "raw": inputs[2]}

    workflow = dag({
        "extract": extract.s("db"),
        "clean": (clean.s(), ["extract"]),
        "enrich": (enrich.s(), ["extract"]),
        "load": (load.s(), ["clean", "enrich", "extract"]),
    })
    async with running(app):
        handle = await workflow.submit()
        assert await handle.result(timeout=30) == {"clean": [1, 2, 3], "enriched": [30, 10, 20], "raw": [3, 1, 2]}
    assert order[0] == "extract"
    assert order[-1] == "load"
    status = app.workflow(handle.id)
    assert (status.state, status.finished) == (WorkflowOutcome.SUCCEEDED, True)
    assert status.critical_path == ("extract", "enrich", "load")
    assert status.critical_path_seconds >= 0.3
    assert {s.name: s.parents for s in status.steps}["load"] == ("clean", "enrich", "extract")


async def test_a_cyclic_dag_is_refused_before_anything_is_stored(sqlite_url: str) -> None:
    app = App(store=sqlite_url)
    _math(app)
    add = app.tasks["add"]
    with pytest.raises(DomainError, match=r"cycle: 'a' -> 'b' -> 'c' -> 'a'"):
        dag({"a": (add.s(1), ["c"]), "b": (add.s(), ["a"]), "c": (add.s(), ["b"])})
    assert app.store.max_position() == 0


async def test_cancelling_a_workflow_cancels_its_unfinished_steps_and_stops_the_running_one(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    _math(app)
    stopped = asyncio.Event()

    @app.task(name="forever")
    async def forever(x: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise
        return x

    add, total = app.tasks["add"], app.tasks["total"]
    async with running(app):
        handle = await (add.s(1) | group(forever.s(), add.s(2)) | total.s()).submit()
        running_step = handle.step("forever").id
        await wait_for(lambda: app.get_task(running_step).status is TaskStatus.STARTED, timeout=20)
        await wait_for(lambda: app.get_task(handle.step("add#2").id).is_final, timeout=20)
        status = await asyncio.to_thread(app.cancel_workflow, handle.id, reason="not needed")
        await asyncio.wait_for(stopped.wait(), 20)  # the running handler was asked to stop
        with pytest.raises(TaskCancelled, match="workflow cancelled: not needed"):
            await handle.result(timeout=20)
    by_name = {s.name: s for s in status.steps}
    assert status.state is WorkflowOutcome.CANCELLED
    assert (by_name["add#1"].state, by_name["add#2"].state) == (TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED)
    assert (by_name["forever"].state, by_name["total"].state) == (TaskStatus.CANCELLED, TaskStatus.CANCELLED)
    assert by_name["total"].cancel_reason == "workflow cancelled: not needed"
    assert _types(app, running_step) == ["submitted", "released", "started", "cancelled"]


async def test_a_failing_step_cancels_what_is_downstream_and_the_status_shows_it(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    _math(app)
    calls: list[str] = []

    @app.task(name="breaks")
    async def breaks(x: int) -> int:
        raise ValueError(f"cannot take {x}")

    @app.task(name="after")
    async def after(x: Any) -> None:
        calls.append("after")

    add = app.tasks["add"]
    async with running(app):
        handle = await (add.s(1, 1) | group(breaks.s(), add.s(5)) | after.s() | after.s()).submit()
        with pytest.raises(TaskFailed, match="ValueError: cannot take 2") as failed:
            await handle.result(timeout=30)
        await wait_for(lambda: app.workflow(handle.id).finished, timeout=20, what="every step to be final")
    assert failed.value.task_id == str(handle.step("breaks").id)
    status = app.workflow(handle.id)
    by_name = {s.name: s for s in status.steps}
    assert status.state is WorkflowOutcome.FAILED
    assert by_name["breaks"].state is TaskStatus.DEAD_LETTERED
    assert by_name["breaks"].error == "ValueError: cannot take 2"
    assert by_name["add#2"].state is TaskStatus.SUCCEEDED
    assert by_name["after#1"].state is TaskStatus.CANCELLED
    assert by_name["after#1"].cancel_reason == f"upstream_failed: parent {handle.step('breaks').id} was dead_lettered"
    assert by_name["after#2"].cancel_reason == f"upstream_failed: parent {handle.step('after#1').id} was cancelled"
    assert calls == []


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


async def test_the_workflow_command_prints_the_status_and_cancels(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    _math(app)
    add, total = app.tasks["add"], app.tasks["total"]
    async with running(app):
        done = await (group(add.s(1), add.s(2)) | total.s()).submit()
        assert await done.result(timeout=30) == 3
    waiting = await (add.s(1) | total.si([1, 2])).submit()  # no worker runs now: it waits

    table = (await asyncio.to_thread(cli, sqlite_url, "workflow", str(done.id))).stdout.splitlines()
    assert table[0].startswith(f"workflow {done.id}  succeeded  tenant default")
    assert table[1].startswith("critical path: add#")
    assert " -> total  (" in table[1]
    assert table[2].split() == ["STEP", "STATE", "TASK", "ATTEMPTS", "ELAPSED", "WAITING", "FOR", "/", "WHY"]
    assert [row.split()[:4] for row in table[3:]] == [["add#1", "succeeded", "add", "1"],
                                                      ["add#2", "succeeded", "add", "1"],
                                                      ["total", "succeeded", "total", "1"]]

    shown = await asyncio.to_thread(cli, sqlite_url, "workflow", str(waiting.id), "--format", "json")
    assert (shown.returncode, shown.stderr) == (0, "")
    document = json.loads(shown.stdout)
    assert (document["id"], document["state"], document["finished"]) == (str(waiting.id), "running", False)
    assert [(s["name"], s["state"], s["waiting_for"]) for s in document["steps"]] == [
        ("add", "ready", []), ("total", "blocked", ["add"])]
    assert document["critical_path"]["steps"] == ["add", "total"]

    cancelled = await asyncio.to_thread(cli, sqlite_url, "workflow", "cancel", str(waiting.id), "--reason", "typo")
    assert (cancelled.returncode, cancelled.stderr) == (0, "")
    assert "cancelled: typo" in cancelled.stdout.splitlines()[2]
    assert {s.state for s in app.workflow(waiting.id).steps} == {TaskStatus.CANCELLED}
    assert app.history(waiting.id)[-1].actor.startswith("operator:")

    again = await asyncio.to_thread(cli, sqlite_url, "workflow", "cancel", str(done.id))
    assert again.returncode == 1
    assert again.stderr == f"error: workflow {done.id} is finished: no step is left to cancel\n"
    unknown = await asyncio.to_thread(cli, sqlite_url, "workflow", "5c0f2a9e-1d3b-4e6f-8a7c-9b0d1e2f3a4b")
    assert (unknown.returncode, unknown.stderr) == (1, "error: no workflow with id "
                                                       "5c0f2a9e-1d3b-4e6f-8a7c-9b0d1e2f3a4b\n")
