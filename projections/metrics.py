"""Prometheus metrics, read from the views at each scrape: nothing is counted in memory, so the
numbers survive restarts and a rebuild recomputes them from the events like any other view.

- ``broker_q_tasks_total{tenant,queue,task,outcome}``: tasks that finished, by outcome (counter);
- ``broker_q_task_queue_wait_seconds{tenant,queue}``: from ready to started (histogram);
- ``broker_q_task_run_seconds{tenant,queue}``: from started to the outcome (histogram);
- ``broker_q_tasks_in_state{tenant,queue,state}``: tasks in each state now (gauge);
- ``broker_q_projection_position{view}``, ``broker_q_projection_lag_events{view}``,
  ``broker_q_projection_lag_seconds{view}``: how far each view is behind the store (gauges).

The registry is our own (never the global one), and every name starts with ``broker_q_``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from broker_q.store.port import EventStore
from projections.database import Cursor, ViewDatabases
from projections.queries import ViewStatus, status_in
from projections.views import BUCKETS, table

__all__ = ["ViewsCollector", "exposition", "registry_for", "serve_metrics"]


class ViewsCollector(Collector):
    """Reads every view's database at each scrape: the tasks view's for the task metrics, each for its
    views' positions (on SQLite a view per file, so these may be written by other processes)."""

    def __init__(self, databases: ViewDatabases, store: EventStore) -> None:
        self._databases = databases
        self._store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        views: list[ViewStatus] = []
        outcomes: list[Any] = []
        counts: list[Any] = []
        durations: list[Any] = []
        for database in self._databases:
            # A view's position is read in the same transaction as its data, so a scrape never shows
            # a position past the data it shows.
            with database.transaction(write=False) as cursor:
                found = status_in(cursor, self._store, database.views)
                views += found
                generation = next((v.generation for v in found if v.name == "tasks"), None)
                if generation is not None:
                    outcomes, counts, durations = _task_rows(cursor, generation)
        views.sort(key=lambda view: view.name)
        if not views:
            return

        finished = CounterMetricFamily("broker_q_tasks", "Tasks that finished, by outcome",
                                       labels=["tenant", "queue", "task", "outcome"])
        for tenant, queue, task, outcome, count in outcomes:
            finished.add_metric([tenant, queue, task, outcome], float(count))
        yield finished

        current = GaugeMetricFamily("broker_q_tasks_in_state", "Tasks in each state now",
                                    labels=["tenant", "queue", "state"])
        for tenant, queue, state, count in counts:
            current.add_metric([tenant, queue, state], float(count))
        yield current

        for metric, name, documentation in (
            ("queue_wait", "broker_q_task_queue_wait_seconds", "Seconds from ready to started"),
            ("run", "broker_q_task_run_seconds", "Seconds from started to the outcome"),
        ):
            family = HistogramMetricFamily(name, documentation, labels=["tenant", "queue"])
            series: dict[tuple[str, str], tuple[list[int], float]] = {}
            for row_metric, tenant, queue, bucket, count, total in durations:
                if row_metric != metric:
                    continue
                counts_by_bucket, sum_so_far = series.setdefault((tenant, queue), ([0] * (len(BUCKETS) + 1), 0.0))
                counts_by_bucket[int(bucket)] += int(count)
                series[(tenant, queue)] = (counts_by_bucket, sum_so_far + float(total))
            for (tenant, queue), (counts_by_bucket, total_seconds) in series.items():
                cumulative, buckets = 0, []
                for bound, count in zip([*map(_bound, BUCKETS), "+Inf"], counts_by_bucket, strict=True):
                    cumulative += count
                    buckets.append((bound, float(cumulative)))
                family.add_metric([tenant, queue], buckets, total_seconds)
            yield family

        position = GaugeMetricFamily("broker_q_projection_position", "Last log position applied", labels=["view"])
        lag_events = GaugeMetricFamily("broker_q_projection_lag_events", "Events the view is behind the store",
                                       labels=["view"])
        lag_seconds = GaugeMetricFamily("broker_q_projection_lag_seconds",
                                        "Seconds between the newest event and the last one applied", labels=["view"])
        for view in views:
            position.add_metric([view.name], float(view.position))
            lag_events.add_metric([view.name], float(view.lag_events))
            lag_seconds.add_metric([view.name], view.lag_seconds)
        yield position
        yield lag_events
        yield lag_seconds


def _task_rows(cursor: Cursor, generation: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The outcome counters, the counts of tasks in each state and the duration histograms' cells."""
    cursor.execute(f"SELECT tenant, queue, task, outcome, count FROM {table('outcomes', generation)} "
                   "ORDER BY tenant, queue, task, outcome")
    outcomes = cursor.fetchall()
    cursor.execute(f"SELECT tenant, queue, state, count FROM {table('queue_counts', generation)} "
                   "ORDER BY tenant, queue, state")
    counts = cursor.fetchall()
    cursor.execute(f"SELECT metric, tenant, queue, bucket, count, total FROM {table('durations', generation)} "
                   "ORDER BY metric, tenant, queue, bucket")
    return outcomes, counts, cursor.fetchall()


def _bound(value: float) -> str:
    return repr(value)


def registry_for(databases: ViewDatabases, store: EventStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ViewsCollector(databases, store))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything in ``registry``."""
    return generate_latest(registry)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread."""
    start_http_server(port, addr=host, registry=registry)
