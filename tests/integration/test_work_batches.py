"""Work batches (decision 0014): the relay packs ready tasks of one route into one work message, and the
worker runs each entry as it runs a single delivery. Real RabbitMQ and SQLite."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from broker_q import App, TaskStatus
from broker_q.amqp.topology import REASON_HEADER, Topology
from broker_q.domain.events import TaskSubmitted
from broker_q.relay import Relay, work_message_body
from broker_q.wire import WORK_BATCH_TYPE, WORK_MESSAGE_TYPE
from broker_q.worker import Worker, _Acks
from tests.helpers import running, wait_for
from tests.integration.test_worker import broker_q, process_env, processes  # noqa: F401 (fixtures)


def _app(store: str, amqp_url: str, namespace: str, work_batch: int = 1) -> App:
    return App(store=store, amqp_url=amqp_url, namespace=namespace, work_batch=work_batch)


def _counting_app(store: str, amqp_url: str, namespace: str, work_batch: int) -> tuple[App, list[int]]:
    """An app whose task ``count`` records each ``n`` it runs with, in the list returned beside it."""
    app, calls = _app(store, amqp_url, namespace, work_batch), []

    @app.task(name="count")
    def count(n: int) -> int:
        calls.append(n)
        return n

    return app, calls


def _submitted(app: App, task_id: uuid.UUID) -> TaskSubmitted:
    event = app.history(task_id)[0]
    assert isinstance(event, TaskSubmitted)
    return event


async def _relay_once(app: App, *, name: str = "relay") -> None:
    """Run a relay until it has published and confirmed the whole log, then stop it."""
    settings = app.settings
    stop = asyncio.Event()
    relay = Relay(app.store, settings.amqp_url, Topology(settings.namespace), name=name, poll_interval=0.005,
                  work_batch=settings.work_batch)
    task = asyncio.create_task(relay.run(stop))
    try:
        await wait_for(lambda: relay.position == app.store.max_position() or task.done(), what="the relay to publish")
    finally:
        stop.set()
        await task


async def _queued(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in ``queue``, as a plain AMQP consumer sees it (taken off the queue)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        messages = []
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            messages.append(message)
        return messages
    finally:
        await connection.close()


async def _drained(worker: Worker, queue: str) -> bool:
    """Nothing left in ``queue``, nothing unacknowledged, nothing running."""
    connection = await aio_pika.connect(worker.app.settings.amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count == 0 and not worker._inflight and \
            not any(acks._order for acks in worker._acks.values())
    finally:
        await connection.close()


async def _publish(worker: Worker, body: bytes, message_type: str) -> None:
    connection = await aio_pika.connect(worker.app.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(worker.topology.work_exchange)
        await exchange.publish(aio_pika.Message(body, type=message_type), routing_key="default")
    finally:
        await connection.close()


def _types(app: App, task_id: uuid.UUID) -> list[str]:
    return [e.TYPE for e in app.history(task_id)]


@pytest.mark.parametrize("work_batch", [1, 4])
async def test_what_a_plain_consumer_of_the_work_queue_sees(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], work_batch: int
) -> None:
    app = _app(sqlite_url, amqp_url, namespace, work_batch)
    handles = [app.submit("t", [n]) for n in range(6)] + [app.submit("t", [9], priority=9)]
    singles = [work_message_body(_submitted(app, h.id)) for h in handles]
    await _relay_once(app)
    messages = await _queued(amqp_url, Topology(namespace).work_queue("default"))
    if work_batch == 1:  # exactly what the relay published before batches existed
        assert [m.body for m in messages] == [singles[6], *singles[:6]]  # priority 9 first
        assert {m.type for m in messages} == {WORK_MESSAGE_TYPE}
        assert [m.message_id for m in messages] == [f"{handles[6].id}:1"] + [f"{h.id}:1" for h in handles[:6]]
        return
    # Packed by priority, in log order, at most 4 a message; a batch of one goes out as a single message.
    assert [m.type for m in messages] == [WORK_MESSAGE_TYPE, WORK_BATCH_TYPE, WORK_BATCH_TYPE]
    assert messages[0].body == singles[6]
    assert messages[1].body == b"[" + b",".join(singles[:4]) + b"]"
    assert messages[2].body == b"[" + b",".join(singles[4:6]) + b"]"
    assert messages[1].message_id == f"{handles[0].id}:1..{handles[3].id}:1"
    assert [m.priority for m in messages] == [9, 5, 5]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)


async def test_a_batch_runs_every_task_once_in_task_slots_and_is_acknowledged_once(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(sqlite_url, amqp_url, namespace, work_batch=8)
    calls: list[int] = []
    running_now = [0, 0]  # now, most at once

    @app.task(name="count")
    async def count(n: int) -> int:
        running_now[0] += 1
        running_now[1] = max(running_now)
        await asyncio.sleep(0.05)
        running_now[0] -= 1
        calls.append(n)
        return n

    acked: list[int | None] = []
    done = _Acks.done
    monkeypatch.setattr(_Acks, "done", lambda self, tag: (acked.append(tag), done(self, tag))[1])
    handles = [app.submit("count", [n]) for n in range(8)]
    async with running(app, concurrency=3) as worker:
        for handle in handles:
            assert await handle.result(timeout=20) in range(8)
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="the batch acked")
    assert sorted(calls) == list(range(8))
    assert running_now[1] == 3  # the concurrency bound counts tasks, not messages
    assert len(acked) == 1  # one message, one acknowledgement, after all eight outcomes
    for handle in handles:
        assert _types(app, handle.id) == ["submitted", "started", "succeeded"]


async def test_a_relay_that_publishes_a_page_again_has_every_duplicate_refused(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app, calls = _counting_app(sqlite_url, amqp_url, namespace, work_batch=4)
    handles = [app.submit("count", [n]) for n in range(8)]
    await _relay_once(app)
    # A relay that crashed before recording its position publishes the same page again: here, one
    # that has never recorded one. The same batches, with the same ids, are in the queue twice.
    await _relay_once(app, name="restarted")
    async with running(app, relay=False) as worker:
        for handle in handles:
            assert await handle.result(timeout=20) in range(8)
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="every batch acked")
    assert sorted(calls) == list(range(8))
    for handle in handles:
        assert _types(app, handle.id) == ["submitted", "started", "succeeded"]


async def test_a_malformed_entry_goes_to_the_invalid_queue_and_the_others_run(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    first, last = app.submit("add", [1, 2]), app.submit("add", [3, 4])
    body = b"[%s,%s,%s]" % (work_message_body(_submitted(app, first.id)), b'{"id": "not a task"}',
                           work_message_body(_submitted(app, last.id)))
    async with running(app, relay=False) as worker:
        await _publish(worker, body, WORK_BATCH_TYPE)
        assert await first.result(timeout=20) == 3
        assert await last.result(timeout=20) == 7
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="the batch acked")
    refused = await _queued(amqp_url, Topology(namespace).invalid_queue)
    assert len(refused) == 1
    assert json.loads(refused[0].body) == {"id": "not a task"}
    assert "entry 1 of a work batch" in str(refused[0].headers[REASON_HEADER])
    assert len([r for r in app.store.read_log(0, 100) if r.event.TYPE == "ingress_rejected"]) == 1


async def test_a_cancelled_task_inside_a_batch_does_not_run(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app, calls = _counting_app(sqlite_url, amqp_url, namespace, work_batch=8)
    handles = [app.submit("count", [n]) for n in range(3)]
    app.cancel(handles[1].id, reason="not needed")
    await _relay_once(app)
    messages = await _queued(amqp_url, Topology(namespace).work_queue("default"))
    assert [len(json.loads(m.body)) for m in messages] == [3]  # the cancelled task's entry is in the batch
    async with running(app, relay=False) as worker:
        await _publish(worker, messages[0].body, WORK_BATCH_TYPE)
        assert await handles[0].result(timeout=20) == 0
        assert await handles[2].result(timeout=20) == 2
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="the batch acked")
    assert sorted(calls) == [0, 2]
    assert _types(app, handles[1].id) == ["submitted", "cancelled"]


async def test_single_messages_and_batches_mix_on_one_queue(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    handles = [app.submit("add", [n, n]) for n in range(5)]
    bodies = [work_message_body(_submitted(app, h.id)) for h in handles]
    async with running(app, relay=False) as worker:
        await _publish(worker, bodies[0], WORK_MESSAGE_TYPE)
        await _publish(worker, b"[" + b",".join(bodies[1:4]) + b"]", WORK_BATCH_TYPE)
        await _publish(worker, bodies[4], WORK_MESSAGE_TYPE)
        assert [await h.result(timeout=20) for h in handles] == [0, 2, 4, 6, 8]
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="every message acked")


async def test_a_worker_killed_mid_batch_leaves_every_task_finished_exactly_once(
    process_env: dict[str, str], processes: list[subprocess.Popen[bytes]], tmp_path: Path  # noqa: F811
) -> None:
    app = App(store=process_env["BROKER_Q_STORE"])
    marker = tmp_path / "first-attempt"
    adds = [app.submit("add", [n, 1]) for n in range(2)]
    hanging = app.submit("hang_first_time", kwargs={"marker": str(marker)})
    adds.append(app.submit("add", [2, 1]))
    processes.append(broker_q(process_env, "relay", "--work-batch", "4"))
    first = broker_q(process_env, "worker", "tests.integration.apps:app", "--concurrency", "4")
    processes.append(first)

    def half_done() -> bool:
        return marker.exists() and app.get_task(hanging.id).status is TaskStatus.STARTED and \
            all(app.get_task(h.id).status is TaskStatus.SUCCEEDED for h in adds)

    await wait_for(half_done, timeout=30, what="the batch's short tasks to finish and the long one to start")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    processes.append(broker_q(process_env, "worker", "tests.integration.apps:app"))
    assert (await hanging.result(timeout=60)).startswith("done by")
    history: list[Any] = app.history(hanging.id)
    assert [e.TYPE for e in history] == ["submitted", "started", "started", "succeeded"]  # taken over
    assert history[1].actor != history[2].actor
    for handle in adds:  # redelivered with the batch, recognised by their version, not run again
        assert _types(app, handle.id) == ["submitted", "started", "succeeded"]


@pytest.mark.parametrize(("body", "reason"), [
    (b"[]", "it holds no task"),
    (b"[" * 100_000, "nested too deep"),
    (b'{"id": "an object, not an array"}', "a work batch is a JSON array"),
    (b"[{", "malformed work batch"),
])
async def test_a_batch_body_that_holds_no_task_goes_to_the_invalid_queue_and_the_worker_goes_on(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], body: bytes, reason: str
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    async with running(app) as worker:
        await _publish(worker, body, WORK_BATCH_TYPE)
        await wait_for(lambda: _drained(worker, worker.topology.work_queue("default")), what="the batch refused")
        assert await app.submit("add", [2, 3]).result(timeout=20) == 5  # the worker goes on
    refused = await _queued(amqp_url, Topology(namespace).invalid_queue)
    assert [m.body for m in refused] == [body]
    assert reason in str(refused[0].headers[REASON_HEADER])


async def test_an_entry_that_cannot_be_settled_leaves_the_batch_unacknowledged_after_its_siblings_end(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal of a malformed entry fails (the invalid queue refuses it, the channel is reconnecting):
    the valid entry beside it still runs to its end under the worker's tracking, and the batch is not
    acknowledged, so it comes back rather than being lost."""
    app = _app(sqlite_url, amqp_url, namespace)

    @app.task(name="slow")
    async def slow(n: int) -> int:
        await asyncio.sleep(0.3)
        return n

    handle = app.submit("slow", [7])
    body = b"[%s,%s]" % (b'{"id": "not a task"}', work_message_body(_submitted(app, handle.id)))
    async with running(app, relay=False) as worker:
        async def cannot_refuse(*args: object, **kwargs: object) -> bool:
            raise ConnectionError("the invalid-message queue cannot be reached")

        worker._reject = cannot_refuse  # type: ignore[method-assign]
        await _publish(worker, body, WORK_BATCH_TYPE)
        assert await handle.result(timeout=20) == 7
        await wait_for(lambda: not worker._inflight, what="the batch's handling to end")
        assert any("could not be settled" in r.getMessage() for r in caplog.records)
        assert not await _drained(worker, worker.topology.work_queue("default"))  # the batch is held, not acked
