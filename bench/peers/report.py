"""Medians, ranges and ratios of the runs, as Markdown, and the section of ``bench/README.md`` they go in."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.peers.harness import Throughput

__all__ = ["SECTION", "latency_table", "replace_section", "throughput_table"]

SECTION = "## Peers, side by side"
METHOD = """\
`bench/peers/` (`pip install -e '.[bench]'` for the peers; a peer whose package is missing is skipped
and named). Every repetition runs every system once, in an order rotated by one each time, each on
fresh queues (and a fresh store, result schema or namespace), deleted afterwards. N no-op tasks:

- **enqueue**: the system's own client, in a process of its own, sends N tasks while no worker runs
  (connecting and declaring are outside the time). broker_q: `App.submit_async`, 500 at a time, which
  commits `submitted` events in group commits (publishing is the relay's job, so it falls in the
  drain); Taskiq and raw aio-pika: 500 sends at a time, with publisher confirms; Celery and Dramatiq:
  one `.delay()`/`.send()` after another, without publisher confirms (their default).
- **end-to-end**: then the workers start on the full queue. Each task's handler appends its time to a
  file (8 bytes, `O_APPEND`, in `/dev/shm`); the harness only `stat`s it every 20 ms, from outside the
  measured processes. Rate = (N - 1) / (last handler time - first handler time), so the workers'
  start-up (imports, connecting: the start-up column) is left out. The run fails unless the file
  holds exactly N records after the workers stop (a task run twice, or lost, fails it).
- **recorded after last handler**: for the systems that keep task state (broker_q's event store,
  Celery's result backend), the time from the last handler to the moment every task's final state
  is committed there; the count is then checked to be N.
- **CPU per task**: user + system CPU of the worker processes and their children (from `/proc`), from
  the first task until 0.5 s after the last, over the tasks in that window; broker_q counts its relay
  and its worker. The broker's and the databases' servers are not counted, for any system.
  The client's CPU per task is the enqueuing process's own.
- **idle latency**: fresh workers, idle; the client submits one task at a time, 20 ms apart, and the
  sample is from just before the submit call to the handler's own timestamp, which it writes into a
  FIFO the client blocks on (no polling). Samples of all repetitions are pooled for p50 and p99.

Systems: broker_q runs `broker-q relay` and `broker-q worker --concurrency 200` as two processes,
every state change of every task (`submitted`, `started`, `succeeded`) committed to its store
(SQLite: WAL, synchronous FULL); as its enqueue is the durable append alone, its drain includes the
relay publishing the backlog. Celery with a database result backend also sets `task_acks_late` and
`task_track_started`, on SQLAlchemy with SQLite or PostgreSQL (psycopg); these rows run fewer tasks
(at most 2,000), being an order of magnitude slower. Celery runs with `--without-mingle
--without-gossip --without-heartbeat`. Dramatiq: `dramatiq -p 2 -t 8`, default middleware. Taskiq:
`taskiq worker -w 2` on taskiq-aio-pika, with a classic queue (its default is a quorum queue). Raw
aio-pika: one consumer process, prefetch 200, acking each message; the extra row is `bench/e2e.py`'s
baseline, producer and consumer together in one process, for comparison with earlier figures.
Ratios are of medians measured in the same run.
"""
DRAMATIQ, CELERY_DB_SQLITE, CELERY_DB_PG = "dramatiq", "celery-prefork-db-sqlite", "celery-prefork-db-postgres"


def _range(values: Sequence[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _ratio(value: float, base: list[float] | None) -> str:
    return f"{value / statistics.median(base):.2f}" if base else "n/a"


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def throughput_table(results: dict[str, list[Throughput]], labels: dict[str, str],
                     concurrent_raw: tuple[int, list[float]] | None = None) -> str:
    e2e = {k: [r.e2e_rate for r in runs] for k, runs in results.items() if runs}
    rows = ["| system | tasks per run | enqueue tasks/s | end-to-end tasks/s | x Dramatiq 2x8 "
            "| x Celery+DB SQLite | x Celery+DB PG | client CPU µs/task | worker CPU µs/task | start-up s "
            "| recorded after last handler, ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, runs in results.items():
        if not runs:
            continue
        median = statistics.median(e2e[key])
        lags = [r.durable_lag_s * 1000 for r in runs if r.durable_lag_s is not None]
        rows.append(
            f"| {labels[key]} | {runs[0].tasks:,} | {_range([r.enqueue_rate for r in runs])} | {_range(e2e[key])} "
            f"| {_ratio(median, e2e.get(DRAMATIQ))} | {_ratio(median, e2e.get(CELERY_DB_SQLITE))} "
            f"| {_ratio(median, e2e.get(CELERY_DB_PG))} | {_range([r.client_cpu_us for r in runs])} "
            f"| {_range([r.cpu_us for r in runs])} "
            f"| {statistics.median(r.startup_s for r in runs):.1f} | {_range(lags) if lags else 'n/a'} |")
    if concurrent_raw and concurrent_raw[1]:
        n, rates = concurrent_raw
        median = statistics.median(rates)
        rows.append(f"| raw aio-pika, producer and consumer together in one process (`bench/e2e.py`'s baseline) "
                    f"| {n:,} | | {_range(rates)} | {_ratio(median, e2e.get(DRAMATIQ))} "
                    f"| {_ratio(median, e2e.get(CELERY_DB_SQLITE))} | {_ratio(median, e2e.get(CELERY_DB_PG))} "
                    "| | | | |")
    return "\n".join(rows)


def latency_table(results: dict[str, list[Throughput]], labels: dict[str, str]) -> str:
    pooled = {k: [x for r in runs for x in r.latency_ms] for k, runs in results.items()}
    dramatiq_p50 = statistics.median(pooled[DRAMATIQ]) if pooled.get(DRAMATIQ) else None
    rows = ["| system, idle workers | samples | p50 ms | p99 ms | p50 of each run, min-max | p50 x Dramatiq |",
            "|---|---:|---:|---:|---:|---:|"]
    for key, samples in pooled.items():
        if not samples:
            continue
        per_run = [statistics.median(r.latency_ms) for r in results[key] if r.latency_ms]
        p50 = statistics.median(samples)
        rows.append(f"| {labels[key]} | {len(samples)} | {p50:.2f} | {_percentile(samples, 0.99):.2f} "
                    f"| {min(per_run):.2f}-{max(per_run):.2f} "
                    f"| {f'{p50 / dramatiq_p50:.2f}' if dramatiq_p50 else 'n/a'} |")
    return "\n".join(rows)


def replace_section(readme: Path, body: str) -> None:
    """Put ``body`` (starting with :data:`SECTION`) in place of that section, or at the end."""
    text = readme.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body.rstrip() + "\n\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    readme.write_text(text)
