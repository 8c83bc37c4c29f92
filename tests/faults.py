"""Fault injection shared by ``tests/integration/test_faults.py`` and ``bench/soak.py``.

A fault run is broker_q as processes (``python -m broker_q.cli relay|worker``, app
``tests.integration.apps:app``) on a store of its own and a namespace of its own, a client in this
process submitting ``slow`` tasks, and a fault: workers SIGKILLed, RabbitMQ stopped, PostgreSQL
stopped. The outcome is read from the store alone (:class:`Tally`) and from the handlers' own log
of invocations (``tests.integration.apps.slow`` writes ``start KEY`` and ``end KEY``), and
summed up in a :class:`Report`:

- **lost**: submitted, but not final when the drain timed out;
- **duplicate successes**: tasks with more than one ``succeeded`` event (the store's unique
  (task, version) should make this impossible);
- **unrecorded invocations**: handler invocations beyond the task's ``started`` events. Every
  attempt appends ``started`` before it calls the handler, so each invocation must have one; an
  invocation more is an execution that broker_q did not record (a duplicate delivery that ran);
- **re-run completions**: tasks whose handler ran to its end more than once. This is allowed only
  after a takeover (a worker killed after the handler ended, before the outcome was committed):
  execution is at least once when workers die (``docs/guarantees.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

from broker_q import App, StoreUnavailable
from broker_q.domain.events import IngressRejected, TaskDeadLettered, TaskEvent, TaskStarted

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.integration.apps:app"

FINAL_FAILURE = frozenset({"dead_lettered"})
"""The type of a task's last event when it failed for good."""
FINAL = FINAL_FAILURE | {"succeeded", "cancelled"}


def is_final_failure(event_type: str) -> bool:
    return event_type in FINAL_FAILURE


# -- what the store says ----------------------------------------------------------------------


class Tally:
    """The task events of a store, followed through its log (each read picks up where the last ended)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.position = 0
        self.history: dict[uuid.UUID, list[TaskEvent]] = defaultdict(list)
        self.rejected: list[IngressRejected] = []
        self._running: dict[uuid.UUID, str] = {}
        """Tasks whose latest event is ``started``, and the worker that started them."""

    def refresh(self) -> Tally:
        while records := self.app.store.read_log(self.position, 5000):
            for record in records:
                if isinstance(record.event, TaskEvent):
                    self.history[record.event.stream_id].append(record.event)
                    if isinstance(record.event, TaskStarted):
                        self._running[record.event.stream_id] = record.event.worker
                    else:
                        self._running.pop(record.event.stream_id, None)
                elif isinstance(record.event, IngressRejected):
                    self.rejected.append(record.event)
            self.position = records[-1].position
        return self

    def try_refresh(self) -> bool:
        """Refresh; False while the store is unreachable (a PostgreSQL outage)."""
        try:
            self.refresh()
        except StoreUnavailable:
            return False
        return True

    def last(self, task_id: uuid.UUID) -> str | None:
        events = self.history.get(task_id)
        return events[-1].TYPE if events else None

    def not_final(self, task_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        return [t for t in task_ids if self.last(t) not in FINAL]

    def count(self, task_id: uuid.UUID, event_type: str) -> int:
        return sum(1 for e in self.history.get(task_id, ()) if event_type == e.TYPE)

    def running_on(self, pid: int) -> list[uuid.UUID]:
        """Tasks whose latest event is a ``started`` by a worker of process ``pid`` (worker ids hold the pid)."""
        mark = f":{pid}:"
        return [t for t, worker in self._running.items() if mark in worker]

    def failure(self, task_id: uuid.UUID) -> TaskDeadLettered:
        event = self.history[task_id][-1]
        assert isinstance(event, TaskDeadLettered), f"task {task_id} ended {event.TYPE}, not dead_lettered"
        return event


def invocations(log: Path) -> tuple[Counter[str], Counter[str]]:
    """(handler starts, handler ends) per task key, from the log the ``slow`` handler writes."""
    starts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            kind, _, key = line.partition(" ")
            (starts if kind == "start" else ends)[key] += 1
    return starts, ends


@dataclass
class Report:
    submitted: int = 0
    succeeded: int = 0
    final_failures: int = 0
    lost: list[uuid.UUID] = field(default_factory=list)
    duplicate_successes: list[uuid.UUID] = field(default_factory=list)
    unrecorded_invocations: dict[str, int] = field(default_factory=dict)
    takeovers: int = 0
    rerun_completions: int = 0
    faults: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"tasks submitted:             {self.submitted}",
            f"succeeded:                   {self.succeeded}",
            f"dead-lettered (final fail):  {self.final_failures}",
            f"lost (not final at the end): {len(self.lost)}",
            f"duplicated executions:       {len(self.duplicate_successes)} task(s) with 2+ succeeded events; "
            f"{sum(self.unrecorded_invocations.values())} handler invocation(s) beyond the recorded attempts",
            f"takeovers (attempts > 1):    {self.takeovers}; re-run completions after a takeover: "
            f"{self.rerun_completions}",
            f"faults injected:             {self.faults}",
            f"wall time:                   {self.seconds:.1f}s",
        ]


def report(tally: Tally, keys: dict[str, uuid.UUID], log: Path | None, lost: list[uuid.UUID]) -> Report:
    """Sum up the run of the tasks ``keys`` (task key -> task id); ``lost`` is what the drain left."""
    result = Report(submitted=len(keys), lost=lost)
    starts, ends = invocations(log) if log is not None else (Counter(), Counter())
    for key, task_id in keys.items():
        last = tally.last(task_id)
        result.succeeded += last == "succeeded"
        result.final_failures += last is not None and is_final_failure(last)
        if tally.count(task_id, "succeeded") > 1:
            result.duplicate_successes.append(task_id)
        attempts = tally.count(task_id, "started")
        result.takeovers += attempts > 1
        if starts[key] > attempts:
            result.unrecorded_invocations[key] = starts[key] - attempts
        result.rerun_completions += ends[key] > 1 and attempts > 1
    return result


# -- poison messages ----------------------------------------------------------------------

POISON_EXTRA: dict[str, tuple[bytes, str | None, tuple[str, ...]]] = {
    # Beyond test_foreign_client.REFUSED: fields of the wrong JSON type, and bodies that are no object.
    "args-not-an-array": (b'{"task": "add", "args": {"x": 1}}', "application/json", ("args",)),
    "kwargs-not-an-object": (b'{"task": "add", "kwargs": [1, 2]}', "application/json", ("kwargs",)),
    "task-not-a-string": (b'{"task": 42, "args": [1, 2]}', "application/json", ("task",)),
    "priority-out-of-range": (b'{"task": "add", "args": [1, 2], "priority": 99}', "application/json",
                              ("priority",)),
    "array-body": (b"[1, 2]", "application/json", ("invalid task envelope",)),
    "empty-body": (b"", None, ("invalid task envelope",)),
}


# -- submitting -------------------------------------------------------------------------------


async def submit_paced(
    app: App,
    calls: list[tuple[str, str, list[Any]]],
    seconds: float,
    keys: dict[str, uuid.UUID],
    *,
    chunk: int = 50,
) -> None:
    """Submit ``calls`` (task key, task name, args) spread evenly over ``seconds``, into ``keys``.

    Each task has its key as idempotency key, so a submit retried after the store was unreachable
    names the same task whether or not the first try committed.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(0, len(calls), chunk):
        due = started + seconds * index / max(len(calls), 1)
        await asyncio.sleep(max(0.0, due - loop.time()))
        batch = calls[index:index + chunk]
        ids = await asyncio.gather(*(_submit_retrying(app, key, task, args) for key, task, args in batch))
        keys.update(zip((key for key, _, _ in batch), ids, strict=True))


async def _submit_retrying(app: App, key: str, task: str, args: list[Any], patience: float = 60.0) -> uuid.UUID:
    deadline = time.monotonic() + patience
    while True:
        try:
            return (await app.submit_async(task, args, idempotency_key=key)).id
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def slow_calls(run: str, count: int, log: Path) -> list[tuple[str, str, list[Any]]]:
    return [(f"{run}-{n}", "slow", [f"{run}-{n}", str(log)]) for n in range(count)]


async def drain(tally: Tally, keys: dict[str, uuid.UUID], timeout: float) -> list[uuid.UUID]:
    """Wait until every task of ``keys`` is final; return those that are not when ``timeout`` ends."""
    deadline = time.monotonic() + timeout
    while True:
        if tally.try_refresh() and not tally.not_final(keys.values()):
            return []
        if time.monotonic() > deadline:
            tally.try_refresh()
            return tally.not_final(keys.values())
        await asyncio.sleep(0.1)


# -- broker_q processes -----------------------------------------------------------------------


def process_env(store: str, amqp_url: str, namespace: str) -> dict[str, str]:
    return {**os.environ, "BROKER_Q_STORE": store, "BROKER_Q_AMQP_URL": amqp_url, "BROKER_Q_NAMESPACE": namespace,
            "PYTHONPATH": str(ROOT), "BROKER_Q_SHUTDOWN_GRACE": "5"}


class Processes:
    """``python -m broker_q.cli ARGS`` processes, each with a log file of its own in ``logs``."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{args[0]}-{len(self.started)}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "broker_q.cli", *args], env=self.env, cwd=ROOT,
                                       stdout=out, stderr=subprocess.STDOUT)
        self.started.append((process, log))
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> Path:
        return next(log for p, log in self.started if p is process)

    async def ready(self, process: subprocess.Popen[bytes], needle: str = "consuming", timeout: float = 60) -> None:
        """Wait until ``process`` logs ``needle`` (a worker: ``consuming``; a relay: ``holds the lease``)."""
        log = self.log_of(process)
        deadline = time.monotonic() + timeout
        while needle not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise AssertionError(f"{log.name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{log.name} did not log {needle!r} within {timeout}s")
            await asyncio.sleep(0.05)

    async def worker(self, *options: str) -> subprocess.Popen[bytes]:
        process = self.start("worker", APP, *options)
        await self.ready(process)
        return process

    async def relay(self) -> subprocess.Popen[bytes]:
        process = self.start("relay")
        await self.ready(process, "holds the lease")
        return process

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p, _ in self.started if p.poll() is None]

    def stop_all(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(10)

    def logs_text(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for _, log in self.started)


# -- services ---------------------------------------------------------------------------------


async def command(*args: str, timeout: float = 60) -> str:
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {process.returncode}: {err.decode()}")
    return out.decode()


async def wait_rabbitmq(amqp_url: str, timeout: float = 60) -> None:
    """Wait until RabbitMQ accepts an AMQP connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(amqp_url, timeout=2)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            await connection.close()
            return


@contextlib.asynccontextmanager
async def rabbitmq_stopped(amqp_url: str) -> AsyncIterator[None]:
    """RabbitMQ's application stopped (``rabbitmqctl stop_app``) inside the block; started again after,
    whatever happens, and accepting connections before the block is left: other tests share it."""
    try:
        await command("rabbitmqctl", "-q", "stop_app")
        yield
    finally:
        await command("rabbitmqctl", "-q", "start_app")
        await wait_rabbitmq(amqp_url)


def postgres_cluster() -> str:
    return sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")])[-1]


async def wait_postgres(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await command("pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def postgres_stopped() -> AsyncIterator[None]:
    """PostgreSQL stopped (fast shutdown: open connections are closed) inside the block; started
    again after, whatever happens, and ready before the block is left."""
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", postgres_cluster(), "main"]
    try:
        await command(*ctl, "stop", "-m", "fast")
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # "already running" if the stop itself failed
            await command(*ctl, "start")
        await wait_postgres()


# -- fault schedules --------------------------------------------------------------------------


async def kill_workers(
    processes: Processes,
    tally: Tally,
    until: Callable[[], bool],
    *,
    kills: int,
    every: tuple[float, float] = (1.0, 2.0),
) -> int:
    """SIGKILL a worker while it has a task started, up to ``kills`` times or until ``until()``; start a
    new worker after each kill. Another worker, started by the caller, keeps running. Returns the kills
    (each of them mid-task: a round without a task running on the victim within 10 s kills nothing)."""
    victim = await processes.worker()
    done = 0
    while done < kills and not until():
        await asyncio.sleep(random.uniform(*every))
        # Kill it mid-task: wait (polling the store, the only place that knows) until a task it started is unfinished.
        deadline = time.monotonic() + 10
        while not (tally.try_refresh() and tally.running_on(victim.pid)):
            if time.monotonic() > deadline or until():
                break
            await asyncio.sleep(0.005)
        else:
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
            done += 1
            victim = await processes.worker()
    return done
