"""One measurement of one system: enqueue, then drain with fresh workers, then idle latency.

**Enqueue**: the system's client (a process of its own) sends N tasks with no worker running; its
CPU per task is the client process's own (all threads) over the sends.
**Drain**: the workers are started on the full queue; every task writes its handler time into the
marks file (:mod:`bench.peers.marks`). The end-to-end rate is (N - 1) / (last mark - first mark):
the workers' start-up (imports, connecting) is reported apart, as the time from spawning them to the
first mark. Worker CPU per task is the user + system CPU of the worker processes and their children
from the first mark until 0.5 s after the last (so that acks and records written after the handler
are counted), divided by the tasks run in that window. For systems that keep state (broker_q's
store, Celery's result backend) the harness then waits until every task is recorded as done there,
checks the count, and reports how long after the last handler that was.
**Latency**: fresh workers, idle; the client submits one task at a time (:mod:`bench.peers.client`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.peers.marks import RECORD, read_marks
from bench.peers.procs import Workers
from bench.peers.systems import PYTHON, Context, System, delete_amqp, new_context

__all__ = ["Throughput", "measure"]

STALL = 60.0
"""Seconds without a new mark after which a drain is declared stuck."""


@dataclass
class Throughput:
    tasks: int
    enqueue_rate: float
    e2e_rate: float
    startup_s: float
    cpu_us: float
    marks: int
    durable_lag_s: float | None = None
    client_cpu_us: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    cpu_us_each: list[float] = field(default_factory=list)
    """CPU µs per task of each worker command apart, in the system's order (broker_q: worker, relay)."""


def run_client(system: System, ctx: Context, action: str, n: int, timeout: float) -> dict[str, object]:
    completed = subprocess.run([PYTHON, "-m", "bench.peers.client", system.client, action, str(n)], env=ctx.env,
                               capture_output=True, timeout=timeout, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{system.id} client {action} failed:\n{completed.stderr.decode()[-3000:]}")
    result: dict[str, object] = json.loads(completed.stdout.decode().strip().splitlines()[-1])
    return result


def _scratch_for_marks() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="bench-marks-", dir=shm if shm.is_dir() else None))


def drain(system: System, ctx: Context, n: int) -> tuple[float, float, float, int, float | None, list[float]]:
    """(end-to-end rate, start-up seconds, CPU µs per task, marks counted, durable lag seconds, CPU µs per
    task of each worker command)."""
    marks_dir = _scratch_for_marks()
    marks = marks_dir / "marks"
    marks.touch()
    env = {**ctx.env, "BENCH_MARKS": str(marks)}
    target = n * RECORD.size
    keeps_state = system.durable_done(ctx, n) is not None  # also opens what it reads, before the clock runs
    workers = Workers(system.worker_commands(ctx), env, ctx.dir / "drain.log")
    try:
        spawned = time.time()
        while (size := marks.stat().st_size) == 0:
            if time.time() - spawned > 120:
                raise RuntimeError(f"{system.id}: no task ran within 120 s of starting the workers")
            workers.check_alive()
            time.sleep(0.001)
        cpu0, count0 = workers.cpu(), size // RECORD.size
        each0 = workers.cpu_each()
        progress_at, last_size = time.time(), size
        while size < target:
            time.sleep(0.02)
            size = marks.stat().st_size
            if size != last_size:
                progress_at, last_size = time.time(), size
            elif time.time() - progress_at > STALL:
                workers.check_alive()
                raise RuntimeError(f"{system.id}: stuck at {size // RECORD.size} of {n} tasks")
        lag = None
        if keeps_state:
            while not system.durable_done(ctx, n):
                if time.time() - progress_at > STALL:
                    raise RuntimeError(f"{system.id}: not every task is recorded as done after {STALL} s")
                time.sleep(0.005)
            lag = time.time()
            if (recorded := system.durable_count(ctx, n)) != n:
                raise RuntimeError(f"{system.id}: {recorded} tasks recorded as done, {n} sent")
        time.sleep(0.5)
        cpu1 = workers.cpu()
        each1 = workers.cpu_each()
    finally:
        workers.stop()
    times = read_marks(marks)
    for leftover in marks_dir.iterdir():
        leftover.unlink()
    marks_dir.rmdir()
    first, last = min(times), max(times)
    rate = (n - 1) / (last - first) if n > 1 else float("nan")
    cpu_us = (cpu1 - cpu0) / max(n - count0, 1) * 1e6
    each = [(b - a) / max(n - count0, 1) * 1e6 for a, b in zip(each0, each1, strict=True)]
    return rate, first - spawned, cpu_us, len(times), (lag - last if lag is not None else None), each


def latency(system: System, ctx: Context, samples: int) -> list[float]:
    marks_dir = _scratch_for_marks()
    fifo = marks_dir / "marks.fifo"
    os.mkfifo(fifo)
    env = {**ctx.env, "BENCH_MARKS": str(fifo)}
    workers = Workers(system.worker_commands(ctx), env, ctx.dir / "latency.log")
    try:
        result = run_client(system, replace(ctx, env=env), "latency", samples, timeout=180 + samples)
    finally:
        workers.stop()
        fifo.unlink()
        marks_dir.rmdir()
    return [float(x) for x in result["ms"]]  # type: ignore[attr-defined]


def measure(system: System, n: int, latency_samples: int) -> Throughput:
    """One run of one system on fresh queues (and a fresh store or result schema), cleaned up after."""
    n = min(n, system.task_cap or n)
    ctx = new_context(system)
    ok = False
    try:
        sent = run_client(system, ctx, "enqueue", n, timeout=600)
        rate, startup, cpu_us, counted, lag, each = drain(system, ctx, n)
        result = Throughput(n, n / float(sent["seconds"]), rate, startup, cpu_us, counted, lag,  # type: ignore[arg-type]
                            client_cpu_us=float(sent["cpu_seconds"]) / n * 1e6,  # type: ignore[arg-type]
                            cpu_us_each=each)
        if counted != n:
            raise RuntimeError(f"{system.id}: {counted} task runs marked for {n} tasks sent")
        if latency_samples:
            result.latency_ms = latency(system, ctx, latency_samples)
        ok = True
        return result
    finally:
        system.cleanup(ctx)
        asyncio.run(delete_amqp(ctx))
        if ok:
            shutil.rmtree(ctx.dir)
        else:
            print(f"{system.id}: logs kept in {ctx.dir}", file=sys.stderr)
