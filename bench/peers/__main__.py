"""broker_q beside Celery, Dramatiq, Taskiq and raw aio-pika, measured in one run, interleaved.

    python -m bench.peers --tasks 20000 --runs 3 [--systems a,b,...] [--latency-samples 200]
                          [--readme bench/README.md] [--json results.json]

Each repetition runs every system once, in an order rotated by one each time (round robin), each on
fresh queues; see :mod:`bench.peers.harness` for what is measured and how. Systems whose packages are
missing (the ``[bench]`` extra) are skipped and named. Prints the tables; ``--readme`` also writes them
into the "Peers, side by side" section of that file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import sqlite3
import sys
from importlib import metadata
from pathlib import Path

import aio_pika

from bench import e2e
from bench.peers.harness import Throughput, measure
from bench.peers.procs import exit_on_sigterm
from bench.peers.report import METHOD, SECTION, latency_table, replace_section, throughput_table
from bench.peers.systems import AMQP_URL, PG_DSN, SYSTEMS

BUSY = 1.5
"""A load average above this before or after the run marks its figures as taken on a busy machine."""


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())

    async def rabbitmq_version() -> str:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            return str(connection.transport.connection.server_properties.get("version", "?"))
        finally:
            await connection.close()

    try:
        import psycopg

        with psycopg.connect(PG_DSN) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            postgres = str(row[0]).split()[0] if row else "?"
    except Exception as e:  # the table still says what it could not learn
        postgres = f"unknown ({type(e).__name__})"
    versions = []
    for package in ("celery", "dramatiq", "taskiq", "taskiq-aio-pika", "aio-pika", "eventsourcing"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return (f"{os.cpu_count()} cores (`nproc`), {model}; RabbitMQ {asyncio.run(rabbitmq_version())}, "
            f"PostgreSQL {postgres}, SQLite {sqlite3.sqlite_version}, Python {platform.python_version()}; "
            + ", ".join(versions))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--systems", default=",".join([*SYSTEMS, "aio-pika-concurrent"]),
                        help=f"comma-separated, of: {', '.join(SYSTEMS)}, aio-pika-concurrent")
    parser.add_argument("--latency-samples", type=int, default=200, help="per system and run (0: no latency)")
    parser.add_argument("--readme", type=Path, help="write the tables into this file's peers section")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    options = parser.parse_args()
    exit_on_sigterm()
    chosen = [s for s in options.systems.split(",") if s]
    unknown = [s for s in chosen if s not in SYSTEMS and s != "aio-pika-concurrent"]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    skipped = [s for s in chosen if s in SYSTEMS and not SYSTEMS[s].available()]
    systems = [SYSTEMS[s] for s in chosen if s in SYSTEMS and s not in skipped]
    if skipped:
        print(f"skipped (packages missing; pip install -e '.[bench]'): {', '.join(skipped)}", file=sys.stderr)

    load_before = os.getloadavg()
    started = datetime.datetime.now().astimezone()
    results: dict[str, list[Throughput]] = {s.id: [] for s in systems}
    concurrent_raw: list[float] = []
    failures: list[str] = []
    for run in range(options.runs):
        order = systems[run % len(systems):] + systems[:run % len(systems)] if systems else []
        for system in order:
            try:
                result = measure(system, options.tasks, options.latency_samples)
            except Exception as e:  # a shared broker restarted by someone else: the other systems go on
                failures.append(f"run {run + 1} {system.id}: {type(e).__name__}: {str(e)[:300]}")
                print(f"run {run + 1} {system.id} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            results[system.id].append(result)
            p50 = sorted(result.latency_ms)[len(result.latency_ms) // 2] if result.latency_ms else float("nan")
            print(f"run {run + 1} {system.id}: enqueue {result.enqueue_rate:,.0f}/s, end-to-end "
                  f"{result.e2e_rate:,.0f}/s, {result.cpu_us:,.0f} µs CPU/task "
                  f"({' + '.join(f'{c:,.0f}' for c in result.cpu_us_each)}), latency p50 {p50:.2f} ms, "
                  f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        if "aio-pika-concurrent" in chosen:
            concurrent_raw.append(options.tasks / asyncio.run(e2e.raw_aio_pika(options.tasks)))
            print(f"run {run + 1} aio-pika-concurrent: {concurrent_raw[-1]:,.0f}/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    labels = {s.id: s.label for s in systems}
    tables = (throughput_table(results, labels, (options.tasks, concurrent_raw)) + "\n\n"
              + latency_table(results, labels))
    if failures:
        tables += "\n\nRuns that failed (left out of the medians):\n\n" + "\n".join(f"- {f}" for f in failures)
    print(tables)
    if options.json:
        options.json.write_text(json.dumps({
            "tasks": options.tasks, "runs": options.runs, "skipped": skipped,
            "results": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()}, "failures": failures,
            "aio-pika-concurrent": concurrent_raw}, indent=1))
    if options.readme:
        command = " ".join(["python -m bench.peers", *sys.argv[1:]])
        load = (f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_before)} before, "
                f"{', '.join(f'{x:.2f}' for x in load_after)} after")
        busy = max(load_before[0], load_after[0]) > BUSY
        replace_section(options.readme, "\n\n".join([
            SECTION, f"```bash\n{command}\n```", METHOD.strip(),
            f"Run of {started:%Y-%m-%d %H:%M %Z}, {options.runs} interleaved runs, medians (min-max). "
            f"Machine: {machine()}. {load.capitalize()}."
            + (f" **The machine was busy (load average above {BUSY}) with other work: a re-run on a quiet "
               "machine is needed before these figures are quoted.**" if busy else ""),
            tables]))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
