"""Retries, dead letters and their replay, and cancellation, against the real RabbitMQ and stores."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from broker_q import (
    App,
    AttemptCancelled,
    Retry,
    RetryOverride,
    RetryPolicy,
    TaskCancelled,
    TaskFailed,
    TaskStatus,
    cancelled,
)
from broker_q.breakers import Breakers
from broker_q.domain.breaker import BreakerPolicy
from broker_q.domain.events import TaskDeadLettered, TaskEvent, TaskReplayed, TaskRetryScheduled, TaskStarted
from broker_q.errors import ConfigurationError, DomainError
from broker_q.middleware import Attempt, Middleware
from broker_q.threads import ThreadsExhausted
from broker_q.worker import Worker
from tests.helpers import running, wait_for
from tests.integration import isolated

ROOT = Path(__file__).resolve().parents[2]

FAST = RetryPolicy(max_attempts=3, backoff=0.05, backoff_max=0.2)


def _app(store: str, amqp_url: str, namespace: str) -> App:
    return App(store=store, amqp_url=amqp_url, namespace=namespace)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def _types(app: App, task_id: Any) -> list[str]:
    return [e.TYPE for e in app.history(task_id)]


def _new_kwargs(app: App, replayed: TaskReplayed) -> dict[str, Any] | None:
    """The keyword arguments a replay gave the task (sealed with the rest of its arguments)."""
    if replayed.sealed_arguments is None:
        return replayed.kwargs
    return app.payloads.open_arguments(replayed.tenant, replayed.stream_id, replayed.sealed_arguments)[1]


async def test_a_failing_task_is_retried_with_backoff_until_it_succeeds(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)
    calls: list[int] = []

    # A factor of 4 keeps the jittered delays of the three retries apart: [0.01, 0.02], [0.04, 0.08], [0.16, 0.32].
    @app.task(name="flaky", retry=RetryPolicy(max_attempts=4, backoff=0.02, factor=4))
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError(f"down ({len(calls)})")
        return "up"

    async with running(app):
        handle = await flaky.submit()
        assert await handle.result(timeout=20) == "up"
    assert _types(app, handle.id) == ["submitted", "started", "retry_scheduled", "started", "retry_scheduled",
                                      "started", "retry_scheduled", "started", "succeeded"]
    events = app.history(handle.id)
    retries = [e for e in events if isinstance(e, TaskRetryScheduled)]
    starts = [e for e in events if isinstance(e, TaskStarted)]
    assert [e.attempt for e in starts] == [1, 2, 3, 4]
    assert [e.message for e in retries] == ["down (1)", "down (2)", "down (3)"]
    delays = [(retry.due_at - retry.timestamp).total_seconds() for retry in retries]
    full = [0.02, 0.08, 0.32]  # backoff * factor ** (retry - 1)
    for delay, backoff in zip(delays, full, strict=True):
        # equal jitter: between half the backoff and all of it (a timedelta keeps microseconds)
        assert backoff / 2 - 1e-6 <= delay <= backoff + 1e-6, (delays, full)
    assert [round(delay, 6) for delay in delays] != full  # drawn, not the full backoff every time
    for retry, start in zip(retries, starts[1:], strict=True):
        assert start.timestamp >= retry.due_at  # never started before it was due
    assert await asyncio.to_thread(app.store.timers.count) == 0  # every timer was published and removed


async def test_the_last_attempt_and_errors_not_retried_dead_letter(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="always", retry=FAST)
    def always() -> None:
        raise ConnectionError("still down")

    @app.task(name="bug", retry=RetryPolicy(max_attempts=5, retry_on=(OSError,)))
    def bug() -> None:
        raise KeyError("missing")

    @app.task(name="asks", max_attempts=2)
    def asks() -> None:
        raise Retry("not yet", delay=0.05)  # its policy's own backoff would wait 0.5 to 1 s

    # FileNotFoundError is an OSError: only dont_retry_on keeps it from being retried
    @app.task(name="missing", retry=RetryPolicy(max_attempts=5, backoff=0.05, retry_on=(OSError,),
                                                dont_retry_on=(FileNotFoundError,)))
    def missing() -> None:
        raise FileNotFoundError("no such file")

    async with running(app):
        exhausted, not_retried, asked = await always.submit(), await bug.submit(), await asks.submit()
        once = await app.submit_async("always", max_attempts=1)  # the submit's budget overrides the task's
        refused = await missing.submit()
        for handle, error_type in ((exhausted, "ConnectionError"), (not_retried, "KeyError"), (asked, "Retry"),
                                   (once, "ConnectionError"), (refused, "FileNotFoundError")):
            with pytest.raises(TaskFailed) as failed:
                await handle.result(timeout=20)
            assert failed.value.error_type == error_type
    assert [app.get_task(h.id).attempts for h in (exhausted, not_retried, asked, once, refused)] == [3, 1, 2, 1, 1]
    assert _types(app, asked.id) == ["submitted", "started", "retry_scheduled", "started", "dead_lettered"]
    [asked_retry] = [e for e in app.history(asked.id) if isinstance(e, TaskRetryScheduled)]
    assert abs((asked_retry.due_at - asked_retry.timestamp).total_seconds() - 0.05) < 0.001
    assert _types(app, refused.id) == ["submitted", "started", "dead_lettered"]
    assert app.get_task(exhausted.id).status is TaskStatus.DEAD_LETTERED
    assert "raise ConnectionError" in (app.get_task(exhausted.id).traceback or "")


class Declined(ValueError):
    """Named ``tests.integration.test_resilience.Declined`` in a submit's retry override."""


async def test_a_submits_retry_override_changes_the_backoff_and_which_errors_retry(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="pay", retry=RetryPolicy(max_attempts=3, backoff=0.05, jitter=False, retry_on=(ConnectionError,)))
    def pay() -> None:
        raise Declined("card declined")

    async with running(app):
        own = await app.submit_async("pay")
        # retry_on by a base class's name (Declined is a ValueError); backoff and factor replaced;
        # max_attempts and jitter (off) stay the task's.
        changed = await app.submit_async("pay", retry=RetryOverride(backoff=0.2, factor=1.5,
                                                                    retry_on=("builtins.ValueError",)))
        cli = await asyncio.to_thread(_cli, sqlite_url, "submit", "pay", "--max-attempts", "2", "--retry-backoff",
                                      "0.1", "--retry-on", "builtins.Exception", "--dont-retry-on",
                                      "tests.integration.test_resilience.Declined")
        assert cli.returncode == 0, cli.stderr
        refused = app.handle(cli.stdout.strip())
        for handle in (own, changed, refused):
            with pytest.raises(TaskFailed) as failed:
                await handle.result(timeout=20)
            assert (failed.value.error_type, failed.value.message) == ("Declined", "card declined")

    assert _types(app, own.id) == ["submitted", "started", "dead_lettered"]  # the task's policy: not retried
    assert _types(app, refused.id) == ["submitted", "started", "dead_lettered"]  # dont_retry_on wins
    assert _types(app, changed.id) == ["submitted", "started", "retry_scheduled", "started", "retry_scheduled",
                                       "started", "dead_lettered"]
    events = app.history(changed.id)
    retries = [e for e in events if isinstance(e, TaskRetryScheduled)]
    delays = [(e.due_at - e.timestamp).total_seconds() for e in retries]
    assert delays == pytest.approx([0.2, 0.3], abs=1e-5)  # 0.2 * 1.5 ** (n - 1), no jitter
    starts = [e for e in events if isinstance(e, TaskStarted)]
    for retry_event, start in zip(retries, starts[1:], strict=True):
        assert start.timestamp >= retry_event.due_at
    dead = events[-1]
    assert isinstance(dead, TaskDeadLettered)
    assert (dead.error_type, dead.message, starts[-1].attempt) == ("Declined", "card declined", 3)
    assert app.get_task(changed.id).status is TaskStatus.DEAD_LETTERED


async def test_a_replayed_dead_letter_runs_again_with_its_provenance(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)

    @app.task(name="divide", retry=RetryPolicy(max_attempts=2, backoff=0.05))
    def divide(x: int, by: int = 0) -> float:
        return x / by

    async with running(app):
        handle = await divide.submit(1)
        with pytest.raises(TaskFailed, match="ZeroDivisionError"):
            await handle.result(timeout=20)
        with pytest.raises(DomainError, match="needs a reason"):
            app.replay_dead_letter(handle.id, reason=" ")
        # A replay's retry budget counts again from its first attempt (docs/events.md): two more attempts.
        state = await asyncio.to_thread(app.replay_dead_letter, handle.id, reason="try it as it is",
                                        actor="operator:ann@ops")
        assert (state.status, state.first_attempt) == (TaskStatus.READY, 3)
        with pytest.raises(TaskFailed, match="ZeroDivisionError"):
            await handle.result(timeout=20)
        state = await asyncio.to_thread(app.replay_dead_letter, handle.id, reason="fixed the divisor",
                                        actor="operator:ann@ops", kwargs={"by": 4})
        assert (state.status, state.first_attempt) == (TaskStatus.READY, 5)
        assert await handle.result(timeout=20) == 0.25
    replayed = [e for e in app.history(handle.id) if isinstance(e, TaskReplayed)]
    assert [(e.actor, e.reason, _new_kwargs(app, e)) for e in replayed] == [("operator:ann@ops", "try it as it is",
                                                                            None),
                                                                 ("operator:ann@ops", "fixed the divisor", {"by": 4})]
    assert _types(app, handle.id) == ["submitted", "started", "retry_scheduled", "started", "dead_lettered",
                                      "replayed", "started", "retry_scheduled", "started", "dead_lettered",
                                      "replayed", "started", "succeeded"]
    assert [e.attempt for e in app.history(handle.id) if isinstance(e, TaskStarted)] == [1, 2, 3, 4, 5]
    with pytest.raises(DomainError, match="only a dead letter"):
        app.replay_dead_letter(handle.id, reason="again")


async def test_a_cancelled_task_never_starts_even_when_its_message_is_queued(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    calls: list[int] = []

    @app.task(name="count")
    def count(n: int) -> int:
        calls.append(n)
        return n

    handles = [app.submit("count", [n]) for n in range(3)]
    async with running(app, queues=["unrelated"]) as worker:  # a relay publishes them; nothing consumes them
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()

            async def queued() -> int:
                declared = await channel.declare_queue(worker.topology.work_queue("default"), passive=True)
                count: int = declared.declaration_result.message_count or 0
                return count

            await wait_for(lambda: _equals(queued(), 3), timeout=20, what="three work messages in the queue")
        finally:
            await connection.close()
        await asyncio.to_thread(app.cancel, handles[1].id, reason="not needed")
    async with running(app):
        assert await handles[0].result(timeout=20) == 0
        assert await handles[2].result(timeout=20) == 2
        with pytest.raises(TaskCancelled, match="not needed"):
            await handles[1].result(timeout=5)
    assert sorted(calls) == [0, 2]
    assert _types(app, handles[1].id) == ["submitted", "cancelled"]


async def test_a_running_async_task_is_cancelled_and_a_sync_one_has_its_outcome_dropped(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    started = {"async": asyncio.Event(), "sync": threading.Event()}
    seen: list[str] = []
    release = threading.Event()

    @app.task(name="forever")
    async def forever() -> None:
        started["async"].set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    @app.task(name="blocking")
    def blocking() -> str:
        started["sync"].set()
        try:
            release.wait(30)  # in C: the cancellation is raised when it returns to Python
        except AttemptCancelled:
            seen.append("sync told")
            raise
        seen.append("sync returned")
        return "too late"

    async with running(app, concurrency=4) as worker:
        a, s = await forever.submit(), await blocking.submit()
        await wait_for(started["async"].is_set, timeout=20, what="the async handler to start")
        await wait_for(started["sync"].is_set, timeout=20, what="the sync handler to start")
        await asyncio.to_thread(app.cancel, a.id, reason="operator says stop")
        await asyncio.to_thread(app.cancel, s.id, reason="no longer wanted")
        await wait_for(lambda: seen == ["cancelled"], timeout=20, what="the async handler to be cancelled")
        await wait_for(lambda: worker.abandoned_threads == 1, timeout=20,
                       what="the sync handler to be abandoned after its grace")
        release.set()
        await wait_for(lambda: "sync told" in seen and not worker._inflight and worker.abandoned_threads == 0,
                       timeout=20, what="the sync handler to finish")
    assert _types(app, a.id) == ["submitted", "started", "cancelled"]
    assert _types(app, s.id) == ["submitted", "started", "cancelled"]  # its late success was dropped
    assert app.get_task(s.id).cancel_reason == "no longer wanted"


async def test_a_cancelled_sync_handler_gets_attempt_cancelled_in_its_thread_or_sees_it_with_cancelled(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    entered: list[str] = []
    seen: list[tuple[str, str]] = []

    @app.task(name="spin")
    def spin() -> int:
        entered.append("spin")
        n = 0
        try:
            while True:  # pure Python: the exception lands at the next bytecode boundary
                n += 1
        except AttemptCancelled:
            seen.append(("spin", threading.current_thread().name))
            raise

    @app.task(name="chunks")
    def chunks() -> str:
        entered.append("chunks")
        while not cancelled():
            try:
                time.sleep(0.01)  # a chunk of work
            except Exception as e:  # a broad except, as real loops have: it swallows AttemptCancelled too
                seen.append(("chunks swallowed", type(e).__name__))
        seen.append(("chunks", "saw cancelled()"))
        return "stopped early"

    async with running(app, concurrency=2) as worker:
        pure, cooperative = await spin.submit(), await chunks.submit()
        await wait_for(lambda: sorted(entered) == ["chunks", "spin"], timeout=20, what="both handlers to start")
        await asyncio.to_thread(app.cancel, pure.id, reason="stop spinning")
        await asyncio.to_thread(app.cancel, cooperative.id, reason="stop looping")
        await wait_for(lambda: len(seen) == 3 and not worker._inflight, timeout=20,
                       what="both handlers to stop and their messages to be acknowledged")
    found = dict(seen)
    assert found["spin"].startswith("broker_q-handler")  # raised in the handler's own thread
    assert found["chunks swallowed"] == "AttemptCancelled"
    assert found["chunks"] == "saw cancelled()"
    for handle in (pure, cooperative):
        assert _types(app, handle.id) == ["submitted", "started", "cancelled"]  # no late outcome recorded


async def test_sync_handlers_running_on_past_their_hard_limit_or_cancellation_leave_the_worker_its_capacity(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    release = threading.Event()
    entered: list[str] = []

    @app.task(name="stuck", time_limit=0.3)
    def stuck() -> str:
        entered.append("stuck")
        release.wait(60)  # blocked in C: neither its hard limit nor a cancellation can interrupt it
        return "too late"

    @app.task(name="hangs")
    def hangs() -> str:
        entered.append("hangs")
        release.wait(60)
        return "too late"

    @app.task(name="quick")
    def quick(n: int) -> int:
        return n

    caplog.set_level(logging.WARNING, logger="broker_q.worker")
    async with running(app, concurrency=1, max_abandoned_threads=2) as worker:
        try:
            timed_out = await stuck.submit()
            with pytest.raises(TaskFailed) as failed:
                await timed_out.result(timeout=20)
            assert failed.value.error_type == "TimeLimitExceeded"
            assert await (await quick.submit(1)).result(timeout=20) == 1  # on the thread that replaced it
            hung = await hangs.submit()
            await wait_for(lambda: "hangs" in entered, timeout=20, what="the second handler to start")
            await asyncio.to_thread(app.cancel, hung.id, reason="give up")
            assert await (await quick.submit(2)).result(timeout=20) == 2  # once its grace has passed
            assert worker.abandoned_threads == 2
        finally:
            release.set()
        await wait_for(lambda: worker.abandoned_threads == 0, timeout=20, what="the stuck handlers to return")
    assert _types(app, timed_out.id) == ["submitted", "started", "dead_lettered"]
    assert app.get_task(timed_out.id).timed_out
    assert _types(app, hung.id) == ["submitted", "started", "cancelled"]
    abandoned = [r.getMessage() for r in caplog.records if "is abandoned" in r.getMessage()]
    assert [r.levelno for r in caplog.records if "is abandoned" in r.getMessage()] == [logging.WARNING] * 2
    assert abandoned[0].startswith(f"task {timed_out.id}: its handler runs on past its hard time limit")
    assert abandoned[1].startswith(f"task {hung.id}: its handler runs on past its cancellation")


async def test_a_worker_that_lost_more_threads_than_it_replaces_stops_and_its_tasks_run_elsewhere(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    release = threading.Event()

    @app.task(name="stuck", time_limit=0.3)
    def stuck() -> str:
        release.wait(60)
        return "too late"

    @app.task(name="quick")
    def quick(n: int) -> int:
        return n

    worker = Worker(app, concurrency=1, max_abandoned_threads=1, shutdown_grace=0.5)
    amqp_cleanup.extend([worker.topology.work_queue("elsewhere"), worker.topology.ingress_queue("elsewhere")])
    caplog.set_level(logging.ERROR, logger="broker_q.worker")
    try:
        async with running(app, queues=["elsewhere"]):  # the relay, and a worker for no queue of these tasks
            lost = asyncio.create_task(worker.run(asyncio.Event()))  # nobody will ask it to stop
            await wait_for(worker.ready.is_set, timeout=20, what="the worker to start")
            for _ in range(2):
                with pytest.raises(TaskFailed, match="TimeLimitExceeded"):
                    await (await stuck.submit()).result(timeout=20)
            after = await quick.submit(3)
            with pytest.raises(ThreadsExhausted):
                await asyncio.wait_for(lost, 30)
        assert [r.levelno for r in caplog.records if "supervisor" in r.getMessage()] == [logging.ERROR]
        async with running(app):  # the worker its supervisor starts again
            assert await after.result(timeout=20) == 3
    finally:
        release.set()


async def test_a_cancelled_task_in_the_prefetch_buffer_never_runs(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    release = threading.Event()
    calls: list[int] = []

    @app.task(name="hold")
    def hold() -> str:
        calls.append(-1)
        release.wait(60)
        return "held"

    @app.task(name="count")
    def count(n: int) -> int:
        calls.append(n)
        return n

    async with running(app, concurrency=1, prefetch=4) as worker:
        try:
            holder = await hold.submit()
            await wait_for(lambda: calls == [-1], timeout=20, what="the first task to hold the only slot")
            queued = [await count.submit(n) for n in range(3)]
            await wait_for(lambda: len(worker._inflight) == 4, timeout=20,
                           what="the three others to be delivered to the worker and wait there")
            await asyncio.to_thread(app.cancel, queued[1].id, reason="not needed")
        finally:
            release.set()
        assert await holder.result(timeout=20) == "held"
        assert [await queued[n].result(timeout=20) for n in (0, 2)] == [0, 2]
        with pytest.raises(TaskCancelled, match="not needed"):
            await queued[1].result(timeout=5)
    assert calls == [-1, 0, 2]
    assert _types(app, queued[1].id) == ["submitted", "cancelled"]


async def test_an_open_breaker_defers_its_tasks_without_spending_attempts(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)
    app.breaker("payments", BreakerPolicy(failure_threshold=2, window=60, open_for=0.5, probe_timeout=10))
    healthy = threading.Event()
    calls: list[int] = []

    @app.task(name="charge", service="payments")
    async def charge(n: int) -> int:
        calls.append(n)
        if not healthy.is_set():
            raise ConnectionError("payments is down")
        return n

    async with running(app, concurrency=1):
        for n in (1, 2):  # two failures within the window open the breaker
            with pytest.raises(TaskFailed, match="payments is down"):
                await (await charge.submit(n)).result(timeout=20)
        breakers = Breakers(app.store)
        # The worker counts an attempt for the breaker after committing its outcome, which the
        # result above already saw: the breaker opens a moment later.
        await wait_for(lambda: breakers.state("payments").phase.value == "open", timeout=10,
                       what="two failures to open the breaker")
        waiting = await charge.submit(3)
        await wait_for(lambda: "deferred" in _types(app, waiting.id), timeout=20, what="the task to be deferred")
        assert calls == [1, 2]  # it did not run, and spent no attempt
        healthy.set()
        assert await waiting.result(timeout=20) == 3  # the probe, once the breaker half-opened
        after = await charge.submit(4)
        assert await after.result(timeout=20) == 4
    history = app.history(waiting.id)
    assert [e.TYPE for e in history][:2] == ["submitted", "deferred"]
    assert [e.TYPE for e in history][-2:] == ["started", "succeeded"]
    assert app.get_task(waiting.id).attempts == 1
    assert [e.TYPE for e in breakers.timeline("payments")] == ["breaker_failure", "breaker_failure", "breaker_opened",
                                                               "breaker_probe", "breaker_closed"]


def _cli(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", store, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)


async def test_cancel_and_dlq_replay_from_the_command_line(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="divide")
    def divide(x: int, by: int = 0) -> float:
        return x / by

    waiting = app.submit("divide", [1], {"by": 1})
    done = await asyncio.to_thread(_cli, sqlite_url, "cancel", str(waiting.id), "--reason", "changed my mind")
    assert done.returncode == 0, done.stderr
    assert app.get_task(waiting.id).status is TaskStatus.CANCELLED
    again = await asyncio.to_thread(_cli, sqlite_url, "cancel", str(waiting.id))
    assert (again.returncode, again.stderr.count("\n")) == (1, 1)
    assert "cancelled: it cannot be cancelled" in again.stderr

    async with running(app):
        handles = [await divide.submit(n) for n in (1, 2, 3)]
        for handle in handles:
            with pytest.raises(TaskFailed):
                await handle.result(timeout=20)
        one = await asyncio.to_thread(_cli, sqlite_url, "dlq", "replay", str(handles[0].id), "--reason", "by two",
                                      "--kwargs", '{"by": 2}')
        assert one.returncode == 0, one.stderr
        assert await handles[0].result(timeout=20) == 0.5
        # No projections process runs: the command brings the tasks view up to the store itself.
        every = await asyncio.to_thread(_cli, sqlite_url, "dlq", "replay", "--all", "--task", "divide", "--reason",
                                        "divisor fixed", "--kwargs", '{"by": 4}')
        assert every.returncode == 0, every.stderr
        assert every.stderr == "2 dead letter(s) replayed\n"
        assert [await h.result(timeout=20) for h in handles[1:]] == [0.5, 0.75]
    replayed = [e for e in app.history(handles[2].id) if isinstance(e, TaskReplayed)]
    assert [(e.reason, _new_kwargs(app, e), e.actor.startswith("operator:")) for e in replayed] == [
        ("divisor fixed", {"by": 4}, True)]


async def test_a_waiting_retry_survives_a_restart_of_the_relay_and_the_worker(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)
    calls: list[int] = []

    @app.task(name="later", max_attempts=2)
    async def later() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Retry("come back later", delay=1.5)
        return "done"

    async with running(app):
        handle = await later.submit()
        await wait_for(lambda: app.get_task(handle.id).status is TaskStatus.RETRY_SCHEDULED, timeout=20,
                       what="the retry to be scheduled")
        await wait_for(lambda: app.store.timers.count() == 1, timeout=20, what="the relay to store its timer")
    # Every process of this app has stopped: the timer is on disk, no message or worker holds the task.
    assert app.store.timers.count() == 1
    assert calls == [1]
    async with running(app):
        assert await handle.result(timeout=20) == "done"
    assert app.store.timers.count() == 0
    retry, start = app.history(handle.id)[2:4]
    assert isinstance(retry, TaskRetryScheduled)
    assert isinstance(start, TaskStarted)
    assert start.timestamp >= retry.due_at


async def test_time_limits_stop_handlers_and_are_recorded(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    cleaned: list[str] = []
    released = threading.Event()

    @app.task(name="slow", soft_time_limit=0.2)
    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cleaned.append("slow")
            raise

    @app.task(name="stubborn", time_limit=0.3)
    async def stubborn() -> None:
        while not released.is_set():  # swallows every cancellation until the test ends
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    # The hard limit counts from the attempt's start, the child's start-up included: long enough
    # for a loaded machine to start the child (its pid is asserted below), short next to its sleep.
    app.task(name="stuck", isolation="process", time_limit=4.0)(isolated.stuck)
    app.task(name="pid", isolation="process")(isolated.pid)

    async with running(app, concurrency=4):
        soft, hard = await slow.submit(), await stubborn.submit()
        marker = tmp_path / "stuck.pid"
        killed = await app.submit_async("stuck", [str(marker)])
        elsewhere = await app.submit_async("pid")
        with pytest.raises(TaskFailed) as failed:
            await soft.result(timeout=20)
        assert failed.value.error_type == "SoftTimeLimitExceeded"
        for handle in (hard, killed):
            with pytest.raises(TaskFailed) as failed:
                await handle.result(timeout=20)
            assert failed.value.error_type == "TimeLimitExceeded"
            assert app.get_task(handle.id).timed_out
        assert await elsewhere.result(timeout=20) != os.getpid()  # it ran in a process of its own
        released.set()
    assert cleaned == ["slow"]
    child = int(marker.read_text())
    await wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10, what="the stuck child to be killed")


async def test_a_middleware_that_raises_fails_the_attempt_and_the_worker_keeps_going(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    seen: list[tuple[Any, str, str]] = []

    class Trace(Middleware):
        async def before_attempt(self, attempt: Attempt) -> None:
            seen.append((attempt.task_id, "before", str(attempt.attempt)))

        def after_attempt(self, attempt: Attempt, outcome: TaskEvent) -> None:
            seen.append((attempt.task_id, "after", outcome.TYPE))

    class Picky(Middleware):
        def before_attempt(self, attempt: Attempt) -> None:
            if attempt.kwargs.get("refuse"):
                raise PermissionError("not this one")

        async def after_attempt(self, attempt: Attempt, outcome: TaskEvent) -> None:
            if attempt.kwargs.get("spoil"):
                raise RuntimeError("audit sink down")

    app.add_middleware(Trace())
    app.add_middleware(Picky())
    with pytest.raises(ConfigurationError):
        app.add_middleware(object())  # type: ignore[arg-type]

    @app.task(name="echo")
    async def echo(refuse: bool = False, spoil: bool = False) -> str:
        return "ran"

    async with running(app, concurrency=1):
        refused, spoiled, fine = (await echo.submit(refuse=True), await echo.submit(spoil=True),
                                  await echo.submit())
        with pytest.raises(TaskFailed) as failed:
            await refused.result(timeout=20)
        assert (failed.value.error_type, failed.value.message) == (
            "MiddlewareError", "middleware Picky.before_attempt raised PermissionError: not this one")
        with pytest.raises(TaskFailed) as failed:
            await spoiled.result(timeout=20)
        assert failed.value.message == "middleware Picky.after_attempt raised RuntimeError: audit sink down"
        assert await fine.result(timeout=20) == "ran"
    # before: in registration order; after: in reverse, the outer one seeing what the inner made of it.
    # One attempt at a time (concurrency 1), in whatever order the worker took them.
    pairs = [seen[i:i + 2] for i in range(0, len(seen), 2)]
    assert sorted(pairs, key=lambda pair: [refused.id, spoiled.id, fine.id].index(pair[0][0])) == [
        [(refused.id, "before", "1"), (refused.id, "after", "dead_lettered")],
        [(spoiled.id, "before", "1"), (spoiled.id, "after", "dead_lettered")],
        [(fine.id, "before", "1"), (fine.id, "after", "succeeded")]]
