"""Medians, ranges and ratios of the runs, as Markdown, and the section of ``bench/README.md`` they go in."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.peers.harness import Throughput

__all__ = ["SECTION", "latency_table", "replace_section", "throughput_table"]

SECTION = "## Peers, side by side"
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
