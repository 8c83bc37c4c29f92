"""End-to-end throughput and latency of broker_q beside raw aio-pika, measured in the same run.

broker_q: a fresh store and namespace per run; ``broker-q run bench.noop_app:app`` (relay and worker
in one process) is started and ready; then this process submits N no-op tasks (async submits,
group-committed) and the clock stops when the store holds every task's ``succeeded`` event, i.e.
every state change of every task is durably recorded. Raw aio-pika: one process publishes N
persistent messages with publisher confirms while a consumer on another channel acks each one;
the clock stops at the last ack. Latency: with an idle worker, one task at a time, from the call
to ``submit`` to the moment the handler starts (the handler returns ``time.time()``).

Usage: python bench/e2e.py [--tasks N] [--runs R] [--subjects sqlite:split,sqlite:run,postgres:split]
       [--latency-samples K]
Prints a Markdown table (medians over runs) to paste into bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BROKER_Q_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_DSN = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
sys.path.insert(0, str(ROOT))


async def raw_aio_pika(n: int) -> float:
    """Seconds for n messages: publish with confirms and consume-and-ack, concurrently."""
    queue_name = f"bench.raw.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    publish_channel = await connection.channel(publisher_confirms=True)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=200)
    queue = await consume_channel.declare_queue(queue_name, durable=True)
    done = asyncio.Event()
    received = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received == n:
            done.set()

    tag = await queue.consume(on_message)
    started = time.perf_counter()
    window = 500
    for i in range(0, n, window):
        await asyncio.gather(*(
            publish_channel.default_exchange.publish(
                aio_pika.Message(b'{"task":"noop"}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name)
            for _ in range(min(window, n - i))))
    await done.wait()
    elapsed = time.perf_counter() - started
    await queue.cancel(tag)
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return elapsed


def store_url(kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='bq-bench-')}/store.sqlite"
    return f"{PG_DSN}?schema=bench_{uuid.uuid4().hex[:8]}"


def drop_schema(url: str) -> None:
    if "schema=" in url:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{url.split("schema=")[1]}" CASCADE')


def start_worker(url: str, namespace: str, concurrency: int, mode: str) -> list[subprocess.Popen[bytes]]:
    """``run``: relay and worker in one process (``broker-q run``); ``split``: ``broker-q relay`` and
    ``broker-q worker`` as two processes, as a deployment that uses both cores would run them."""
    env = {**os.environ, "BROKER_Q_STORE": url, "BROKER_Q_NAMESPACE": namespace, "BROKER_Q_AMQP_URL": AMQP_URL,
           "PYTHONPATH": str(ROOT)}
    worker = ["bench.noop_app:app", "--concurrency", str(concurrency)]
    commands = [["run", *worker, "--no-projections"]] if mode == "run" else [["worker", *worker], ["relay"]]
    processes = [subprocess.Popen([sys.executable, "-m", "broker_q.cli", *command], env=env,
                                  stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) for command in commands]
    wait_ready(processes[0])
    for process in processes[1:]:
        wait_ready(process, "holds the lease")
    return processes


def wait_ready(process: subprocess.Popen[bytes], needle: str = "consuming") -> None:
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode()
        if needle in line:
            threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
            return
        if not line and process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}")
    raise RuntimeError("worker did not start")


def _drain(stream: Any) -> None:
    for _ in stream:  # keep the pipe from filling up and blocking the process
        pass


def stop_worker(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def broker_q_run(kind: str, mode: str, n: int, concurrency: int) -> tuple[float, float]:
    """(seconds to submit n tasks, seconds until all n succeeded in the store)."""
    from broker_q import App

    url, namespace = store_url(kind), f"bench{uuid.uuid4().hex[:8]}"
    app = App(store=url, namespace=namespace, amqp_url=AMQP_URL)
    app.store.max_position()  # create the tables before the worker does
    worker = start_worker(url, namespace, concurrency, mode)
    try:
        started = time.perf_counter()
        chunk = 1000
        for i in range(0, n, chunk):
            await asyncio.gather(*(app.submit_async("noop") for _ in range(min(chunk, n - i))))
        submitted = time.perf_counter() - started
        while app.store.max_position() < 3 * n:  # noqa: ASYNC110 - polling the store is the measurement
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        succeeded = sum(1 for r in app.store.read_log(0, 4 * n) if r.event.TYPE == "succeeded")
        assert succeeded == n, f"{succeeded} of {n} succeeded"
        return submitted, elapsed
    finally:
        stop_worker(worker)
        app.close()
        drop_schema(url)
        await delete_namespace(namespace)


async def latency(kind: str, mode: str, samples: int) -> tuple[list[float], list[float]]:
    """Milliseconds from the call to ``submit`` to (a) the task's ``started`` event, the moment the worker
    takes the task, and (b) the handler running, after ``started`` is committed. Idle worker, one task
    at a time."""
    from broker_q import App

    url, namespace = store_url(kind), f"bench{uuid.uuid4().hex[:8]}"
    app = App(store=url, namespace=namespace, amqp_url=AMQP_URL)
    app.store.max_position()
    worker = start_worker(url, namespace, 8, mode)
    to_started, to_handler = [], []
    try:
        for _ in range(samples + 5):
            t0 = time.time()
            handle = app.submit("started_at")
            handler_at = await handle.result(timeout=30)
            started_at = app.history(handle.id)[1].timestamp.timestamp()
            to_started.append((started_at - t0) * 1000)
            to_handler.append((handler_at - t0) * 1000)
            await asyncio.sleep(0.02)  # let the worker go idle again
        return to_started[5:], to_handler[5:]
    finally:
        stop_worker(worker)
        app.close()
        drop_schema(url)
        await delete_namespace(namespace)


async def floor_latency(samples: int) -> tuple[list[float], list[float]]:
    """The two costs no design of this stack avoids, measured beside broker_q: an SQLite commit of one
    row (WAL, synchronous FULL), and a persistent message from publish to consumer on an idle broker."""
    import sqlite3

    path = f"{tempfile.mkdtemp(prefix='bq-bench-')}/floor.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    commits = []
    for _ in range(samples):
        t0 = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("COMMIT")
        commits.append((time.perf_counter() - t0) * 1000)
    db.close()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue("", exclusive=True, arguments={"x-max-priority": 9})
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived.put_nowait(time.perf_counter())
        await message.ack()

    await queue.consume(on_message)
    hops = []
    for _ in range(samples):
        t0 = time.perf_counter()
        publish = asyncio.ensure_future(channel.default_exchange.publish(
            aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue.name))
        hops.append((await arrived.get() - t0) * 1000)
        await publish
        await asyncio.sleep(0.005)
    await connection.close()
    return commits, hops


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"{statistics.median(ordered):.2f} | {ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]:.2f}"


async def delete_namespace(namespace: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for queue in ("work.default", "ingress.default", "ingress.unrouted", "invalid"):
        await channel.queue_delete(f"{namespace}.{queue}")
    for exchange in ("ingress", "ingress.unrouted", "work", "events"):
        await channel.exchange_delete(f"{namespace}.{exchange}")
    await connection.close()


def describe(subject: str) -> str:
    kind, mode = subject.split(":")
    return f"{kind} store, " + ("relay + worker processes" if mode == "split" else "`broker-q run` (one process)")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--subjects", default="sqlite:split,sqlite:run,postgres:split",
                        help="store:mode pairs; mode split = relay and worker processes, run = one process")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency-samples", type=int, default=200)
    options = parser.parse_args()
    stores = options.subjects.split(",")
    raw: list[float] = []
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in stores}
    for run in range(options.runs):  # interleaved, so drift in the machine's load hits every subject alike
        raw.append(options.tasks / await raw_aio_pika(options.tasks))
        for store in stores:
            submit_s, total_s = await broker_q_run(*store.split(":"), options.tasks, options.concurrency)
            results[store].append((options.tasks / submit_s, options.tasks / total_s))
        print(f"run {run + 1}: raw {raw[-1]:,.0f}/s; " + "; ".join(
            f"{s} {results[s][-1][1]:,.0f}/s" for s in stores), file=sys.stderr)
    raw_median = statistics.median(raw)
    print(f"\n{options.tasks:,} no-op tasks, {options.runs} interleaved runs, medians (min-max)\n")
    print("| subject | submit tasks/s | end-to-end tasks/s | ratio to raw aio-pika |")
    print("|---|---:|---:|---:|")
    raw_range = f"{min(raw):,.0f}-{max(raw):,.0f}"
    print(f"| raw aio-pika (confirms, publish + consume/ack) | | {raw_median:,.0f} ({raw_range}) | 1.00 |")
    for store in stores:
        submit = [r[0] for r in results[store]]
        e2e = [r[1] for r in results[store]]
        print(f"| broker_q, {describe(store)} | {statistics.median(submit):,.0f} | {statistics.median(e2e):,.0f} "
              f"({min(e2e):,.0f}-{max(e2e):,.0f}) | {statistics.median(e2e) / raw_median:.2f} |")
    if options.latency_samples:
        print("\n| subject | submit to `started` p50 ms | p99 | submit to handler running p50 ms | p99 |")
        print("|---|---:|---:|---:|---:|")
        for store in stores:
            to_started, to_handler = await latency(*store.split(":"), options.latency_samples)
            print(f"| broker_q, {describe(store)}, idle worker | {percentiles(to_started)} | "
                  f"{percentiles(to_handler)} |")
        commits, hops = await floor_latency(options.latency_samples)
        print(f"\nFloor in the same run: one SQLite commit p50/p99 {percentiles(commits).replace(' |', ' /')} ms; "
              f"raw aio-pika persistent publish to consumer p50/p99 {percentiles(hops).replace(' |', ' /')} ms. "
              "broker_q's path holds two commits (submit, `started`) and one broker hop.")

if __name__ == "__main__":
    asyncio.run(main())
