"""Helpers for tests: waiting on conditions (never sleep-and-hope) and running broker_q components."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from broker_q import App
from broker_q.amqp.topology import Topology
from broker_q.relay import Relay
from broker_q.worker import Worker


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Wait until ``predicate()`` is true (awaiting it if it returns an awaitable), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running(
    app: App, queues: list[str] | None = None, *, relay: bool = True, **worker_options: Any
) -> AsyncIterator[Worker]:
    """Run a worker (and a relay, unless ``relay=False``) for ``app`` in this event loop."""
    stop = asyncio.Event()
    worker = Worker(app, queues, **worker_options)
    tasks = [asyncio.create_task(worker.run(stop))]
    if relay:
        settings = app.settings
        component = Relay(app.store, settings.amqp_url, Topology(settings.namespace), store_url=settings.store)
        tasks.append(asyncio.create_task(component.run(stop)))
    try:
        await wait_for(lambda: worker.ready.is_set() or any(t.done() for t in tasks), what="the worker to start")
        for task in tasks:
            if task.done():
                task.result()
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
