"""The worker against the real RabbitMQ and SQLite/PostgreSQL stores, in-process and as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from broker_q import App, TaskFailed, TaskStatus
from broker_q.amqp.topology import REASON_HEADER, Topology
from broker_q.domain.events import TaskSubmitted
from broker_q.relay import work_message_body
from tests.helpers import running, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _app(store: str, amqp_url: str, namespace: str) -> App:
    return App(store=store, amqp_url=amqp_url, namespace=namespace)


async def test_a_message_delivered_twice_runs_once(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    calls: list[int] = []

    @app.task(name="count")
    def count(n: int) -> int:
        calls.append(n)
        return n

    handle = app.submit("count", [7])
    submitted = app.history(handle.id)[0]
    assert isinstance(submitted, TaskSubmitted)
    async with running(app, relay=False, concurrency=4) as worker:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(worker.topology.work_exchange)
        for _ in range(2):
            await exchange.publish(aio_pika.Message(work_message_body(submitted)), routing_key="default")
        queue = await channel.declare_queue(worker.topology.work_queue("default"), passive=True)

        async def both_acked() -> bool:
            declared = await channel.declare_queue(queue.name, passive=True)
            return app.get_task(handle.id).status is TaskStatus.SUCCEEDED and \
                declared.declaration_result.message_count == 0 and not worker._inflight

        await wait_for(both_acked, what="both deliveries handled")
        await connection.close()
    assert calls == [7]
    assert [e.TYPE for e in app.history(handle.id)] == ["submitted", "started", "succeeded"]


async def test_failures_are_recorded_and_the_worker_keeps_going(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("bad input")

    @app.task(name="unserialisable")
    async def unserialisable() -> object:
        return object()

    @app.task(name="where")
    def where() -> str:
        return threading.current_thread().name

    @app.task(name="where_async")
    async def where_async() -> str:
        return threading.current_thread().name

    async with running(app):
        failing = await boom.submit()
        bad_result = await unserialisable.submit()
        unknown = await app.submit_async("nobody.handles.this")
        sync_thread = await where.submit()
        async_thread = await where_async.submit()
        with pytest.raises(TaskFailed) as failed:
            await failing.result(timeout=10)
        assert failed.value.error_type == "ValueError"
        assert "bad input" in failed.value.message
        assert "raise ValueError" in (failed.value.traceback or "")
        with pytest.raises(TaskFailed, match="the result cannot be recorded"):
            await bad_result.result(timeout=10)
        with pytest.raises(TaskFailed, match=r"no handler is registered for task 'nobody\.handles\.this'"):
            await unknown.result(timeout=10)
        assert (await sync_thread.result(timeout=10)).startswith("broker_q-handler")
        assert await async_thread.result(timeout=10) == "MainThread"


async def test_a_handler_is_called_with_its_arguments_validated_and_never_with_the_wrong_types(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    calls: list[tuple[object, object]] = []

    @app.task(name="remind", max_attempts=3)
    async def remind(at: datetime, times: int) -> str:
        calls.append((at, times))
        return type(at).__name__

    # A client without the handler registered records whatever it is given; the worker checks again.
    client = _app(sqlite_url, amqp_url, namespace)
    good = await client.submit_async("remind", ["2026-12-01T10:00:00Z"], {"times": "2"})
    bad = await client.submit_async("remind", ["next tuesday", 2])
    async with running(app):
        assert await good.result(timeout=10) == "datetime"
        with pytest.raises(TaskFailed, match=r"handler was not called.*argument 'at' must be datetime") as failed:
            await bad.result(timeout=10)
    assert failed.value.error_type == "ValidationError"
    assert "next tuesday" not in failed.value.message
    assert calls == [(datetime(2026, 12, 1, 10, tzinfo=UTC), 2)]
    assert [e.TYPE for e in app.history(bad.id)] == ["submitted", "started", "dead_lettered"]  # not retried


async def test_a_malformed_work_message_goes_to_the_invalid_queue(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    async with running(app) as worker:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(worker.topology.work_exchange)
        await exchange.publish(aio_pika.Message(b"{not json"), routing_key="default")
        invalid = await channel.declare_queue(worker.topology.invalid_queue, passive=True)
        messages: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def refused() -> bool:
            message = await invalid.get(fail=False)
            if message is not None:
                messages.append(message)
            return bool(messages)

        await wait_for(refused, what="the message in the invalid queue")
        assert "malformed work message" in str(messages[0].headers[REASON_HEADER])
        assert messages[0].body == b"{not json"
        handle = await add.submit(2, 3)
        assert await handle.result(timeout=10) == 5
        await connection.close()
    rejected = [r.event for r in app.store.read_log(0, 100) if r.event.TYPE == "ingress_rejected"]
    assert len(rejected) == 1


async def test_priorities_order_the_work_queue(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    low = app.submit("t", priority=1)
    high = app.submit("t", priority=9)
    middle = app.submit("t", priority=5)
    from broker_q.relay import Relay

    stop = asyncio.Event()
    relay = Relay(app.store, amqp_url, Topology(namespace), poll_interval=0.005)
    relay_task = asyncio.create_task(relay.run(stop))
    await wait_for(lambda: relay.position == app.store.max_position(), what="the relay to publish")
    stop.set()
    await relay_task
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(Topology(namespace).work_queue("default"), passive=True)
    order = []
    for _ in range(3):
        message = await queue.get(timeout=5)
        assert message.message_id is not None
        order.append(uuid.UUID(message.message_id.split(":")[0]))
        await message.ack()
    await connection.close()
    assert order == [high.id, middle.id, low.id]


# -- as separate processes ------------------------------------------------------------------


@pytest.fixture
def process_env(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path
) -> Iterator[dict[str, str]]:
    log = tmp_path / "processes.log"
    yield {**os.environ, "BROKER_Q_STORE": sqlite_url, "BROKER_Q_AMQP_URL": amqp_url,
           "BROKER_Q_NAMESPACE": namespace, "PYTHONPATH": str(ROOT), "BROKER_Q_SHUTDOWN_GRACE": "20",
           "BROKER_Q_TEST_LOG": str(log)}
    if log.exists():
        print(log.read_text())  # shown by pytest when the test failed


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def broker_q(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start ``broker-q ARGS``; its output goes to the log file named by BROKER_Q_TEST_LOG, shown on failure."""
    with open(env["BROKER_Q_TEST_LOG"], "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "broker_q.cli", *args], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


async def test_a_task_submitted_while_rabbitmq_is_unreachable_runs_later(
    process_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    unreachable = {**process_env, "BROKER_Q_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    submitted = cli(unreachable, "submit", "add", "--args", "[1,2]")
    assert submitted.returncode == 0, submitted.stderr
    task_id = uuid.UUID(submitted.stdout.strip())
    app = App(store=process_env["BROKER_Q_STORE"])
    assert app.get_task(task_id).status is TaskStatus.READY
    processes.append(broker_q(process_env, "run", "tests.integration.apps:app"))
    assert await app.handle(task_id).result(timeout=30) == 3
    status = cli(process_env, "status", str(task_id), "--json")
    assert '"state": "succeeded"' in status.stdout
    assert '"result": 3' in status.stdout


async def test_a_worker_killed_mid_task_is_taken_over_by_another(
    process_env: dict[str, str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    app = App(store=process_env["BROKER_Q_STORE"])
    marker = tmp_path / "first-attempt"
    handle = app.submit("hang_first_time", kwargs={"marker": str(marker)})
    processes.append(broker_q(process_env, "relay"))
    first = broker_q(process_env, "worker", "tests.integration.apps:app")
    processes.append(first)
    await wait_for(lambda: marker.exists() and app.get_task(handle.id).status is TaskStatus.STARTED,
                   timeout=30, what="the first attempt to start")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    processes.append(broker_q(process_env, "worker", "tests.integration.apps:app"))
    result = await handle.result(timeout=60)
    assert result.startswith("done by")
    assert result != f"done by {marker.read_text()}"
    history = app.history(handle.id)
    assert [e.TYPE for e in history] == ["submitted", "started", "started", "succeeded"]
    assert [getattr(e, "attempt", None) for e in history[1:3]] == [1, 2]
    assert history[1].actor != history[2].actor


async def test_sigterm_lets_the_running_task_finish(
    process_env: dict[str, str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    app = App(store=process_env["BROKER_Q_STORE"])
    marker = tmp_path / "running"
    handle = app.submit("sleep_then_return", kwargs={"seconds": 1.5, "marker": str(marker)})
    worker = broker_q(process_env, "run", "tests.integration.apps:app")
    processes.append(worker)
    await wait_for(marker.exists, timeout=30, what="the task to start")
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    state = app.get_task(handle.id)
    assert state.status is TaskStatus.SUCCEEDED
    assert state.attempts == 1


async def test_a_worker_that_lost_more_threads_than_it_replaces_exits_with_an_error_for_its_supervisor(
    process_env: dict[str, str], processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    app = App(store=process_env["BROKER_Q_STORE"])
    marker = tmp_path / "stuck"
    handle = app.submit("ignores_its_limit", kwargs={"marker": str(marker)})
    env = {**process_env, "BROKER_Q_WORKER_CONCURRENCY": "1", "BROKER_Q_WORKER_MAX_ABANDONED_THREADS": "0",
           "BROKER_Q_SHUTDOWN_GRACE": "1"}
    worker = broker_q(env, "run", "tests.integration.apps:app")
    processes.append(worker)
    # Its handler's thread never ends: the process exits anyway, with an error a supervisor acts on.
    assert await asyncio.to_thread(worker.wait, 60) == 1
    assert marker.read_text() == str(worker.pid)
    state = app.get_task(handle.id)
    assert (state.status, state.timed_out) == (TaskStatus.DEAD_LETTERED, True)
    log = await asyncio.to_thread(Path(process_env["BROKER_Q_TEST_LOG"]).read_text)
    assert f"task {handle.id}: its handler runs on past its hard time limit" in log
    assert "more than 0 sync handler threads ran on past their hard time limit" in log.split("error: ")[-1]


def test_cli_errors_are_one_line(process_env: dict[str, str]) -> None:
    for args, needle in (
        (["status", "not-a-uuid"], "is not a task id"),
        (["status", str(uuid.uuid4())], "no task with id"),
        (["submit", "add", "--args", "{"], "--args must be JSON"),
        (["submit", "add", "--kwargs", "[]"], "--kwargs must be a JSON object"),
        (["worker", "no_such_module:app"], "cannot import"),
        (["--store", "mysql://x", "status", str(uuid.uuid4())], "unsupported store URL"),
    ):
        result = cli(process_env, *args)
        assert result.returncode != 0, args
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_history_lists_every_event(process_env: dict[str, str]) -> None:
    task_id = cli(process_env, "submit", "add", "--args", "[1,2]", "--priority", "7").stdout.strip()
    out = cli(process_env, "history", task_id).stdout
    assert "submitted" in out
    assert "client:" in out
    as_json = cli(process_env, "history", task_id, "--json").stdout
    assert '"type": "submitted"' in as_json
    assert '"priority": 7' in as_json


async def test_the_relay_wakes_on_commit_instead_of_polling(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """With polling every 60 s, only the store's change signal can make the relay publish in time."""
    from broker_q.relay import Relay

    app = _app(durable_store_url, amqp_url, namespace)
    stop = asyncio.Event()
    relay = Relay(app.store, amqp_url, Topology(namespace), poll_interval=60, store_url=durable_store_url)
    relay_task = asyncio.create_task(relay.run(stop))
    try:
        await wait_for(lambda: relay.wakeup.is_set() or relay.position == 0, what="the relay to start")
        await asyncio.sleep(0)  # let the relay reach its idle wait
        for _ in range(3):
            handle = await asyncio.to_thread(app.submit, "t")
            position = app.store.max_position()
            await wait_for(lambda p=position: relay.position >= p, timeout=5,  # type: ignore[misc]
                           what=f"the relay to publish {handle.id}")
    finally:
        stop.set()
        await relay_task


async def test_a_redelivered_duplicate_does_not_take_the_task_from_a_live_worker(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """Worker A runs the task; a copy that was delivered once and requeued (so marked redelivered)
    reaches worker B, which must see that A is alive and leave the task to it."""
    amqp_cleanup.extend([f"{namespace}.work.other", f"{namespace}.ingress.other"])
    app = _app(sqlite_url, amqp_url, namespace)
    release = asyncio.Event()
    runs: list[str] = []

    @app.task(name="slow")
    async def slow() -> str:
        runs.append("run")
        await release.wait()
        return "done"

    handle = app.submit("slow")
    body = work_message_body(app.history(handle.id)[0])  # type: ignore[arg-type]
    connection = await aio_pika.connect(amqp_url)
    try:
        async with running(app, ["default"], relay=False, worker_id="worker-a", shutdown_grace=1) as first:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(first.topology.work_exchange)
            await exchange.publish(aio_pika.Message(body), routing_key="default")
            await wait_for(lambda: runs == ["run"], what="the task to start on worker A")
            other, _ = await first.topology.declare_queue(channel, "other")
            await exchange.publish(aio_pika.Message(body), routing_key="other")
            duplicate = await other.get(timeout=5)
            await duplicate.nack(requeue=True)
            async with running(app, ["other"], relay=False, worker_id="worker-b", shutdown_grace=1):

                async def duplicate_settled() -> bool:
                    declared = await channel.declare_queue(other.name, passive=True)
                    return declared.declaration_result.message_count == 0 and not release.is_set()

                await wait_for(duplicate_settled, what="worker B to settle the duplicate")
                await asyncio.sleep(0)
                assert runs == ["run"]
                release.set()
                assert await handle.result(timeout=10) == "done"
    finally:
        release.set()
        await connection.close()
    assert runs == ["run"]
    assert [e.TYPE for e in app.history(handle.id)] == ["submitted", "started", "succeeded"]
    assert [r.event.TYPE for r in app.store.read_log(0, 100)].count("ingress_rejected") == 0


async def test_a_connection_blip_does_not_cancel_a_running_handler(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    finished: list[str] = []

    @app.task(name="steady")
    async def steady() -> str:
        await asyncio.sleep(3)
        finished.append("done")
        return "done"

    async with running(app, worker_id=f"blip-{namespace}"):
        handle = await steady.submit()
        await wait_for(lambda: app.get_task(handle.id).status is TaskStatus.STARTED, what="the task to start")
        listing = await _rabbitmqctl("list_connections", "pid", "client_properties")
        pids = [line.split("\t")[0] for line in listing.splitlines() if f"blip-{namespace}" in line]
        assert pids, listing
        for pid in pids:
            await _rabbitmqctl("close_connection", pid, "test: a connection blip")
        assert await handle.result(timeout=30) == "done"
    assert finished == ["done"]
    assert [e.TYPE for e in app.history(handle.id)] == ["submitted", "started", "succeeded"]


async def _rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_a_work_queue_deleted_under_the_worker_is_declared_and_consumed_again(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """The broker cancels the consumers of a deleted queue: the worker's work-queue consumers (which
    bypass aio-pika's robust queue) must come back by themselves, as aio-pika's own do."""
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="echo")
    async def echo(n: int) -> int:
        return n

    async with running(app) as worker:
        assert await (await echo.submit(1)).result(timeout=10) == 1
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(worker.topology.work_queue("default"))

            async def consumed_again() -> bool:
                probe = await connection.channel()
                try:
                    queue = await probe.declare_queue(worker.topology.work_queue("default"), passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    return False
                return bool(queue.declaration_result.consumer_count)

            await wait_for(consumed_again, timeout=15, what="the work queue declared and consumed again")
        finally:
            await connection.close()
        assert await (await echo.submit(2)).result(timeout=10) == 2


async def test_a_cancelled_error_the_handler_raises_itself_is_its_failure_not_a_held_message(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """Nobody cancelled the task: a CancelledError escaping the handler (an inner await that was
    cancelled) is an error of the handler's, recorded by its retry policy and acknowledged; the worker
    goes on."""
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="leaks_cancel", max_attempts=1)
    async def leaks_cancel() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner  # raises CancelledError into the handler, which lets it out

    @app.task(name="fine")
    async def fine() -> str:
        return "fine"

    async with running(app) as worker:
        handle = await leaks_cancel.submit()
        with pytest.raises(TaskFailed) as failed:
            await handle.result(timeout=15)
        assert failed.value.error_type == "CancelledError"
        assert await (await fine.submit()).result(timeout=15) == "fine"

        async def drained() -> bool:
            connection = await aio_pika.connect(amqp_url)
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(worker.topology.work_queue("default"), passive=True)
                return queue.declaration_result.message_count == 0 and not worker._inflight
            finally:
                await connection.close()

        await wait_for(drained, timeout=15, what="the message acknowledged")
