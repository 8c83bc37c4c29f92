"""Tasks waiting to retry cost the workers no memory and survive a restart of every process.

``broker-q worker bench.retry_app:app`` and ``broker-q relay`` run as two processes on a fresh
SQLite store and namespace. This process submits N tasks whose first attempt raises
``Retry(delay=...)`` so that they come due from ``--delay`` seconds after the submit began; the
second attempt succeeds. They come due in two parts: ``--paced`` tasks at ``--paced-rate`` a
second, well under what the worker can take, where lateness is the scheduler's own; then the
rest in a burst over ``--spread`` seconds, far over it, where the drain rate is measured (and
lateness is the backlog's). Once the relay has stored all N timers, worker and relay get SIGTERM
and fresh ones are started, before the first task comes due. Then every task must run again: each
ends ``succeeded`` with exactly two ``started`` events, none is lost.

Measured: the RSS of the worker (and the relay) every second through every phase, from
/proc/<pid>/status; the lateness of each retry, ``started`` of attempt 2 minus the ``due_at`` of
its ``retry_scheduled``, both from the store; the time the relay takes to store the N timers; the
drain rate, the burst's tasks over the time from its first due time to its last ``succeeded``.
The baseline, run next through the same processes: N tasks of the same handler that succeed on
their first attempt, N over the time from the start of the submit to the last ``succeeded`` (as
in ``bench/e2e.py``).

Usage: python bench/retries.py [--tasks N] [--delay S] [--paced P] [--paced-rate R] [--spread S]
Prints a Markdown table to paste into bench/README.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BROKER_Q_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
sys.path.insert(0, str(ROOT))

from bench.e2e import delete_namespace  # noqa: E402 - after the repository is on the path
from broker_q import App  # noqa: E402
from broker_q.store.port import EventStore  # noqa: E402

TASK = "retry_until"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Process:
    """One ``broker-q`` process; its stderr is read by a thread, which keeps the warnings and errors."""

    def __init__(self, env: dict[str, str], args: list[str], ready: str) -> None:
        self.name = args[0]
        self.problems: list[str] = []
        self._ready_text = ready
        self._ready = threading.Event()
        self.popen = subprocess.Popen([sys.executable, "-m", "broker_q.cli", *args], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:  # read to the end, or the pipe fills up and blocks the process
            line = raw.decode(errors="replace").rstrip()
            if self._ready_text in line:
                self._ready.set()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                self.problems.append(line)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.problems[-5:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(40)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def usage(pid: int) -> tuple[float, float] | None:
    """(RSS in MiB from /proc/<pid>/status VmRSS, CPU seconds so far from /proc/<pid>/stat); None once it exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except (OSError, StopIteration):
        return None
    return rss, (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    phase: str
    at: float
    worker: tuple[float, float] | None
    relay: tuple[float, float] | None


@dataclass
class Sampler:
    """Samples the RSS and CPU time of the current worker and relay every second, labelled with the phase."""

    worker: Process | None = None
    relay: Process | None = None
    phase: str = "idle"
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            worker, relay = self.worker, self.relay
            self.samples.append(Sample(self.phase, time.time(), usage(worker.popen.pid) if worker else None,
                                       usage(relay.popen.pid) if relay else None))

    def rss(self, phase: str, process: str) -> list[float]:
        return [u[0] for s in self.samples if s.phase == phase and (u := getattr(s, process)) is not None]

    def cpu(self, phase: str, process: str) -> float | None:
        """The process's CPU use over the phase, in percent of one core (None: under two samples)."""
        rows = [(s.at, u[1]) for s in self.samples if s.phase == phase and (u := getattr(s, process)) is not None]
        if len(rows) < 2 or rows[-1][0] <= rows[0][0]:
            return None
        return 100 * (rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0])


class Deployment:
    """``broker-q worker`` and ``broker-q relay`` on one store and namespace; ``restart`` replaces both."""

    def __init__(self, url: str, namespace: str, concurrency: int, sampler: Sampler) -> None:
        self.env = {**os.environ, "BROKER_Q_STORE": url, "BROKER_Q_NAMESPACE": namespace,
                    "BROKER_Q_AMQP_URL": AMQP_URL, "PYTHONPATH": str(ROOT)}
        self.concurrency = concurrency
        self.sampler = sampler
        self.retired: list[Process] = []
        self.worker: Process | None = None
        self.relay: Process | None = None

    def start(self) -> None:
        self.worker = Process(self.env, ["worker", "bench.retry_app:app", "--concurrency", str(self.concurrency)],
                              "consuming")
        self.relay = Process(self.env, ["relay"], "holds the lease")
        self.worker.wait_ready()
        self.relay.wait_ready()
        self.sampler.worker, self.sampler.relay = self.worker, self.relay

    def stop(self) -> None:
        for process in (self.worker, self.relay):
            if process is not None:
                process.stop()
                self.retired.append(process)
        self.worker = self.relay = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def problems(self) -> list[str]:
        current = [p for p in (self.worker, self.relay) if p is not None]
        return [f"{p.name}: {line}" for p in self.retired + current for line in p.problems]


async def submit(app: App, dues: list[float]) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    chunk = 1000
    for i in range(0, len(dues), chunk):
        handles = await asyncio.gather(*(app.submit_async(TASK, [due]) for due in dues[i:i + chunk]))
        ids.extend(h.id for h in handles)
    return ids


@dataclass
class Outcome:
    """What the log says of a set of tasks: counts of events by type, and per task the times that matter."""

    types: Counter[str] = field(default_factory=Counter)
    due_at: dict[uuid.UUID, float] = field(default_factory=dict)
    retry_scheduled_at: dict[uuid.UUID, float] = field(default_factory=dict)
    started: dict[uuid.UUID, dict[int, float]] = field(default_factory=dict)
    succeeded: dict[uuid.UUID, list[float]] = field(default_factory=dict)
    last_position: int = 0


def read_outcome(store: EventStore, ids: set[uuid.UUID], after: int, page: int = 5000) -> Outcome:
    """The events of the tasks ``ids`` in the log after position ``after``, read in pages."""
    outcome = Outcome(last_position=after)
    while records := store.read_log(outcome.last_position, page):
        outcome.last_position = records[-1].position
        for record in records:
            event: Any = record.event
            if event.stream_id not in ids:
                continue
            outcome.types[event.TYPE] += 1
            if event.TYPE == "retry_scheduled":
                outcome.due_at[event.stream_id] = event.due_at.timestamp()
                outcome.retry_scheduled_at[event.stream_id] = event.timestamp.timestamp()
            elif event.TYPE == "started":
                outcome.started.setdefault(event.stream_id, {})[event.attempt] = event.timestamp.timestamp()
            elif event.TYPE == "succeeded":
                outcome.succeeded.setdefault(event.stream_id, []).append(event.timestamp.timestamp())
    return outcome


def problems_of(outcome: Outcome, ids: list[uuid.UUID], attempts: int) -> list[str]:
    """Why the tasks did not each succeed exactly once after exactly ``attempts`` attempts (empty: they did)."""
    lost = [i for i in ids if i not in outcome.succeeded]
    twice = [i for i in ids if len(outcome.succeeded.get(i, [])) > 1]
    wrong = [i for i in ids if sorted(outcome.started.get(i, {})) != list(range(1, attempts + 1))]
    found = []
    if lost:
        found.append(f"{len(lost)} task(s) never succeeded, e.g. {lost[0]}")
    if twice:
        found.append(f"{len(twice)} task(s) succeeded more than once, e.g. {twice[0]}")
    if wrong:
        found.append(f"{len(wrong)} task(s) did not start exactly attempts 1..{attempts}, e.g. {wrong[0]}: "
                     f"{sorted(outcome.started.get(wrong[0], {}))}")
    return found


async def wait_until(store: EventStore, ids: list[uuid.UUID], after: int, events: int, attempts: int,
                     timeout: float) -> Outcome:
    """Wait until the log holds ``events`` events after ``after`` and the tasks all succeeded; read them."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while True:
        while store.max_position() < after + events and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        outcome = read_outcome(store, wanted, after)
        if not problems_of(outcome, ids, attempts) or time.monotonic() > deadline:
            return outcome
        await asyncio.sleep(1)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def rss_range(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if values else "n/a"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


async def run(options: argparse.Namespace) -> None:
    n, delay, spread = options.tasks, options.delay, options.spread
    paced = min(n, options.paced if options.paced is not None else min(10_000, n // 10))
    paced_s = paced / options.paced_rate
    tmp = tempfile.mkdtemp(prefix="bq-retries-")
    url, namespace = f"sqlite:///{tmp}/store.sqlite", f"bench{uuid.uuid4().hex[:8]}"
    app = App(store=url, namespace=namespace, amqp_url=AMQP_URL)
    sampler = Sampler()
    deployment = Deployment(url, namespace, options.concurrency, sampler)
    try:
        store = app.store
        store.max_position()  # create the tables before the processes do
        timers = store.timers
        deployment.start()
        sampler.start()
        await asyncio.sleep(options.idle)  # idle samples of the worker before any task

        # -- N tasks, each retried once -----------------------------------------------------------------
        sampler.phase = "first attempts"
        t0 = time.time()
        burst_at = t0 + delay + paced_s + (2.0 if paced else 0.0)  # the paced tasks are done by then
        dues = [t0 + delay + i / options.paced_rate for i in range(paced)]
        dues += [burst_at + spread * i / (n - paced) for i in range(n - paced)]
        first_due = dues[0]
        ids = await submit(app, dues)
        submitted_s = time.time() - t0
        log(f"submitted {n:,} in {submitted_s:.1f}s; waiting for {n:,} timers "
            f"(first due in {first_due - time.time():.0f}s)")
        first_timer = all_timers = None
        while True:
            stored = await asyncio.to_thread(timers.count)
            now = time.time()
            if stored and first_timer is None:
                first_timer = now
            if stored >= n:
                all_timers = now
                break
            if now > first_due:
                raise RuntimeError(f"only {stored:,} of {n:,} timers stored when the first task came due; "
                                   "give a larger --delay")
            await asyncio.sleep(0.2)
        assert first_timer is not None
        log(f"{n:,} timers stored {all_timers - t0:.1f}s after the submit began; {first_due - all_timers:.0f}s to due")

        sampler.phase = "waiting, same processes"
        await asyncio.sleep(min(options.wait_samples, max(first_due - time.time() - 30, 0)))
        sampler.phase = "restart"
        restart_began = time.time()
        deployment.restart()
        restarted = time.time()
        log(f"worker and relay restarted in {restarted - restart_began:.1f}s, {first_due - restarted:.0f}s before due")
        if restarted >= first_due:
            raise RuntimeError("the restart ended after the first task came due; give a larger --delay")
        sampler.phase = "waiting, fresh processes"
        await asyncio.sleep(max(first_due - time.time(), 0))

        sampler.phase = "paced"
        await asyncio.sleep(max(burst_at - time.time(), 0))
        sampler.phase = "burst"
        retried = await wait_until(store, ids, 0, 5 * n, 2, timeout=spread + 600)
        log(f"retried run drained; {dict(retried.types)}")
        retried_problems = problems_of(retried, ids, 2)
        expected = {"submitted": n, "started": 2 * n, "retry_scheduled": n, "succeeded": n}
        if dict(retried.types) != expected:
            retried_problems.append(f"events {dict(retried.types)}, expected {expected}")
        left = await asyncio.to_thread(timers.count)
        if left:
            retried_problems.append(f"{left:,} timer(s) left in brokerq_timers after every task succeeded")

        # -- baseline: the same N tasks succeeding on their first attempt, same processes --------------
        sampler.phase = "idle after drain"
        await asyncio.sleep(options.idle)
        sampler.phase = "baseline"
        after = store.max_position()
        b0 = time.time()
        baseline_ids = await submit(app, [0.0] * n)
        baseline_submit_s = time.time() - b0
        baseline = await wait_until(store, baseline_ids, after, 3 * n, 1, timeout=600)
        baseline_problems = problems_of(baseline, baseline_ids, 1)
        sampler.stop()

        # -- report ---------------------------------------------------------------------------------------
        def lateness(tasks: list[uuid.UUID]) -> list[float]:
            return sorted((retried.started[i][2] - retried.due_at[i]) * 1000 for i in tasks
                          if 2 in retried.started.get(i, {}) and i in retried.due_at)

        burst_ids = ids[paced:]
        last_retry_scheduled = max(retried.retry_scheduled_at.values())
        baseline_rate = n / (max(max(v) for v in baseline.succeeded.values()) - b0)
        idle_worker = sampler.rss("idle", "worker")
        print(f"\n{n:,} tasks retried once, due from {delay:.0f} s after the submit began: {paced:,} at "
              f"{options.paced_rate:,.0f}/s, then {n - paced:,} over {spread:.0f} s; worker concurrency "
              f"{options.concurrency}; {time.strftime('%Y-%m-%d %H:%M')}\n")
        print("| phase | worker RSS MiB (min-max) | relay RSS MiB (min-max) | worker CPU % of a core | relay CPU % |")
        print("|---|---:|---:|---:|---:|")
        labels = {
            "idle": "idle, before the submit",
            "first attempts": f"submit and first attempts ({n:,} `retry_scheduled`)",
            "waiting, same processes": f"{n:,} waiting, the processes that ran the first attempts",
            "waiting, fresh processes": f"{n:,} waiting, fresh worker and relay after SIGTERM of both",
            "paced": f"second attempts, {paced:,} due at {options.paced_rate:,.0f}/s",
            "burst": f"second attempts, {n - paced:,} due over {spread:.0f} s",
            "baseline": f"baseline: {n:,} tasks succeeding at once",
        }
        for phase, label in labels.items():
            print(f"| {label} | {rss_range(sampler.rss(phase, 'worker'))} | {rss_range(sampler.rss(phase, 'relay'))} "
                  f"| {percent(sampler.cpu(phase, 'worker'))} | {percent(sampler.cpu(phase, 'relay'))} |")
        print("\n| measure | value |")
        print("|---|---:|")
        print(f"| submit ({n:,} tasks, async, group-committed) | {submitted_s:.1f} s ({n / submitted_s:,.0f}/s) |")
        print(f"| worker: first attempts recorded (submit start to last `retry_scheduled`) | "
              f"{last_retry_scheduled - t0:.1f} s |")
        print(f"| relay: {n:,} timers stored (first to last) | {all_timers - first_timer:.1f} s "
              f"({n / max(all_timers - first_timer, 1e-9):,.0f}/s), the last {all_timers - last_retry_scheduled:.1f} s "
              "after the last `retry_scheduled` |")
        print(f"| SIGTERM of worker and relay to both fresh and ready | {restarted - restart_began:.1f} s "
              f"({first_due - restarted:.0f} s before the first due time) |")
        for tasks, label in ((ids[:paced], f"{paced:,} due at {options.paced_rate:,.0f}/s"),
                             (burst_ids, f"{n - paced:,} due over {spread:.0f} s")):
            late = lateness(tasks)
            if late:
                print(f"| lateness, `due_at` to `started` of attempt 2, {label}: p50 / p99 / max | "
                      f"{statistics.median(late):,.1f} / {percentile(late, 0.99):,.1f} / {late[-1]:,.1f} ms |")
        if retried_problems:
            print(f"| problems | {'; '.join(retried_problems)} |")
        else:
            print(f"| tasks that succeeded, each after exactly 2 attempts (none lost, none run twice) | "
                  f"{n:,} of {n:,} |")
        print("\n| subject | tasks/s | ratio to baseline |")
        print("|---|---:|---:|")
        print(f"| baseline: {n:,} tasks succeeding on their first attempt, submit start to last `succeeded` "
              f"(submit {n / baseline_submit_s:,.0f}/s) | {baseline_rate:,.0f} | 1.00 |")
        if burst_ids:
            drain_s = (max(max(retried.succeeded[i]) for i in burst_ids if i in retried.succeeded)
                       - min(retried.due_at[i] for i in burst_ids if i in retried.due_at))
            drain_rate = len(burst_ids) / drain_s
            print(f"| retried: {len(burst_ids):,} due over {spread:.0f} s, first due time to last `succeeded` | "
                  f"{drain_rate:,.0f} | {drain_rate / baseline_rate:.2f} |")
        if idle_worker:
            waiting = sampler.rss("waiting, fresh processes", "worker")
            print(f"\nWorker RSS with {n:,} tasks waiting (fresh worker) minus idle before the submit: "
                  f"{(max(waiting) if waiting else float('nan')) - statistics.median(idle_worker):+.1f} MiB.")
        for name, found in (("retried run", retried_problems), ("baseline", baseline_problems)):
            for problem in found:
                print(f"PROBLEM ({name}): {problem}")
        problems = deployment.problems()
        if problems:
            log(f"{len(problems)} warning/error line(s) from the processes, first ones:")
            for line in problems[:20]:
                print(f"  {line}", file=sys.stderr)
    finally:
        sampler.stop()
        deployment.stop()
        app.close()
        await delete_namespace(namespace)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--delay", type=float, default=300.0,
                        help="seconds from the start of the submit to the first due time")
    parser.add_argument("--paced", type=int, default=None,
                        help="tasks that come due first, at --paced-rate (default: a tenth of N, at most 10,000)")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="tasks a second coming due in the paced part")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds over which the other tasks come due")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle samples before each submit")
    parser.add_argument("--wait-samples", type=float, default=15.0,
                        help="seconds of samples of the first processes once all N wait, before the restart")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    asyncio.run(run(options))


if __name__ == "__main__":
    main()
