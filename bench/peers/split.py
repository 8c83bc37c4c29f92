"""broker_q's drain with the CPU of the worker and of the relay apart (the harness adds them up).

    python -m bench.peers.split --tasks 20000 --runs 3 [--store sqlite]

The same enqueue-then-drain as :mod:`bench.peers.harness`, unprofiled: N no-op tasks submitted, then
``broker-q worker --concurrency 200`` and ``broker-q relay`` started on the backlog. The rate is
(N - 1) / (last mark - first mark); each process's CPU (user + system, from ``/proc``) is counted
from the first mark until every task is recorded as succeeded, plus 0.5 s, over the tasks run in
that window. Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time

from bench.peers.harness import STALL, _scratch_for_marks, run_client
from bench.peers.marks import RECORD, read_marks
from bench.peers.procs import Workers, exit_on_sigterm, tree_cpu
from bench.peers.systems import BrokerQ, delete_amqp, new_context


def run_once(store: str, n: int, work_batch: int = 1) -> tuple[float, float, float]:
    """(tasks/s, worker CPU µs/task, relay CPU µs/task) of one drain."""
    system = BrokerQ(store, work_batch)
    ctx = new_context(system)
    marks_dir = _scratch_for_marks()
    marks = marks_dir / "marks"
    marks.touch()
    try:
        run_client(system, ctx, "enqueue", n, timeout=600)
        system.durable_done(ctx, n)  # opens its reader before the clock runs
        workers = Workers(system.worker_commands(ctx), {**ctx.env, "BENCH_MARKS": str(marks)}, ctx.dir / "drain.log")
        worker_pid, relay_pid = workers.pids()
        try:
            while (size := marks.stat().st_size) == 0:
                workers.check_alive()
                time.sleep(0.001)
            cpu0 = {pid: tree_cpu([pid]) for pid in (worker_pid, relay_pid)}
            count0 = size // RECORD.size
            progress_at = time.time()
            while size < n * RECORD.size or not system.durable_done(ctx, n):
                time.sleep(0.02)
                if (new := marks.stat().st_size) != size:
                    size, progress_at = new, time.time()
                elif time.time() - progress_at > STALL:
                    workers.check_alive()
                    raise RuntimeError(f"stuck at {size // RECORD.size} of {n} tasks")
            time.sleep(0.5)
            cpu1 = {pid: tree_cpu([pid]) for pid in (worker_pid, relay_pid)}
        finally:
            workers.stop()
        times = read_marks(marks)
        if len(times) != n:
            raise RuntimeError(f"{len(times)} handler marks for {n} tasks")
        tasks = max(n - count0, 1)
        return ((n - 1) / (max(times) - min(times)), (cpu1[worker_pid] - cpu0[worker_pid]) / tasks * 1e6,
                (cpu1[relay_pid] - cpu0[relay_pid]) / tasks * 1e6)
    finally:
        shutil.rmtree(marks_dir, ignore_errors=True)
        system.cleanup(ctx)
        asyncio.run(delete_amqp(ctx))
        shutil.rmtree(ctx.dir, ignore_errors=True)


def _range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--work-batch", type=int, default=1, help="the relay's --work-batch (default 1)")
    options = parser.parse_args()
    exit_on_sigterm()
    results = []
    load = [os.getloadavg()[0]]
    for i in range(options.runs):
        rate, worker, relay = run_once(options.store, options.tasks, options.work_batch)
        load.append(os.getloadavg()[0])
        print(f"run {i + 1}: {rate:,.0f} tasks/s, worker {worker:,.0f} µs/task, relay {relay:,.0f} µs/task, "
              f"load {load[-1]:.2f}", file=sys.stderr)
        results.append((rate, worker, relay))
    print(f"tasks/s {_range([r[0] for r in results])}; worker CPU µs/task {_range([r[1] for r in results])}; "
          f"relay {_range([r[2] for r in results])}; load average {min(load):.2f}-{max(load):.2f}")


if __name__ == "__main__":
    main()
