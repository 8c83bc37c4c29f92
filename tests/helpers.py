"""Helpers for tests: waiting on conditions (never sleep-and-hope) and running broker_q components."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from broker_q import App
from broker_q.amqp.topology import Topology
from broker_q.relay import Relay
from broker_q.store import EventStore
from broker_q.worker import Worker
from projections.database import open_view_databases
from projections.runner import BATCH_SIZE, runners
from projections.views import VIEWS


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
        component = Relay(app.store, settings.amqp_url, Topology(settings.namespace), store_url=settings.store,
                          work_batch=settings.work_batch)
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


def catch_up_views(store: EventStore, store_url: str, *, batch_size: int = BATCH_SIZE) -> None:
    """Bring every view of the store at ``store_url`` up to the store's head, a runner per views database
    (as ``broker-q projections run`` does, in one process)."""
    with open_view_databases(store_url, VIEWS) as databases:
        for runner in runners(store, databases, batch_size=batch_size):
            try:
                runner.setup()
                runner.catch_up()
            finally:
                runner.close()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone since the directory was listed
        # The command name, in parentheses, may hold spaces: the fields after it are split safely.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
