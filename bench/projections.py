"""Catch-up rate of the projections beside the raw read rate of the same store, with peak memory.

For each store: fill it with N events (tasks of three events each: submitted, started, then
succeeded, or failed for one task in ten), then, each in a fresh process so that its peak RSS is
its own, and interleaved over several runs:

- raw: ``select_notifications`` pages of the store's recorder, undecoded (what the store gives);
- decoded: ``read_log`` pages, decoded into broker_q events;
- catch-up: every view built from position 0 into empty tables, as ``broker-q projections run``
  builds them: a ``ProjectionRunner`` per views database, each in a process of its own, all at once
  (on SQLite a process per view, each reading the log itself; on PostgreSQL one process). Its rate
  is the events of the log over the time from the first process's start to the last one's end,
  and its peak RSS the sum of the processes' peaks.

Usage: python bench/projections.py [--sqlite-events N] [--postgres-events N] [--runs R] [--batch B]
Prints a Markdown table of medians (min-max) to paste into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG_DSN = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def fill(url: str, n_events: int) -> None:
    from broker_q.domain import task as domain
    from broker_q.store import open_store

    store = open_store(url)
    start = datetime.now(UTC) - timedelta(days=1)
    tasks = n_events // 3
    for first in range(0, tasks, 1000):
        events = []
        for i in range(first, min(tasks, first + 1000)):
            task_id, now = uuid.uuid4(), start + timedelta(milliseconds=i)
            submitted = domain.submit(task_id=task_id, task=f"task{i % 7}", queue=f"queue{i % 3}", args=[i],
                                      kwargs={}, priority=5, tenant=f"tenant{i % 2}", actor="bench", now=now)
            started = domain.started_event(task_id=task_id, version=2, attempt=1, worker="worker:bench",
                                           tenant=submitted.tenant, correlation_id=task_id,
                                           now=now + timedelta(milliseconds=3))
            if i % 10:
                outcome = domain.succeeded_event(task_id, 3, submitted.tenant, "worker:bench", task_id, i,
                                                 now + timedelta(milliseconds=9))
            else:
                outcome = domain.dead_lettered_event(task_id, 3, submitted.tenant, "worker:bench", task_id,
                                                     "ValueError", "bad input", "Traceback ...",
                                                     now + timedelta(milliseconds=9))
            events += [submitted, started, outcome]
        store.append(events)
    store.close()


def measure(kind: str, url: str, batch: int, view: str | None = None) -> dict[str, float]:
    """Run in a process of its own: one pass (the catch-up of ``view``'s database), its start and end
    (wall clock, to line up with other processes), and this process's peak RSS."""
    from broker_q.store import open_store

    store = open_store(url)
    began, started = time.time(), time.perf_counter()
    count = 0
    if kind == "raw":
        recorder = store._recorder
        position = 0
        while notifications := recorder.select_notifications(start=position, limit=batch, inclusive_of_start=False):
            position = notifications[-1].id
            count += len(notifications)
    elif kind == "decoded":
        position = 0
        while records := store.read_log(position, batch):
            position = records[-1].position
            count += len(records)
    else:
        from projections.database import open_view_database
        from projections.runner import ProjectionRunner

        assert view is not None
        runner = ProjectionRunner(store, open_view_database(url, view), batch_size=batch)
        runner.setup()
        count = runner.catch_up()
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"events": count, "seconds": elapsed, "began": began, "ended": began + elapsed,
            "peak_mib": peak_kib / 1024}


def fresh_views(url: str) -> None:
    """Empty views, so that the next catch-up starts from position 0."""
    if url.startswith("sqlite"):
        from projections.database import views_path
        from projections.views import VIEWS

        events_path = url.removeprefix("sqlite:///")
        for view in VIEWS:
            for suffix in ("", "-wal", "-shm"):
                Path(views_path(events_path, view) + suffix).unlink(missing_ok=True)
    else:
        import psycopg

        schema = url.split("schema=")[1]
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND "
                                        "tablename LIKE 'bq\\_%%'", (schema,)).fetchall():
                conn.execute(f'DROP TABLE "{schema}"."{name}"')


def in_subprocesses(kind: str, url: str, batch: int) -> dict[str, float]:
    """One pass of ``kind`` in a fresh process; a catch-up in a process per views database, all at once."""
    views: list[str | None] = [None]
    if kind == "catch-up":
        from projections.database import open_view_databases
        from projections.views import VIEWS

        # As `broker-q projections run` does: a process per database, each named by its first view.
        views = [database.views[0] for database in open_view_databases(url, VIEWS)]
    processes = [subprocess.Popen([sys.executable, __file__, "--measure", kind, "--url", url, "--batch", str(batch),
                                   *(["--view", view] if view else [])],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT) for view in views]
    results = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"{kind} pass failed with exit code {process.returncode}")
        results.append(json.loads(output))
    began, ended = min(r["began"] for r in results), max(r["ended"] for r in results)
    return {"events": max(r["events"] for r in results), "seconds": ended - began,
            "peak_mib": sum(r["peak_mib"] for r in results), "peaks_mib": [r["peak_mib"] for r in results],
            "each_seconds": [r["seconds"] for r in results], "processes": len(results)}


def bench_store(label: str, url: str, n_events: int, runs: int, batch: int) -> list[str]:
    started = time.perf_counter()
    fill(url, n_events)
    print(f"{label}: filled {n_events:,} events in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {"raw": [], "decoded": [], "catch-up": []}
    for run in range(runs):
        for kind in results:
            if kind == "catch-up":
                fresh_views(url)
            result = in_subprocesses(kind, url, batch)
            results[kind].append(result)
            peaks = " + ".join(f"{peak:.0f}" for peak in result["peaks_mib"])
            each = " and ".join(f"{seconds:.1f}s" for seconds in result["each_seconds"])
            print(f"{label} run {run + 1} {kind}: {result['events']:,} events in {result['seconds']:.1f}s, "
                  f"{result['events'] / result['seconds']:,.0f} events/s, {result['processes']} process(es) "
                  f"taking {each}, peak {peaks} MiB", file=sys.stderr)
    rates = {kind: [r["events"] / r["seconds"] for r in rs] for kind, rs in results.items()}
    raw = statistics.median(rates["raw"])
    rows = []
    for kind, values in rates.items():
        peak = statistics.median(r["peak_mib"] for r in results[kind])
        rows.append(f"| {label} | {kind} | {statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) "
                    f"| {statistics.median(values) / raw:.2f} | {peak:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sqlite-events", type=int, default=1_000_000)
    parser.add_argument("--postgres-events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--view", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        print(json.dumps(measure(options.measure, options.url, options.batch, options.view)))
        return
    rows = []
    if options.sqlite_events:
        directory = tempfile.mkdtemp(prefix="bq-bench-")
        try:
            rows += bench_store(f"sqlite, {options.sqlite_events:,} events", f"sqlite:///{directory}/store.sqlite",
                                options.sqlite_events, options.runs, options.batch)
        finally:
            shutil.rmtree(directory)  # a million events and their views: 0.8 GB
    if options.postgres_events:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        url = f"{PG_DSN}?schema={schema}"
        try:
            rows += bench_store(f"postgres, {options.postgres_events:,} events", url, options.postgres_events,
                                options.runs, options.batch)
        finally:
            import psycopg

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"\n{options.runs} interleaved runs, batches of {options.batch}, medians (min-max)\n")
    print("| store | pass | events/s | ratio to raw read | peak RSS MiB (sum of processes) |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
