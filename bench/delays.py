"""Delayed tasks start on time, and the relay's memory does not grow with the tasks it holds for later.

Both parts run on a fresh SQLite store and namespace, with ``broker-q relay`` (and, for the first,
``broker-q worker bench.noop_app:app``) as processes of their own.

1. Lateness. This process submits N ``noop`` tasks (async submits, group-committed, a chunk of
   1,000 at a time) with an ``eta`` each, their due times spread evenly over ``--spread`` seconds
   from ``--lead`` seconds after the submit began (submitted in a shuffled order). The relay stores
   a timer per task and publishes each task's work message when it is due. Once every task
   succeeded, the lateness of each is read from the store: its ``started`` timestamp minus the
   ``due_at`` of its ``submitted``. Every task must have started once and succeeded once, none
   before its due time, and no timer may be left. Measured beside it: the RSS and CPU of the relay
   and the worker every second (from /proc), and their CPU time per task. The baseline, next through
   the same processes: the same N tasks without a delay, N over the time from the start of the
   submit to the last ``succeeded`` (as in ``bench/e2e.py``). ``--runs`` runs, each on a fresh
   store; medians (min-max).
2. Memory with many future tasks. For each N of ``--future``, a fresh store is filled directly
   (``store.append`` of 1,000 ``submitted`` events at a time, due in one day); then a relay is
   started and this process polls ``store.timers.count()`` until it holds N timers: the time to
   store them. The relay then idles, holding N timers, for ``--idle-samples`` seconds: its RSS
   (``VmRSS``) every second, its peak (``VmHWM``) and its CPU. The baseline: a relay on an empty
   store, idle for as long, in the same run.

Usage: python bench/delays.py [--tasks N] [--spread S] [--lead S] [--runs R] [--future N,N,...]
       [--idle-samples S] [--parts lateness,memory]
Prints Markdown tables to paste into bench/README.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import delete_namespace  # noqa: E402 - after the repository is on the path
from bench.retries import AMQP_URL, Process, Sampler, log, percent, percentile, rss_range, usage  # noqa: E402
from broker_q import App  # noqa: E402
from broker_q.store.port import EventStore  # noqa: E402

TASK = "noop"


def peak_rss(pid: int) -> float | None:
    """The process's peak RSS so far in MiB (``VmHWM``); None once it exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Fresh:
    """A fresh SQLite store and namespace, and the ``broker-q`` processes started on them."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="bq-delays-")
        self.url = f"sqlite:///{self.tmp}/store.sqlite"
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "BROKER_Q_STORE": self.url, "BROKER_Q_NAMESPACE": self.namespace,
                    "BROKER_Q_AMQP_URL": AMQP_URL, "PYTHONPATH": str(ROOT)}
        self.app = App(store=self.url, namespace=self.namespace, amqp_url=AMQP_URL)
        self.app.store.max_position()  # create the tables before the processes do
        self.processes: list[Process] = []

    @property
    def store(self) -> EventStore:
        return self.app.store

    def start(self, args: list[str], ready: str) -> Process:
        process = Process(self.env, args, ready)
        self.processes.append(process)
        process.wait_ready()
        return process

    def problems(self) -> list[str]:
        return [f"{p.name}: {line}" for p in self.processes for line in p.problems]

    async def close(self) -> None:
        for process in self.processes:
            process.stop()
        self.app.close()
        await delete_namespace(self.namespace)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- part 1: lateness ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per task: the ``due_at`` of its ``submitted``, its ``started`` and ``succeeded`` timestamps."""

    types: Counter[str] = field(default_factory=Counter)
    due_at: dict[uuid.UUID, float] = field(default_factory=dict)
    started: dict[uuid.UUID, list[float]] = field(default_factory=dict)
    succeeded: dict[uuid.UUID, list[float]] = field(default_factory=dict)


def read_outcome(store: EventStore, ids: set[uuid.UUID], after: int, page: int = 5000) -> Outcome:
    outcome = Outcome()
    position = after
    while records := store.read_log(position, page):
        position = records[-1].position
        for record in records:
            event: Any = record.event
            if event.stream_id not in ids:
                continue
            outcome.types[event.TYPE] += 1
            if event.TYPE == "submitted" and event.due_at is not None:
                outcome.due_at[event.stream_id] = event.due_at.timestamp()
            elif event.TYPE == "started":
                outcome.started.setdefault(event.stream_id, []).append(event.timestamp.timestamp())
            elif event.TYPE == "succeeded":
                outcome.succeeded.setdefault(event.stream_id, []).append(event.timestamp.timestamp())
    return outcome


def problems_of(outcome: Outcome, ids: list[uuid.UUID], delayed: bool) -> list[str]:
    """Why the tasks did not each start once and succeed once, none before its due time (empty: they did)."""
    checks = {
        "never succeeded": [i for i in ids if i not in outcome.succeeded],
        "succeeded more than once": [i for i in ids if len(outcome.succeeded.get(i, [])) > 1],
        "started other than once": [i for i in ids if len(outcome.started.get(i, [])) != 1],
    }
    if delayed:
        checks["have no due_at"] = [i for i in ids if i not in outcome.due_at]
        checks["started before their due time"] = [
            i for i in ids if i in outcome.due_at and min(outcome.started.get(i, [float("inf")])) < outcome.due_at[i]]
    return [f"{len(found):,} task(s) {what}, e.g. {found[0]}" for what, found in checks.items() if found]


async def submit(app: App, etas: list[float | None]) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    chunk = 1000
    for i in range(0, len(etas), chunk):
        handles = await asyncio.gather(*(
            app.submit_async(TASK, eta=None if eta is None else datetime.fromtimestamp(eta, UTC))
            for eta in etas[i:i + chunk]))
        ids.extend(h.id for h in handles)
    return ids


async def wait_for_events(store: EventStore, position: int, timeout: float) -> bool:
    """Wait until the log reaches ``position``; False if it did not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(store.max_position) < position:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


@dataclass
class LatenessRun:
    submit_rate: float
    timers_stored_s: float
    """From the start of the submit to N timers stored."""
    margin_s: float
    """From N timers stored to the first due time."""
    lateness: list[float]
    """Milliseconds, sorted."""
    ok: int
    problems: list[str]
    relay_rss: list[float]
    worker_rss: list[float]
    relay_cpu: float | None
    worker_cpu: float | None
    cpu_per_task: dict[str, float]
    """Milliseconds of CPU per task: relay/worker, delayed/baseline."""
    baseline_rate: float
    baseline_submit_rate: float
    load: str


async def lateness_run(options: argparse.Namespace, number: int) -> LatenessRun:
    n, spread, lead = options.tasks, options.spread, options.lead
    fresh = Fresh()
    sampler = Sampler()
    try:
        store = fresh.store
        worker = fresh.start(["worker", "bench.noop_app:app", "--concurrency", str(options.concurrency)], "consuming")
        relay = fresh.start(["relay"], "holds the lease")
        sampler.worker, sampler.relay = worker, relay
        sampler.start()
        await asyncio.sleep(options.idle)

        def cpu_now() -> dict[str, float]:
            return {name: (u[1] if (u := usage(p.popen.pid)) else float("nan"))
                    for name, p in (("relay", relay), ("worker", worker))}

        # -- N tasks due over the spread -------------------------------------------------------------
        sampler.phase = "submit"
        cpu_before = cpu_now()
        t0 = time.time()
        first_due = t0 + lead
        dues = [first_due + spread * i / n for i in range(n)]
        random.Random(number).shuffle(dues)
        ids = await submit(fresh.app, list(dues))
        submitted_s = time.time() - t0
        log(f"run {number}: submitted {n:,} in {submitted_s:.1f}s, first due in {first_due - time.time():.1f}s")
        while (stored := await asyncio.to_thread(store.timers.count)) < n:
            if time.time() > first_due:
                raise RuntimeError(f"only {stored:,} of {n:,} timers stored when the first task came due; "
                                   "give a larger --lead")
            await asyncio.sleep(0.1)
        all_stored = time.time()
        sampler.phase = "waiting"
        await asyncio.sleep(max(first_due - time.time(), 0))
        sampler.phase = "due"
        await asyncio.sleep(max(first_due + spread - time.time(), 0))
        drained = await wait_for_events(store, 3 * n, timeout=120)
        cpu_after = cpu_now()
        sampler.phase = "drained"
        outcome = await asyncio.to_thread(read_outcome, store, set(ids), 0)
        found = problems_of(outcome, ids, delayed=True)
        if not drained:
            found.append(f"the log did not reach {3 * n:,} events within 120 s of the last due time")
        if dict(outcome.types) != {"submitted": n, "started": n, "succeeded": n}:
            found.append(f"events {dict(outcome.types)}")
        if left := await asyncio.to_thread(store.timers.count):
            found.append(f"{left:,} timer(s) left after every task succeeded")
        lateness = sorted((min(outcome.started[i]) - outcome.due_at[i]) * 1000 for i in ids
                          if i in outcome.started and i in outcome.due_at)
        log(f"run {number}: lateness p50 {statistics.median(lateness):.1f} ms, p99 {percentile(lateness, 0.99):.1f}, "
            f"max {lateness[-1]:.1f}; {len(found)} problem(s)")

        # -- baseline: the same N tasks without a delay, same processes -------------------------------
        await asyncio.sleep(options.idle)
        sampler.phase = "baseline"
        after = await asyncio.to_thread(store.max_position)
        base_cpu_before = cpu_now()
        b0 = time.time()
        baseline_ids = await submit(fresh.app, [None] * n)
        baseline_submit_s = time.time() - b0
        if not await wait_for_events(store, after + 3 * n, timeout=600):
            found.append("baseline: not every task succeeded within 600 s")
        base_cpu_after = cpu_now()
        sampler.stop()
        baseline = await asyncio.to_thread(read_outcome, store, set(baseline_ids), after)
        found += [f"baseline: {p}" for p in problems_of(baseline, baseline_ids, delayed=False)]
        baseline_rate = n / (max(max(v) for v in baseline.succeeded.values()) - b0)
        log(f"run {number}: baseline {baseline_rate:,.0f} tasks/s")
        found += fresh.problems()
        ok = sum(1 for i in ids if len(outcome.succeeded.get(i, [])) == 1 and len(outcome.started.get(i, [])) == 1
                 and outcome.started[i][0] >= outcome.due_at.get(i, float("inf")))
        return LatenessRun(
            submit_rate=n / submitted_s, timers_stored_s=all_stored - t0, margin_s=first_due - all_stored,
            lateness=lateness, ok=ok, problems=found,
            relay_rss=sampler.rss("due", "relay"), worker_rss=sampler.rss("due", "worker"),
            relay_cpu=sampler.cpu("due", "relay"), worker_cpu=sampler.cpu("due", "worker"),
            cpu_per_task={f"{name} {kind}": 1000 * (after_[name] - before[name]) / n
                          for kind, before, after_ in (("delayed", cpu_before, cpu_after),
                                                       ("baseline", base_cpu_before, base_cpu_after))
                          for name in ("relay", "worker")},
            baseline_rate=baseline_rate, baseline_submit_rate=n / baseline_submit_s, load=load_average(),
        )
    finally:
        sampler.stop()
        await fresh.close()


def spread_of(values: list[float], digits: int = 1, unit: str = "") -> str:
    if not values:
        return "n/a"
    median = f"{statistics.median(values):,.{digits}f}{unit}"
    return median if len(values) == 1 else f"{median} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


async def lateness_part(options: argparse.Namespace) -> None:
    n, spread = options.tasks, options.spread
    runs: list[LatenessRun] = []
    began = time.strftime("%Y-%m-%d %H:%M")
    for number in range(1, options.runs + 1):
        log(f"lateness run {number} of {options.runs}; load average {load_average()}")
        runs.append(await lateness_run(options, number))
    which = "median (min-max)" if len(runs) > 1 else "one run"
    print(f"\n### Lateness: {n:,} tasks due over {spread:.0f} s ({n / spread:,.0f}/s), from {options.lead:.0f} s "
          f"after the submit began; worker concurrency {options.concurrency}; {len(runs)} run(s) from {began}; "
          f"load average after each run: {'; '.join(r.load for r in runs)}\n")
    print(f"| measure | {which} |")
    print("|---|---:|")
    rows = [
        (f"submit ({n:,} tasks with `eta`, async, group-committed), tasks/s",
         spread_of([r.submit_rate for r in runs], 0)),
        (f"relay: {n:,} timers stored, s from the start of the submit",
         spread_of([r.timers_stored_s for r in runs], 1)),
        ("lateness p50, ms (`started` minus `due_at`)", spread_of([statistics.median(r.lateness) for r in runs])),
        ("lateness p99, ms", spread_of([percentile(r.lateness, 0.99) for r in runs])),
        ("lateness max, ms", spread_of([r.lateness[-1] for r in runs])),
        ("relay RSS MiB while the tasks come due (max)", spread_of([max(r.relay_rss) for r in runs], 0)),
        ("relay CPU % of a core while the tasks come due", spread_of([r.relay_cpu or 0.0 for r in runs])),
        ("worker RSS MiB while the tasks come due (max)", spread_of([max(r.worker_rss) for r in runs], 0)),
        ("worker CPU % of a core while the tasks come due", spread_of([r.worker_cpu or 0.0 for r in runs])),
    ]
    for label, value in rows:
        print(f"| {label} | {value} |")
    total = n * len(runs)
    print(f"| tasks that started and succeeded exactly once, none before its due time | "
          f"{sum(r.ok for r in runs):,} of {total:,} |")
    print("\n| subject | tasks/s | ratio to baseline | relay CPU ms per task | worker CPU ms per task |")
    print("|---|---:|---:|---:|---:|")
    base = [r.baseline_rate for r in runs]
    print(f"| baseline: {n:,} tasks without a delay, submit start to last `succeeded` | {spread_of(base, 0)} | 1.00 | "
          f"{spread_of([r.cpu_per_task['relay baseline'] for r in runs], 2)} | "
          f"{spread_of([r.cpu_per_task['worker baseline'] for r in runs], 2)} |")
    print(f"| delayed: {n:,} tasks due over {spread:.0f} s (the rate the schedule asks for) | {n / spread:,.0f} | "
          f"{spread_of([n / spread / r.baseline_rate for r in runs], 2)} | "
          f"{spread_of([r.cpu_per_task['relay delayed'] for r in runs], 2)} | "
          f"{spread_of([r.cpu_per_task['worker delayed'] for r in runs], 2)} |")
    for number, run in enumerate(runs, 1):
        for problem in run.problems[:20]:
            print(f"PROBLEM (run {number}): {problem}")


# -- part 2: memory of the relay with many future tasks ---------------------------------------------


def fill(store: EventStore, n: int, due_in: timedelta) -> None:
    """Append ``n`` ``submitted`` events of tasks due ``due_in`` from now, 1,000 to a transaction."""
    from broker_q.domain import task as domain

    now = datetime.now(UTC)
    due_at = now + due_in
    for first in range(0, n, 1000):
        store.append([domain.submit(task_id=uuid.uuid4(), task=TASK, queue="default", args=[], kwargs={},
                                    priority=5, tenant="default", actor="bench", now=now, due_at=due_at)
                      for _ in range(first, min(n, first + 1000))])


@dataclass
class MemoryRun:
    timers: int
    fill_s: float
    store_s: float
    """From the start of the relay process to N timers stored."""
    storing_rss: list[float]
    idle_rss: list[float]
    peak: float
    idle_cpu: float | None
    fresh_rss: list[float]
    """A fresh relay started on the store once the N timers were stored, idle."""
    fresh_peak: float
    fresh_cpu: float | None
    load: str


async def memory_run(options: argparse.Namespace, n: int) -> MemoryRun:
    fresh = Fresh()
    sampler = Sampler()
    try:
        store = fresh.store
        f0 = time.time()
        await asyncio.to_thread(fill, store, n, timedelta(days=1))
        fill_s = time.time() - f0
        log(f"{n:,} future tasks in the store in {fill_s:.1f}s; starting the relay")
        sampler.phase = "storing"
        r0 = time.time()
        relay = fresh.start(["relay"], "holds the lease")
        sampler.relay = relay
        sampler.start()
        while (stored := await asyncio.to_thread(store.timers.count)) < n:
            if relay.popen.poll() is not None:
                raise RuntimeError(f"the relay exited with {relay.popen.returncode}: {relay.problems[-5:]}")
            await asyncio.sleep(0.5 if n >= 100_000 else 0.1)
        store_s = time.time() - r0
        log(f"{stored:,} timers stored in {store_s:.1f}s; idling for {options.idle_samples:.0f}s")
        sampler.phase = "idle"
        await asyncio.sleep(options.idle_samples)
        peak = peak_rss(relay.popen.pid) or float("nan")
        # A fresh relay on the same store: it holds the N timers without having read the N events.
        sampler.phase = "restart"
        relay.stop()
        relay = fresh.start(["relay"], "holds the lease")
        sampler.relay = relay
        sampler.phase = "fresh idle"
        await asyncio.sleep(options.idle_samples)
        fresh_peak = peak_rss(relay.popen.pid) or float("nan")
        sampler.stop()
        if problems := fresh.problems():
            log(f"{len(problems)} warning/error line(s) from the relay, first ones:")
            for line in problems[:10]:
                print(f"  {line}", file=sys.stderr)
        return MemoryRun(n, fill_s, store_s, sampler.rss("storing", "relay"), sampler.rss("idle", "relay"), peak,
                         sampler.cpu("idle", "relay"), sampler.rss("fresh idle", "relay"), fresh_peak,
                         sampler.cpu("fresh idle", "relay"), load_average())
    finally:
        sampler.stop()
        await fresh.close()


async def memory_part(options: argparse.Namespace) -> None:
    began = time.strftime("%Y-%m-%d %H:%M")
    runs = []
    for n in [0, *options.future]:
        log(f"memory: {n:,} future tasks; load average {load_average()}")
        runs.append(await memory_run(options, n))

    def mib(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({rss_range(values)})" if values else "n/a"

    base, fresh_base = statistics.median(runs[0].idle_rss), statistics.median(runs[0].fresh_rss)
    print(f"\n### Memory of the relay holding N timers due in one day; one run per N from {began}; each relay "
          f"idles {options.idle_samples:.0f} s; load average after each: {'; '.join(r.load for r in runs)}\n")
    print("| timers N | fill s | relay: N timers stored, s | timers/s | RSS MiB while storing (max) "
          "| peak RSS MiB (`VmHWM`) | idle RSS MiB, median (min-max) | ratio to 0 timers | idle CPU % of a core |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        rate = f"{run.timers / run.store_s:,.0f}" if run.timers else ""
        storing = f"{max(run.storing_rss):.0f}" if run.storing_rss else "n/a"
        print(f"| {run.timers:,} | {run.fill_s:.1f} | {run.store_s:.1f} | {rate} | {storing} | {run.peak:.0f} | "
              f"{mib(run.idle_rss)} | {statistics.median(run.idle_rss) / base:.2f} | {percent(run.idle_cpu)} |")
    print("\nA fresh relay started on the same store once the N timers were stored (it has not read the events):\n")
    print("| timers N | peak RSS MiB (`VmHWM`) | idle RSS MiB, median (min-max) | ratio to 0 timers "
          "| idle CPU % of a core |")
    print("|---:|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run.timers:,} | {run.fresh_peak:.0f} | {mib(run.fresh_rss)} | "
              f"{statistics.median(run.fresh_rss) / fresh_base:.2f} | {percent(run.fresh_cpu)} |")


async def run(options: argparse.Namespace) -> None:
    if "lateness" in options.parts:
        await lateness_part(options)
    if "memory" in options.parts:
        await memory_part(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="delayed tasks of the lateness part")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds over which the delayed tasks come due")
    parser.add_argument("--lead", type=float, default=10.0,
                        help="seconds from the start of the submit to the first due time")
    parser.add_argument("--runs", type=int, default=3, help="runs of the lateness part (medians over them)")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle samples before each submit")
    parser.add_argument("--future", type=lambda s: [int(v) for v in s.split(",")],
                        default=[10_000, 100_000, 1_000_000],
                        help="comma-separated numbers of future tasks of the memory part")
    parser.add_argument("--idle-samples", type=float, default=20.0,
                        help="seconds the relay idles holding the timers, sampled every second")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["lateness", "memory"],
                        help="which parts to run: lateness, memory or both")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    asyncio.run(run(options))


if __name__ == "__main__":
    main()
