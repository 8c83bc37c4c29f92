"""The relay: one active per store, the others standing by; every ready task published once."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import aio_pika
import pytest

from broker_q import App, group
from broker_q.amqp.topology import Topology
from broker_q.coordinator import Coordinator
from broker_q.domain import task as domain
from broker_q.domain.events import TaskEvent, TaskSubmitted
from broker_q.relay import Relay
from broker_q.store import EventStore
from broker_q.wire import WORK_BATCH_TYPE, WORK_MESSAGE_TYPE
from tests.helpers import wait_for


async def test_one_relay_publishes_and_a_standby_takes_over_when_it_stops(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=durable_store_url, amqp_url=amqp_url, namespace=namespace)
    topology = Topology(namespace)
    first_stop, second_stop = asyncio.Event(), asyncio.Event()
    first = Relay(app.store, amqp_url, topology, store_url=durable_store_url)
    second = Relay(App(store=durable_store_url).store, amqp_url, topology, store_url=durable_store_url)
    first_task = asyncio.create_task(first.run(first_stop))
    await wait_for(first.active.is_set, what="the first relay to take the lease")
    second_task = asyncio.create_task(second.run(second_stop))
    try:
        for _ in range(5):
            await asyncio.to_thread(app.submit, "t")
        await wait_for(lambda: first.position == app.store.max_position(), what="the first relay to publish")
        assert not second.active.is_set()

        first_stop.set()
        await first_task
        await wait_for(second.active.is_set, timeout=15, what="the standby to take the lease")
        for _ in range(5):
            await asyncio.to_thread(app.submit, "t")
        await wait_for(lambda: second.position == app.store.max_position(), what="the second relay to publish")
    finally:
        first_stop.set()
        second_stop.set()
        await asyncio.gather(first_task, second_task)

    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(topology.work_queue("default"), passive=True)
    assert queue.declaration_result.message_count == 10  # each task once: no relay published twice
    await connection.close()


async def test_a_standby_that_never_got_the_lease_stops_at_once(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url)
    stop_active, stop_standby = asyncio.Event(), asyncio.Event()
    active = Relay(app.store, amqp_url, Topology(namespace), store_url=sqlite_url)
    standby = Relay(app.store, amqp_url, Topology(namespace), store_url=sqlite_url)
    active_task = asyncio.create_task(active.run(stop_active))
    await wait_for(active.active.is_set, what="the lease")
    standby_task = asyncio.create_task(standby.run(stop_standby))
    stop_standby.set()
    await asyncio.wait_for(standby_task, 5)
    stop_active.set()
    await active_task


@pytest.mark.parametrize("work_batch", [1, 4])
async def test_a_work_message_the_broker_returns_is_published_again_not_lost(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], work_batch: int
) -> None:
    """An operator deletes a work queue: the relay must not count the returned message (a single one,
    or a batch) as confirmed."""
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    topology = Topology(namespace)
    stop = asyncio.Event()
    relay = Relay(app.store, amqp_url, topology, store_url=sqlite_url, work_batch=work_batch)
    relay_task = asyncio.create_task(relay.run(stop))
    connection = await aio_pika.connect(amqp_url)
    try:
        await asyncio.to_thread(app.submit, "t")
        await wait_for(lambda: relay.position == app.store.max_position(), what="the first task published")
        channel = await connection.channel()
        await channel.queue_delete(topology.work_queue("default"))
        if work_batch == 1:
            await asyncio.to_thread(app.submit, "t")
        else:  # a group's steps are one append, so one page: one batch of two
            await asyncio.to_thread(app.submit_workflow, group(app.signature("t"), app.signature("t")))
        submitted = [r.event for r in app.store.read_log(0, 100) if isinstance(r.event, TaskSubmitted)]
        second = submitted[1]
        expected_type = WORK_MESSAGE_TYPE if work_batch == 1 else WORK_BATCH_TYPE

        async def second_is_queued() -> bool:
            probe = await connection.channel()
            queued: set[str] = set()
            try:
                queue = await probe.declare_queue(topology.work_queue("default"), passive=True)
                while (message := await queue.get(fail=False)) is not None:  # held until the probe closes
                    if message.type == WORK_BATCH_TYPE:
                        queued.update(entry["id"] for entry in json.loads(message.body))
                    elif message.type == expected_type:
                        queued.add((message.message_id or "").split(":")[0])
            except aio_pika.exceptions.ChannelClosed:
                return False  # not declared again yet
            finally:
                if not probe.is_closed:
                    await probe.close()  # the messages go back to the queue
            return str(second.stream_id) in queued

        await wait_for(second_is_queued, timeout=30, what="the returned task to be published again")
    finally:
        stop.set()
        await relay_task
        await connection.close()


async def test_a_relay_whose_postgresql_lease_connection_dies_stands_down(
    pg_url: str, pg_dsn: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    import psycopg

    app = App(store=pg_url, amqp_url=amqp_url, namespace=namespace)
    topology = Topology(namespace)
    stops = [asyncio.Event(), asyncio.Event()]
    relays = [Relay(App(store=pg_url).store, amqp_url, topology, store_url=pg_url) for _ in stops]
    tasks = [asyncio.create_task(relays[0].run(stops[0]))]
    try:
        await wait_for(relays[0].active.is_set, what="the first relay to take the lease")
        tasks.append(asyncio.create_task(relays[1].run(stops[1])))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            holders = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchall()
            assert holders
            for (pid,) in holders:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await wait_for(lambda: relays[1].active.is_set() and not relays[0].active.is_set(), timeout=20,
                       what="the standby to take over and the first relay to stand down")
        await asyncio.to_thread(app.submit, "t")
        await wait_for(lambda: relays[1].position == app.store.max_position(), what="the new holder to publish")
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks)


def _succeed(store: EventStore, task_id: uuid.UUID) -> None:
    """What a worker appends for a task it ran."""
    state = domain.replay(e for e in store.read_stream(task_id) if isinstance(e, TaskEvent))
    assert state is not None
    started = domain.start(state, worker="worker:test", now=datetime.now(UTC))
    store.append([started, domain.succeed(domain.evolve(state, started), result=None, now=datetime.now(UTC))])


async def test_a_relay_that_relays_again_releases_children_whose_edges_another_relay_stored(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    """Two relays share a store, its lease and its position, each with its own coordinator: while one
    stood by, the other stored the edges of a new child. The parent's success must release it."""
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    store = app.store
    relay = Relay(store, amqp_url, Topology(namespace))

    async def relay_until_caught_up() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(relay.run(stop))
        try:
            await wait_for(lambda: relay.position == store.max_position(), what="the relay to catch up")
        finally:
            stop.set()
            await running

    _succeed(store, app.submit("t").id)
    await relay_until_caught_up()  # a success, and no edge anywhere
    parent = app.submit("t")
    child = app.submit("t", depends_on=[parent])
    records = store.read_log(relay.position, 100)
    Coordinator(store).process(records)  # the other relay's coordinator, under the lease meanwhile
    store.set_position("relay", records[-1].position)
    _succeed(store, parent.id)
    await relay_until_caught_up()
    assert [e.TYPE for e in app.history(child.id)] == ["submitted", "released"]
