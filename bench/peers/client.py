"""The client side of each system, run by the harness in a process of its own.

    python -m bench.peers.client KIND enqueue N        # prints {"seconds": ..., "cpu_seconds": ...}
    python -m bench.peers.client KIND latency SAMPLES  # prints {"ms": [...]}

KIND is ``broker_q``, ``celery``, ``dramatiq``, ``taskiq`` or ``aio-pika``; queues, stores and the
marks path come from ``BENCH_*`` (and ``BROKER_Q_*``) variables set by the harness.

**enqueue** sends N no-op tasks with nothing consuming them. Connecting and declaring are kept out of
the time: the async clients connect first; the sync ones (Celery, Dramatiq), which connect and declare
on their first send, start the clock after it, so the rate is (N - 1) / time.
**latency** waits until a worker answers (warm-up tasks), then submits one task at a time to an idle
worker: the sample is from just before the submit call to the time the handler wrote into the marks
FIFO. 20 ms pass between samples so that the worker goes idle again.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.peers.marks import RECORD

CHUNK = 500
"""Concurrent submits of the async clients (broker_q group-commits them; aio-pika pipelines confirms)."""
WARM_UP = 5
PAUSE = 0.02


async def sync_sends(send: Callable[[], Any], n: int) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for n sends, scaled from the n - 1 after the first."""
    send()  # connects and declares
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n - 1):
        send()
    scale = n / max(n - 1, 1)
    return (time.perf_counter() - started) * scale, (time.process_time() - cpu) * scale


async def async_sends(submit: Callable[[], Awaitable[Any]], n: int) -> tuple[float, float]:
    """(seconds, CPU seconds of this process, all its threads) for n submits, CHUNK at a time."""
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, CHUNK):
        await asyncio.gather(*(submit() for _ in range(min(CHUNK, n - i))))
    return time.perf_counter() - started, time.process_time() - cpu


class Fifo:
    """The read end of the marks FIFO (held open read-write, so it never sees end-of-file)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def drain(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            os.read(self.fd, 4096)

    def next(self, timeout: float) -> float:
        if not select.select([self.fd], [], [], timeout)[0]:
            raise TimeoutError(f"no task ran within {timeout} s")
        (stamp,) = RECORD.unpack(os.read(self.fd, RECORD.size))
        return float(stamp)


async def latencies(submit: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    fifo = Fifo(os.environ["BENCH_MARKS"])
    for _ in range(WARM_UP):
        await submit()
        fifo.next(timeout=120)  # the workers are up and their first task is behind them
    result = []
    for _ in range(samples):
        await asyncio.sleep(PAUSE)
        fifo.drain()
        t0 = time.time()
        await submit()
        result.append((fifo.next(timeout=30) - t0) * 1000)
    return result


def as_async(send: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def submit() -> Any:
        return send()
    return submit


async def broker_q(action: str, n: int) -> Any:
    from bench.peers.apps.broker_q_app import app

    app.store.max_position()  # opens the store and creates its tables outside the measurement
    try:
        submit = lambda: app.submit_async("mark")  # noqa: E731
        return await async_sends(submit, n) if action == "enqueue" else await latencies(submit, n)
    finally:
        app.close()


async def celery(action: str, n: int) -> Any:
    from bench.peers.apps.celery_app import marked

    return await sync_sends(marked.delay, n) if action == "enqueue" else await latencies(as_async(marked.delay), n)


async def dramatiq(action: str, n: int) -> Any:
    from bench.peers.apps.dramatiq_app import broker, marked

    try:
        return await sync_sends(marked.send, n) if action == "enqueue" else await latencies(as_async(marked.send), n)
    finally:
        broker.close()


async def taskiq(action: str, n: int) -> Any:
    from bench.peers.apps.taskiq_app import broker, marked

    await broker.startup()
    try:
        return await async_sends(marked.kiq, n) if action == "enqueue" else await latencies(marked.kiq, n)
    finally:
        await broker.shutdown()


async def aio_pika(action: str, n: int) -> Any:
    import aio_pika

    connection = await aio_pika.connect(os.environ["BENCH_AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    queue = os.environ["BENCH_QUEUE"]
    await channel.declare_queue(queue, durable=True)

    async def submit() -> Any:
        message = aio_pika.Message(b'{"task":"mark"}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        return await channel.default_exchange.publish(message, routing_key=queue)

    try:
        return await async_sends(submit, n) if action == "enqueue" else await latencies(submit, n)
    finally:
        await connection.close()


CLIENTS = {"broker_q": broker_q, "celery": celery, "dramatiq": dramatiq, "taskiq": taskiq, "aio-pika": aio_pika}


def main() -> None:
    kind, action, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = asyncio.run(CLIENTS[kind](action, n))
    print(json.dumps({"seconds": result[0], "cpu_seconds": result[1]} if action == "enqueue" else {"ms": result}))


if __name__ == "__main__":
    main()
