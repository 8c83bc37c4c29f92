"""broker_q under faults, against the real RabbitMQ, SQLite and PostgreSQL, with broker_q as processes.

Tests marked ``disruptive`` stop a shared service (RabbitMQ or PostgreSQL) for a few seconds and
always start it again, and wait until it answers, before they end: other tests running on the
machine meanwhile may fail. Deselect them with ``-m "not disruptive"``. The other tests here only
kill processes of their own.

``bench/soak.py`` runs the same faults for longer (the code shared with it is ``tests/faults.py``).
An exception leaking from a middleware hook is covered in test_resilience.py (it needs an app of its own).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from broker_q import App
from broker_q.amqp.topology import REASON_HEADER, Topology
from broker_q.domain.events import TaskSubmitted
from tests.faults import (
    POISON_EXTRA,
    Processes,
    Report,
    Tally,
    drain,
    is_final_failure,
    kill_workers,
    postgres_stopped,
    process_env,
    rabbitmq_stopped,
    report,
    slow_calls,
    submit_paced,
)
from tests.helpers import running, wait_for
from tests.integration import test_foreign_client as foreign

OUTAGE_SECONDS = 3.0
"""How long a stopped service stays down: long enough for every component to notice, short for others."""


@pytest.fixture
def processes() -> Iterator[list[Processes]]:
    made: list[Processes] = []
    yield made
    for group in made:
        group.stop_all()


def start(store: str, amqp_url: str, namespace: str, tmp_path: Path,
          processes: list[Processes]) -> tuple[App, Tally, Processes]:
    app = App(store=store, amqp_url=amqp_url, namespace=namespace)
    app.store.max_position()  # creates the tables before the processes race to
    group = Processes(process_env(store, amqp_url, namespace), tmp_path)
    processes.append(group)
    return app, Tally(app), group


def assert_every_task_succeeded_once(result: Report, group: Processes) -> None:
    context = f"{result.lines()}\n{group.logs_text()}"
    assert result.lost == [], context
    assert result.succeeded == result.submitted, context
    assert result.duplicate_successes == [], context
    assert result.unrecorded_invocations == {}, context


async def queue_depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        return int(declared.declaration_result.message_count or 0)


# 1. workers SIGKILLed mid-task ----------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_workers_killed_mid_task_lose_nothing_and_record_one_success_per_task(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path,
    processes: list[Processes],
) -> None:
    app, tally, group = start(sqlite_url, amqp_url, namespace, tmp_path, processes)
    log = tmp_path / "invocations.log"
    keys: dict[str, uuid.UUID] = {}
    relay = await group.relay()
    survivor = await group.worker()
    submitting = asyncio.create_task(submit_paced(app, slow_calls("kill", 2000, log), 15.0, keys))
    ends = [float("inf")]
    submitting.add_done_callback(lambda _: ends.__setitem__(0, time.monotonic() + 10.0))
    # Kills go on a while after the last submission, while its tasks still run: on a loaded machine
    # a new worker takes seconds to start, and the submission window alone may hold too few rounds.
    kills = await kill_workers(group, tally, lambda: submitting.done() and time.monotonic() > ends[0], kills=5)
    await submitting
    result = report(tally, keys, log, await drain(tally, keys, timeout=60))
    result.faults = kills
    print("\n".join(result.lines()))

    assert kills >= 4, f"only {kills} kills landed mid-task during the run"
    assert relay.poll() is None, group.logs_text()
    assert survivor.poll() is None, group.logs_text()
    assert_every_task_succeeded_once(result, group)
    assert result.takeovers >= 1, f"no kill landed mid-task: {result.lines()}"
    for task_id in keys.values():
        history = tally.history[task_id]
        attempts = [e.attempt for e in history if e.TYPE == "started"]  # type: ignore[attr-defined]
        assert [e.TYPE for e in history].count("succeeded") == 1
        assert attempts == list(range(1, len(attempts) + 1)), history


# 2. RabbitMQ stopped and started --------------------------------------------------------------


@pytest.mark.disruptive
@pytest.mark.timeout(150)
async def test_rabbitmq_stopped_mid_run_loses_nothing_and_everyone_reconnects(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path,
    processes: list[Processes],
) -> None:
    app, tally, group = start(sqlite_url, amqp_url, namespace, tmp_path, processes)
    log = tmp_path / "invocations.log"
    keys: dict[str, uuid.UUID] = {}
    await group.relay()
    await group.worker()
    before = asyncio.create_task(submit_paced(app, slow_calls("before", 300, log), 2.0, keys))
    await wait_for(lambda: tally.refresh().running_on(group.alive()[-1].pid), timeout=30,
                   what="a task running when the broker stops")
    async with rabbitmq_stopped(amqp_url):
        # The store records submits while the broker is down; the relay publishes them later.
        await submit_paced(app, slow_calls("during", 300, log), 0.0, keys)
        await before
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself
    await submit_paced(app, slow_calls("after", 300, log), 1.0, keys)
    result = report(tally, keys, log, await drain(tally, keys, timeout=90))
    print("\n".join(result.lines()))

    assert len(group.alive()) == 2, f"a process exited:\n{group.logs_text()}"
    assert_every_task_succeeded_once(result, group)
    topology = Topology(namespace)
    assert await queue_depth(amqp_url, topology.work_queue("default")) == 0
    assert await queue_depth(amqp_url, topology.invalid_queue) == 0


# 3. the PostgreSQL store stopped and started --------------------------------------------------


@pytest.mark.disruptive
@pytest.mark.timeout(150)
async def test_postgres_stopped_mid_run_loses_nothing_and_appends_are_retried(
    pg_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path,
    processes: list[Processes],
) -> None:
    app, tally, group = start(pg_url, amqp_url, namespace, tmp_path, processes)
    log = tmp_path / "invocations.log"
    keys: dict[str, uuid.UUID] = {}
    await group.relay()
    await group.worker()
    before = asyncio.create_task(submit_paced(app, slow_calls("before", 300, log), 1.5, keys))
    await wait_for(lambda: tally.refresh().running_on(group.alive()[-1].pid), timeout=30,
                   what="a task running when the store stops")
    async with postgres_stopped():
        # A submit while the store is down blocks (eventsourcing retries its connection) and is
        # recorded once the store is back; one that gives up first raises StoreUnavailable and is
        # retried by submit_paced under its idempotency key.
        during = asyncio.create_task(submit_paced(app, slow_calls("during", 100, log), 0.0, keys))
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself: workers hold their outcomes unacked
        assert not during.done(), "a submit returned while the store was down"
    await asyncio.wait_for(asyncio.gather(before, during), 60)
    await submit_paced(app, slow_calls("after", 300, log), 1.0, keys)
    result = report(tally, keys, log, await drain(tally, keys, timeout=90))
    print("\n".join(result.lines()))

    assert len(group.alive()) == 2, f"a process exited:\n{group.logs_text()}"
    assert_every_task_succeeded_once(result, group)
    assert await queue_depth(amqp_url, Topology(namespace).work_queue("default")) == 0


# 4. handler failures --------------------------------------------------------------------------


FAILING: dict[str, tuple[str, list[object], str, str]] = {
    # case: (task, args, error type, words of the message)
    "raises": ("raises", ["k"], "ValueError", "refused k"),
    "returns-a-set": ("returns_set", ["k"], "SerializationError", "the result cannot be recorded"),
    "returns-an-object": ("returns_object", ["k"], "SerializationError", "the result cannot be recorded"),
    # Submitted by a client without the handler registered, so unchecked: the worker refuses to call it.
    "wrong-argument-types": ("add", ["a", 1], "ValidationError", "argument 'x' must be int"),
    "no-handler": ("nobody.handles.this", [], "LookupError", "no handler is registered"),
}


@pytest.mark.timeout(120)
async def test_handler_failures_are_recorded_and_the_worker_process_keeps_going(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path,
    processes: list[Processes],
) -> None:
    """Extends test_worker's in-process test: the same failures in bulk, interleaved with good tasks,
    in a worker process that must still be the one running the good tasks sent after them."""
    app, tally, group = start(sqlite_url, amqp_url, namespace, tmp_path, processes)
    log = tmp_path / "invocations.log"
    await group.relay()
    worker = await group.worker()
    failing: dict[uuid.UUID, str] = {}
    good: dict[str, uuid.UUID] = {}
    for round_ in range(20):
        for case, (task, args, _, _) in FAILING.items():
            failing[(await app.submit_async(task, args)).id] = case
        await submit_paced(app, slow_calls(f"between-{round_}", 2, log), 0.0, good)
    await wait_for(lambda: not tally.refresh().not_final(failing), timeout=60, what="every failure recorded")
    after: dict[str, uuid.UUID] = {}
    await submit_paced(app, slow_calls("after", 50, log), 0.0, after)
    good.update(after)
    result = report(tally, good, log, await drain(tally, good, timeout=60))

    assert worker.poll() is None, group.logs_text()
    assert_every_task_succeeded_once(result, group)
    for task_id, case in failing.items():
        _, _, error_type, words = FAILING[case]
        last = tally.history[task_id][-1]
        assert is_final_failure(last.TYPE), (case, last)
        failure = tally.failure(task_id)
        assert (failure.error_type, words in failure.message) == (error_type, True), (case, failure)
    assert all(f":{worker.pid}:" in tally.history[t][1].actor for t in after.values())


# 5. poison messages ---------------------------------------------------------------------------


async def test_poison_messages_are_refused_once_each_and_never_redelivered(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str],
) -> None:
    """Every bad message of test_foreign_client (arguments of the wrong types among them) and a few
    more, sent in one burst with a malformed work message: each reaches the invalid queue once with
    its reason and is audited once, and none becomes a task; no queue keeps anything (nothing was
    requeued to loop); a valid task sent after them all runs."""
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace,
              max_message_bytes=foreign.MAX_MESSAGE_BYTES)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    topology = Topology(namespace)
    poison = {**foreign.REFUSED, **POISON_EXTRA}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        async with running(app) as worker:
            sent = {await foreign.publish(channel, namespace, body, content_type=content_type): case
                    for case, (body, content_type, _) in poison.items()}
            work_exchange = await channel.get_exchange(worker.topology.work_exchange)
            bad_work = uuid.uuid4().hex
            await work_exchange.publish(aio_pika.Message(b"{not json", message_id=bad_work), routing_key="default")
            valid = await foreign.assert_a_valid_envelope_still_runs(app, channel, namespace)
            await foreign.rejections(app, len(sent) + 1)
        # The worker stopped: whatever it had taken and not acknowledged is back in its queue now.
        for queue in (topology.ingress_queue("default"), topology.work_queue("default"), topology.unrouted):
            assert await queue_depth(amqp_url, queue) == 0, queue
        invalid = await channel.declare_queue(topology.invalid_queue, passive=True)
        refused: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        while (message := await invalid.get(no_ack=True, fail=False)) is not None:
            assert message.message_id not in refused, f"{message.message_id} refused twice"
            refused[str(message.message_id)] = message

    assert set(refused) == {*sent, bad_work}
    tally = Tally(app).refresh()
    assert sorted(str(e.message_id) for e in tally.rejected) == sorted(refused)
    for message_id, case in sent.items():
        reason = str((refused[message_id].headers or {})[REASON_HEADER])
        assert all(word.lower() in reason.lower() for word in poison[case][2]), f"{case}: {reason!r}"
    assert "malformed work message" in str(refused[bad_work].headers[REASON_HEADER])
    submitted_keys = {e.idempotency_key for h in tally.history.values() for e in h if isinstance(e, TaskSubmitted)}
    assert not submitted_keys & set(sent)
    assert set(tally.history) == {valid.stream_id}  # the only task, and the only handler that ran


@pytest.mark.disruptive
@pytest.mark.timeout(90)
async def test_a_worker_told_to_stop_while_rabbitmq_is_down_finishes_its_task_within_the_grace(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """SIGTERM during a broker outage: cancelling the consumers cannot reach RabbitMQ, and must not
    hold the worker back from waiting for its running task and stopping."""
    from broker_q.relay import Relay
    from broker_q.worker import Worker

    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="nap")
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    stop, relay_stop = asyncio.Event(), asyncio.Event()
    worker = Worker(app, shutdown_grace=20)
    relay = Relay(app.store, amqp_url, Topology(namespace), store_url=sqlite_url)
    working = asyncio.create_task(worker.run(stop))
    relaying = asyncio.create_task(relay.run(relay_stop))
    try:
        await wait_for(lambda: worker.ready.is_set(), what="the worker to consume")
        handle = await app.submit_async("nap", [2.0])
        await wait_for(lambda: [e.TYPE for e in app.history(handle.id)][-1] == "started", timeout=20,
                       what="the task to start")
        async with rabbitmq_stopped(amqp_url):
            stop.set()
            began = time.monotonic()
            done, _ = await asyncio.wait([working], timeout=15)
            assert done, "the worker did not stop while RabbitMQ was down"
            assert time.monotonic() - began < 15
        assert [e.TYPE for e in app.history(handle.id)][-1] == "succeeded"  # finished within the grace
    finally:
        stop.set()
        relay_stop.set()
        await asyncio.wait([working, relaying], timeout=30)
        app.close()
