"""Delayed tasks and dependencies, through the relay (scheduler and coordinator) and real workers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker_q import App, TaskCancelled, TaskStatus
from broker_q.domain.events import TaskReleased, TaskStarted, TaskSubmitted
from broker_q.errors import DomainError, ValidationError
from tests.helpers import running, wait_for


def _types(app: App, task_id: Any) -> list[str]:
    return [e.TYPE for e in app.history(task_id)]


async def test_a_task_with_a_countdown_is_blocked_until_due_then_runs(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    ran_at: list[datetime] = []

    @app.task(name="later")
    async def later() -> str:
        ran_at.append(datetime.now(UTC))
        return "on time"

    async with running(app):
        handle = await app.submit_async("later", countdown=1.0)
        submitted = app.history(handle.id)[0]
        assert isinstance(submitted, TaskSubmitted)
        assert submitted.due_at is not None
        assert app.get_task(handle.id).status is TaskStatus.BLOCKED
        await wait_for(lambda: app.store.timers.count() == 1, timeout=10)  # waits on disk, not in a worker
        assert await handle.result(timeout=20) == "on time"
    started = next(e for e in app.history(handle.id) if isinstance(e, TaskStarted))
    assert started.timestamp >= submitted.due_at
    assert ran_at[0] >= submitted.due_at
    assert _types(app, handle.id) == ["submitted", "started", "succeeded"]
    assert app.store.timers.count() == 0


async def test_a_delayed_task_survives_a_restart_of_the_relay_and_the_worker(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    def make_app() -> App:
        app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)

        @app.task(name="later")
        async def later() -> str:
            return "ran after the restart"

        return app

    first = make_app()
    async with running(first):
        handle = await first.submit_async("later", countdown=2.0)
        await wait_for(lambda: first.store.timers.count() == 1, timeout=10)
        assert first.get_task(handle.id).status is TaskStatus.BLOCKED
    first.close()  # every process of the first life is gone: only the store remembers the task
    second = make_app()
    try:
        assert second.get_task(handle.id).status is TaskStatus.BLOCKED
        async with running(second):
            assert await second.handle(handle.id).result(timeout=20) == "ran after the restart"
        assert _types(second, handle.id) == ["submitted", "started", "succeeded"]
    finally:
        second.close()


async def test_an_eta_in_the_past_runs_at_once_and_a_naive_eta_is_refused(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="now")
    async def now() -> int:
        return 1

    with pytest.raises(ValidationError, match="aware"):
        app.submit("now", eta=datetime(2030, 1, 1))
    with pytest.raises(ValidationError, match="not both"):
        app.submit("now", eta=datetime.now(UTC), countdown=3)
    async with running(app):
        handle = await app.submit_async("now", eta=datetime.now(UTC) - timedelta(hours=1))
        assert app.get_task(handle.id).status is TaskStatus.READY
        assert await handle.result(timeout=20) == 1


async def test_a_cancelled_delayed_task_never_runs(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    calls: list[int] = []

    @app.task(name="doomed")
    async def doomed() -> None:
        calls.append(1)

    @app.task(name="marker")
    async def marker() -> str:
        return "done"

    async with running(app):
        handle = await app.submit_async("doomed", countdown=0.5)
        app.cancel(handle.id, reason="changed my mind")
        after = await app.submit_async("marker", countdown=1.0)  # due after the cancelled one
        assert await after.result(timeout=20) == "done"
        await wait_for(lambda: app.store.timers.count() == 0, timeout=10)
    assert calls == []
    assert _types(app, handle.id) == ["submitted", "cancelled"]


async def test_dependants_wait_for_every_parent_and_receive_results(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    order: list[str] = []
    gate = asyncio.Event()

    @app.task(name="parent")
    async def parent(name: str) -> str:
        if name == "slow":
            await gate.wait()
        order.append(name)
        return name.upper()

    @app.task(name="child")
    async def child(*args: Any) -> list[Any]:
        order.append("child")
        return list(args)

    async with running(app):
        fast = await app.submit_async("parent", ["fast"])
        slow = await app.submit_async("parent", ["slow"])
        plain = await app.submit_async("child", ["mine"], depends_on=[fast, slow])
        assert app.get_task(plain.id).status is TaskStatus.BLOCKED
        assert await fast.result(timeout=20) == "FAST"
        await asyncio.sleep(0)  # the gate keeps 'slow' running: the child must still be blocked
        assert app.get_task(plain.id).status is TaskStatus.BLOCKED
        gate.set()
        assert await plain.result(timeout=20) == ["mine"]
    assert order == ["fast", "slow", "child"]
    assert _types(app, plain.id) == ["submitted", "released", "started", "succeeded"]
    released = app.history(plain.id)[1]
    assert isinstance(released, TaskReleased)
    assert released.actor == "coordinator"
    assert released.args is None


async def test_a_parent_that_succeeded_before_its_child_was_submitted_releases_it_at_once(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="one")
    async def one() -> int:
        return 1

    async with running(app):
        first = await app.submit_async("one")
        assert await first.result(timeout=20) == 1
        second = await app.submit_async("one", depends_on=[first])
        assert await second.result(timeout=20) == 1
    assert _types(app, second.id) == ["submitted", "released", "started", "succeeded"]


async def test_a_failed_parent_cancels_its_dependants_transitively(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    calls: list[str] = []

    @app.task(name="breaks")
    async def breaks() -> None:
        raise ValueError("bad input")

    @app.task(name="after")
    async def after(name: str) -> None:
        calls.append(name)

    async with running(app):
        broken = await app.submit_async("breaks")
        child = await app.submit_async("after", ["child"], depends_on=[broken])
        grandchild = await app.submit_async("after", ["grandchild"], depends_on=[child])
        with pytest.raises(TaskCancelled, match="upstream_failed"):
            await grandchild.result(timeout=20)
        with pytest.raises(TaskCancelled, match="upstream_failed"):
            await child.result(timeout=5)
        # a child submitted after its parent failed is cancelled at once
        late = await app.submit_async("after", ["late"], depends_on=[broken])
        with pytest.raises(TaskCancelled, match=f"parent {broken.id} was dead_lettered"):
            await late.result(timeout=20)
    assert calls == []
    assert app.get_task(grandchild.id).cancel_reason == f"upstream_failed: parent {child.id} was cancelled"


async def test_unknown_parents_and_self_dependencies_are_refused(sqlite_url: str) -> None:
    app = App(store=sqlite_url)

    @app.task(name="t")
    async def t() -> None: ...

    with pytest.raises(ValidationError, match="no task with id"):
        app.submit("t", depends_on=["5c0f2a9e-1d3b-4e6f-8a7c-9b0d1e2f3a4b"])
    with pytest.raises(DomainError, match="cycle"):
        app.submit("t", idempotency_key="me", depends_on=[_id_of(app, "me")])
    other = app.submit("t", tenant="other")
    # Refused in the words of a missing task: a submitter learns nothing of another tenant's tasks.
    with pytest.raises(ValidationError, match=f"no task with id {other.id} in tenant default"):
        app.submit("t", depends_on=[other])


def _id_of(app: App, key: str) -> Any:
    from broker_q.domain.task import task_id_for

    return task_id_for(app.settings.tenant, key)


def test_the_command_line_submits_with_a_countdown_an_eta_and_parents(sqlite_url: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", sqlite_url, "submit", *args],
                              cwd=root, capture_output=True, text=True, timeout=60)

    parent = cli("t.any", "--countdown", "30")
    assert parent.returncode == 0, parent.stderr
    parent_id = parent.stdout.strip()
    child = cli("t.any", "--eta", "2099-01-01T00:00:00+01:00", "--depends-on", parent_id)
    assert child.returncode == 0, child.stderr
    app = App(store=sqlite_url)
    first = app.history(parent_id)[0]
    second = app.history(child.stdout.strip())[0]
    assert isinstance(first, TaskSubmitted)
    assert isinstance(second, TaskSubmitted)
    assert first.due_at is not None
    assert 29 < (first.due_at - first.timestamp).total_seconds() <= 30
    assert second.due_at == datetime(2098, 12, 31, 23, tzinfo=UTC)
    assert second.depends_on == [first.stream_id]
    assert app.get_task(second.stream_id).status is TaskStatus.BLOCKED
    naive = cli("t.any", "--eta", "2099-01-01T00:00:00")
    assert naive.returncode == 2
    assert "no UTC offset" in naive.stderr
    unknown = cli("t.any", "--depends-on", "5c0f2a9e-1d3b-4e6f-8a7c-9b0d1e2f3a4b")
    assert unknown.returncode == 1
    assert "no task with id" in unknown.stderr
