"""Idle latency of one task, stage by stage: where the milliseconds between submit and handler go.

    python -m bench.peers.stages [--samples 120]

An idle ``broker-q worker`` runs as a process of its own; the relay runs in a thread of this process,
with its ``read_log`` and its work messages' ``basic_publish`` timed (wrapped for this measurement
only). One task at a time, 20 ms apart: the submit's commit, the relay's wake-up, read and publish,
the hop to the worker (up to its ``started`` event's timestamp) and ``started``'s commit up to the
handler's own timestamp. Prints p50 and p90 of each stage, then the floor measured beside it (one
SQLite commit, one RabbitMQ hop: ``bench/e2e.py``'s ``floor_latency``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import aiormq

from bench import e2e
from broker_q import App
from broker_q.amqp.topology import Topology
from broker_q.relay import Relay
from broker_q.store import eventsourcing

STAGES = ["submit: append submitted, commit", "commit -> relay reads", "relay read_log",
          "read -> work message published", "publish -> worker builds started", "started committed -> handler",
          "submit -> handler"]


def instrument(marks: list[tuple[str, float, float]]) -> None:
    read_log = eventsourcing.RecorderEventStore.read_log
    basic_publish = aiormq.Channel.basic_publish

    def timed_read_log(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.time()
        records = read_log(self, *args, **kwargs)
        if records:
            marks.append(("read", start, time.time()))
        return records

    async def timed_basic_publish(self: Any, body: bytes, *args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("exchange", "")).endswith(".work"):
            marks.append(("publish", time.time(), 0.0))
        return await basic_publish(self, body, *args, **kwargs)

    eventsourcing.RecorderEventStore.read_log = timed_read_log  # type: ignore[method-assign]
    aiormq.Channel.basic_publish = timed_basic_publish  # type: ignore[method-assign]


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "broker_q.cli", "worker", "bench.noop_app:app", "--concurrency", "8"]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def caught_up(relay: Relay, app: App, timeout: float = 30) -> None:
    """Wait until the relay has passed what the store holds (the namespace's first events)."""
    deadline = time.monotonic() + timeout
    while relay.position < app.store.max_position() and time.monotonic() < deadline:
        time.sleep(0.05)


async def measure(samples: int) -> list[tuple[float, ...]]:
    marks: list[tuple[str, float, float]] = []
    instrument(marks)
    url, namespace = e2e.store_url("sqlite"), f"bench{uuid.uuid4().hex[:8]}"
    app = App(store=url, namespace=namespace, amqp_url=e2e.AMQP_URL)
    app.store.max_position()
    env = {**os.environ, "BROKER_Q_STORE": url, "BROKER_Q_NAMESPACE": namespace, "BROKER_Q_AMQP_URL": e2e.AMQP_URL,
           "PYTHONPATH": str(e2e.ROOT)}
    worker = start_worker(env)
    relay_loop, stop = asyncio.new_event_loop(), asyncio.Event()
    relay = Relay(App(store=url, namespace=namespace, amqp_url=e2e.AMQP_URL).store, e2e.AMQP_URL,
                  Topology(namespace), store_url=url)
    thread = threading.Thread(target=relay_loop.run_until_complete, args=(relay.run(stop),), daemon=True)
    rows: list[tuple[float, ...]] = []
    try:
        e2e.wait_ready(worker)
        thread.start()
        await asyncio.to_thread(caught_up, relay, app)
        for _ in range(samples + 5):
            marks.clear()
            t0 = time.time()
            handle = app.submit("started_at")
            committed = time.time()
            handler_at = await handle.result(timeout=30)
            started_at = app.history(handle.id)[1].timestamp.timestamp()
            reads = [m for m in marks if m[0] == "read"]
            publishes = [m for m in marks if m[0] == "publish"]
            if reads and publishes:
                read_start, read_end, published = reads[0][1], reads[0][2], publishes[0][1]
                rows.append((committed - t0, read_start - committed, read_end - read_start, published - read_end,
                             started_at - published, handler_at - started_at, handler_at - t0))
            await asyncio.sleep(0.02)  # the worker goes idle again
    finally:
        relay_loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        worker.terminate()
        worker.wait()
        app.close()
        e2e.drop_schema(url)
        await e2e.delete_namespace(namespace)
    return rows[5:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=120)
    options = parser.parse_args()
    rows = asyncio.run(measure(options.samples))
    print(f"{len(rows)} samples, load average {os.getloadavg()[0]:.2f}\n")
    print("| stage | p50 ms | p90 ms |\n|---|---:|---:|")
    for i, name in enumerate(STAGES):
        values = sorted(row[i] * 1000 for row in rows)
        print(f"| {name} | {statistics.median(values):.2f} | {values[int(len(values) * 0.9)]:.2f} |")
    commits, hops = asyncio.run(e2e.floor_latency(100))
    print(f"\nfloor: one SQLite commit p50 {statistics.median(commits):.2f} ms, "
          f"one RabbitMQ hop p50 {statistics.median(hops):.2f} ms")


if __name__ == "__main__":
    main()
