"""The relay: one active per store, the others standing by; every ready task published once."""

from __future__ import annotations

import asyncio

import aio_pika

from broker_q import App
from broker_q.amqp.topology import Topology
from broker_q.relay import Relay
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
