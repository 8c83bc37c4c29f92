"""A client that knows only docs/wire-format.md: plain aio-pika, no broker_q code on the sending side.

broker_q code is used only to run the worker and relay under test and to read the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker_q import App, TaskCancelled
from broker_q.domain.events import Event, IngressRejected, TaskStarted, TaskSubmitted
from broker_q.domain.task import task_id_for
from tests.helpers import running, wait_for

QUEUE = "default"
MAX_MESSAGE_BYTES = 1000
REASON_HEADER = "x-broker-q-reason"


@pytest.fixture
def app(sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]) -> App:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace, max_message_bytes=MAX_MESSAGE_BYTES)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    return app


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()  # publisher confirms: on by default


async def publish(
    channel: AbstractChannel,
    namespace: str,
    body: bytes | dict[str, Any],
    *,
    routing_key: str = QUEUE,
    message_id: str | None = None,
    content_type: str | None = "application/json",
) -> str:
    """Publish ``body`` (a dict is sent as JSON) to the ingress exchange the way any client would."""
    message_id = message_id or uuid.uuid4().hex
    exchange = await channel.get_exchange(f"{namespace}.ingress", ensure=True)
    await exchange.publish(
        aio_pika.Message(
            json.dumps(body).encode() if isinstance(body, dict) else body,
            content_type=content_type,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            app_id="foreign-test",
        ),
        routing_key=routing_key,
    )
    return message_id


async def log(app: App) -> list[Event]:
    records = await asyncio.to_thread(app.store.read_log, 0, 100_000)
    return [record.event for record in records]


async def submitted(app: App, message_id: str) -> TaskSubmitted:
    """The ``submitted`` event recorded for the message ``message_id``, once it is there."""
    found: list[TaskSubmitted] = []

    async def recorded() -> bool:
        found[:] = [e for e in await log(app) if isinstance(e, TaskSubmitted) and e.idempotency_key == message_id]
        return bool(found)

    await wait_for(recorded, what=f"a submitted event for message {message_id}")
    assert len(found) == 1
    return found[0]


async def invalid_messages(
    channel: AbstractChannel, namespace: str, count: int
) -> dict[str, AbstractIncomingMessage]:
    """Take ``count`` messages from the invalid queue, by message id."""
    queue = await channel.declare_queue(f"{namespace}.invalid", passive=True)
    taken: dict[str, AbstractIncomingMessage] = {}

    async def got_all() -> bool:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            taken[str(message.message_id)] = message
        return len(taken) >= count

    await wait_for(got_all, what=f"{count} message(s) in {namespace}.invalid")
    return taken


async def rejections(app: App, count: int) -> dict[str | None, IngressRejected]:
    """The ``ingress_rejected`` events in the log, by message id, once there are ``count`` of them."""
    found: dict[str | None, IngressRejected] = {}

    async def recorded() -> bool:
        found.update((e.message_id, e) for e in await log(app) if isinstance(e, IngressRejected))
        return len(found) >= count

    await wait_for(recorded, what=f"{count} ingress_rejected event(s)")
    return found


async def assert_a_valid_envelope_still_runs(app: App, channel: AbstractChannel, namespace: str) -> TaskSubmitted:
    message_id = await publish(channel, namespace, {"task": "add", "args": [20, 22]})
    event = await submitted(app, message_id)
    assert await app.handle(event.stream_id).result(timeout=10) == 42
    return event


# (a) ------------------------------------------------------------------------------------------


async def test_the_minimum_envelope_is_recorded_and_run(app: App, channel: AbstractChannel, namespace: str) -> None:
    async with running(app):
        message_id = await publish(channel, namespace, {"task": "add", "args": [1, 2], "kwargs": {}})
        event = await submitted(app, message_id)
        assert await app.handle(event.stream_id).result(timeout=10) == 3
    # Sent plain, as the wire format says; sealed by the worker before it was recorded.
    assert (event.task, event.queue, event.args, event.kwargs) == ("add", QUEUE, [], {})
    assert event.sealed_arguments is not None
    assert app.payloads.open_arguments(event.tenant, event.stream_id, event.sealed_arguments) == ([1, 2], {})
    assert event.actor == "amqp:foreign-test"
    assert [e.TYPE for e in app.history(event.stream_id)] == ["submitted", "started", "succeeded"]


async def test_an_envelope_without_content_type_and_with_only_kwargs_runs(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    async with running(app):
        message_id = await publish(channel, namespace, b'{"task": "add", "kwargs": {"x": 2, "y": 3}}',
                                   content_type=None)
        event = await submitted(app, message_id)
        assert await app.handle(event.stream_id).result(timeout=10) == 5


# (b) ------------------------------------------------------------------------------------------

REFUSED: dict[str, tuple[bytes, str | None, tuple[str, ...]]] = {
    # case: (body, content type, words the reason must contain)
    "not-json": (b"this is not JSON", "application/json", ("invalid task envelope", "json")),
    "no-task": (b'{"args": [1, 2]}', "application/json", ("invalid task envelope", "task", "required")),
    "unknown-task": (b'{"task": "nope", "args": []}', "application/json", ("unknown task", "nope")),
    "arguments-do-not-fit": (b'{"task": "add", "args": [1]}', "application/json", ("arguments", "add", "'y'")),
    "arguments-of-the-wrong-types": (b'{"task": "add", "args": ["a", 1]}', "application/json",
                                     ("arguments do not fit", "add", "argument 'x' must be int")),
    "extra-field": (b'{"task": "add", "args": [1, 2], "colour": "red"}', "application/json",
                    ("colour", "not permitted")),
    "pickle-content-type": (b'{"task": "add", "args": [1, 2]}', "application/x-python-serialize",
                            ("content type", "application/x-python-serialize")),
    "naive-eta": (b'{"task": "add", "args": [1, 2], "eta": "2030-01-01T00:00:00"}', "application/json",
                  ("eta", "timezone")),
    "eta-and-countdown": (b'{"task": "add", "args": [1, 2], "eta": "2030-01-01T00:00:00+00:00", "countdown": 5}',
                          "application/json", ("eta or countdown, not both",)),
    "negative-countdown": (b'{"task": "add", "args": [1, 2], "countdown": -1}', "application/json",
                           ("countdown", "greater than or equal to 0")),
    "retry-by-bare-class-name": (b'{"task": "add", "args": [1, 2], "retry": {"retry_on": ["ValueError"]}}',
                                 "application/json", ("retry.retry_on", "pattern")),
    "retry-both-ways": (b'{"task": "add", "args": [1, 2], "retry": {"backoff": 1, "colour": "red"}}',
                        "application/json", ("retry.colour", "not permitted")),
    "a-schedules-idempotency-key": (b'{"task": "add", "args": [1, 2], "idempotency_key": "schedule:x:2030"}',
                                    "application/json", ("idempotency key", "'schedule:'", "broker_q's own")),
    "over-the-limit": (json.dumps({"task": "add", "args": ["x" * MAX_MESSAGE_BYTES, 1]}).encode(),
                       "application/json", ("over the limit", str(MAX_MESSAGE_BYTES))),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_bad_message_is_moved_to_the_invalid_queue_and_audited(
    app: App, channel: AbstractChannel, namespace: str, case: str
) -> None:
    body, content_type, words = REFUSED[case]
    async with running(app):
        message_id = await publish(channel, namespace, body, content_type=content_type)
        refused = (await invalid_messages(channel, namespace, 1))[message_id]
        event = (await rejections(app, 1))[message_id]
        valid = await assert_a_valid_envelope_still_runs(app, channel, namespace)

    reason = str((refused.headers or {})[REASON_HEADER])
    for word in words:
        assert word.lower() in reason.lower(), f"{case}: {word!r} not in reason {reason!r}"
    assert refused.body == body
    assert (refused.headers or {})["x-broker-q-source"] == QUEUE
    assert event.reason == reason
    assert event.queue == QUEUE
    assert event.size == len(body)
    assert event.sha256 == hashlib.sha256(body).hexdigest()
    assert not [e for e in await log(app) if isinstance(e, TaskSubmitted) and e.idempotency_key == message_id]
    assert {e.stream_id for e in await log(app) if isinstance(e, TaskStarted)} == {valid.stream_id}  # no handler ran


async def test_the_worker_keeps_going_after_every_kind_of_bad_message(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    async with running(app):
        sent = {case: await publish(channel, namespace, body, content_type=content_type)
                for case, (body, content_type, _) in REFUSED.items()}
        refused = await invalid_messages(channel, namespace, len(REFUSED))
        events = await rejections(app, len(REFUSED))
        await assert_a_valid_envelope_still_runs(app, channel, namespace)

    assert set(refused) == set(sent.values())
    assert set(events) == set(sent.values())
    for case, message_id in sent.items():
        reason = str((refused[message_id].headers or {})[REASON_HEADER])
        assert all(word.lower() in reason.lower() for word in REFUSED[case][2]), f"{case}: {reason!r}"


# (c) ------------------------------------------------------------------------------------------


async def test_a_routing_key_that_no_queue_serves_is_refused_with_that_key(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    async with running(app):
        message_id = await publish(channel, namespace, {"task": "add", "args": [1, 2]}, routing_key="nowhere")
        refused = (await invalid_messages(channel, namespace, 1))[message_id]
        event = (await rejections(app, 1))[message_id]
        await assert_a_valid_envelope_still_runs(app, channel, namespace)

    reason = str((refused.headers or {})[REASON_HEADER])
    assert "nowhere" in reason
    assert "routing key" in reason
    assert event.reason == reason
    assert event.queue == "nowhere"


# (d) ------------------------------------------------------------------------------------------


async def test_the_same_message_id_twice_is_one_task(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    message_id = f"order-{uuid.uuid4().hex}"
    async with running(app):
        await publish(channel, namespace, {"task": "add", "args": [1, 2]}, message_id=message_id)
        await publish(channel, namespace, {"task": "add", "args": [1, 2]}, message_id=message_id)
        event = await submitted(app, message_id)
        assert await app.handle(event.stream_id).result(timeout=10) == 3

        async def both_taken() -> bool:
            declared = await channel.declare_queue(f"{namespace}.ingress.{QUEUE}", passive=True)
            return declared.declaration_result.message_count == 0

        await wait_for(both_taken, what="both messages to be consumed")

    # After a graceful stop every message taken is acknowledged: none came back to the queue.
    declared = await channel.declare_queue(f"{namespace}.ingress.{QUEUE}", passive=True)
    assert declared.declaration_result.message_count == 0
    events = await log(app)
    assert [e for e in events if isinstance(e, TaskSubmitted)] == [event]
    assert not [e for e in events if isinstance(e, IngressRejected)]
    assert [e.TYPE for e in app.history(event.stream_id)] == ["submitted", "started", "succeeded"]


async def test_the_idempotency_key_in_the_envelope_wins_over_the_message_id(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    key = f"order-{uuid.uuid4().hex}"
    async with running(app):
        for _ in range(2):
            await publish(channel, namespace, {"task": "add", "args": [1, 2], "idempotency_key": key})
        submitted_event = await submitted(app, key)
        assert await app.handle(submitted_event.stream_id).result(timeout=10) == 3
        await assert_a_valid_envelope_still_runs(app, channel, namespace)
    assert len([e for e in await log(app) if isinstance(e, TaskSubmitted)]) == 2  # the key's and the check's


# the events exchange, as documented ----------------------------------------------------------


async def test_a_foreign_consumer_follows_a_task_on_the_events_exchange(
    app: App, channel: AbstractChannel, namespace: str, amqp_cleanup: list[str]
) -> None:
    received: list[tuple[str, dict[str, Any]]] = []  # (routing key, event), in arrival order
    async with running(app):
        events_queue = await channel.declare_queue(f"{namespace}.test-events")
        amqp_cleanup.append(events_queue.name)
        await events_queue.bind(f"{namespace}.events", routing_key="*.task.#")
        message_id = await publish(channel, namespace, {"task": "add", "args": [1, 2]})
        event = await submitted(app, message_id)
        await app.handle(event.stream_id).result(timeout=10)

        async def three_received() -> bool:
            message = await events_queue.get(no_ack=True, fail=False)
            if message is not None:
                assert message.type == "broker_q.events.v1"
                assert message.content_type == "application/json"
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                body = json.loads(message.body)
                assert isinstance(body, list), "an events message is a JSON array of events"
                received.extend((str(message.routing_key), item) for item in body)
            return len(received) >= 3

        await wait_for(three_received, what="the task's three events on the events exchange")

    received.sort(key=lambda item: item[1]["position"])
    assert [key for key, _ in received] == ["default.task.submitted", "default.task.started",
                                            "default.task.succeeded"]
    assert all(set(item) == {"position", "stream_id", "version", "topic", "data"} for _, item in received)
    assert [(item["stream_id"], item["version"]) for _, item in received] == [
        (str(event.stream_id), version) for version in (1, 2, 3)]
    assert [item["topic"] for _, item in received] == ["broker_q.task.submitted", "broker_q.task.started",
                                                       "broker_q.task.succeeded"]
    # The payloads travel sealed, as they are stored: metadata readable, arguments and result not.
    submitted_data, succeeded_data = received[0][1]["data"], received[2][1]["data"]
    assert (submitted_data["task"], submitted_data["args"], submitted_data["kwargs"]) == ("add", [], {})
    assert app.payloads.open_arguments("default", event.stream_id, submitted_data["sealed_arguments"]) == ([1, 2], {})
    assert succeeded_data["result"] is None
    assert app.payloads.open_result("default", event.stream_id, succeeded_data["sealed_result"]) == 3


async def test_an_envelope_with_a_countdown_and_a_parent_waits_for_both(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    async with running(app):
        first = await submitted(app, await publish(channel, namespace, {"task": "add", "args": [1, 2]}))
        later = await submitted(app, await publish(channel, namespace, {
            "task": "add", "args": [3, 4], "countdown": 0.5, "depends_on": [str(first.stream_id)]}))
        assert later.depends_on == [first.stream_id]
        assert later.due_at is not None
        assert (later.due_at - later.timestamp).total_seconds() == pytest.approx(0.5, abs=0.01)
        assert await app.handle(later.stream_id).result(timeout=10) == 7
        started = app.history(later.stream_id)[2]
        assert started.TYPE == "started"
        assert started.timestamp >= later.due_at
        orphan = await submitted(app, await publish(channel, namespace, {
            "task": "add", "args": [1, 1], "depends_on": [str(uuid.uuid4())]}))
        with pytest.raises(TaskCancelled, match="does not exist"):
            await app.handle(orphan.stream_id).result(timeout=10)


async def test_envelopes_that_wait_for_each_other_are_cancelled_not_blocked_forever(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    """Ids come from idempotency keys, so a client can name a task before it exists: two tasks that
    wait for each other. The first recorded names a parent that the coordinator finds missing or
    recorded after it (depending on when it reads the first), so both are cancelled."""
    tenant = app.settings.tenant
    first_id, second_id = task_id_for(tenant, "ring-1"), task_id_for(tenant, "ring-2")
    async with running(app):
        for key, parent in (("ring-1", second_id), ("ring-2", first_id)):
            await publish(channel, namespace, {"task": "add", "args": [1, 1], "idempotency_key": key,
                                               "depends_on": [str(parent)]})
        for task_id in (first_id, second_id):
            with pytest.raises(TaskCancelled, match="upstream_failed"):
                await app.handle(task_id).result(timeout=10)
    assert app.get_task(first_id).cancel_reason in (f"upstream_failed: parent {second_id} was recorded after this task",
                                                     f"upstream_failed: parent {second_id} does not exist")
    assert app.get_task(second_id).cancel_reason == f"upstream_failed: parent {first_id} was cancelled"


async def test_an_envelopes_retry_options_are_recorded_with_its_task(
    app: App, channel: AbstractChannel, namespace: str
) -> None:
    async with running(app):
        event = await submitted(app, await publish(channel, namespace, {
            "task": "add", "args": [1, 2],
            "retry": {"max_attempts": 3, "backoff": 2, "retry_on": ["builtins.OSError"]}}))
        assert await app.handle(event.stream_id).result(timeout=10) == 3
    assert (event.max_attempts, event.retry) == (3, {"backoff": 2.0, "retry_on": ["builtins.OSError"]})


async def test_envelopes_among_a_work_backlog_are_each_acknowledged_once_and_none_is_lost(
    app: App, channel: AbstractChannel, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Work messages (consumed through aiormq directly) and envelopes (through aio-pika) arrive at
    the same worker together: each is acknowledged once, after its record, on the channel it came
    from. An acknowledgement of several messages at once that took in an envelope not yet recorded,
    or a second acknowledgement of a tag already acknowledged (RabbitMQ closes the channel for it),
    shows here as a lost acknowledgement or a channel closed under the worker."""
    caplog.set_level(logging.WARNING)
    async with running(app):
        backlog = asyncio.gather(*(app.submit_async("add", [i, 1]) for i in range(300)))
        message_ids = [await publish(channel, namespace, {"task": "add", "args": [i, 1000]}) for i in range(100)]
        handles = await backlog
        envelopes = [await submitted(app, message_id) for message_id in message_ids]
        results = await asyncio.gather(*(handle.result(timeout=60) for handle in handles),
                                       *(app.handle(event.stream_id).result(timeout=60) for event in envelopes))
        assert results == [i + 1 for i in range(300)] + [i + 1000 for i in range(100)]
    problems = [r.getMessage() for r in caplog.records
                if "acknowledgement lost" in r.getMessage() or "PRECONDITION_FAILED" in r.getMessage()
                or "unknown delivery tag" in r.getMessage()]
    assert problems == []
    for queue in (f"{namespace}.work.{QUEUE}", f"{namespace}.ingress.{QUEUE}"):
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 0, queue
