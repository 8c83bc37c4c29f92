"""The command line of the views: ``projections run|status|rebuild``, ``queues``, ``tasks``, ``dlq``, ``audit``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from broker_q.app import App
from broker_q.domain.task import TaskStatus
from broker_q.errors import DomainError, StoreError, ValidationError
from broker_q.store.port import EventStore
from projections.cli import parse_time
from projections.database import ViewDatabases, open_view_database, open_view_databases
from projections.metrics import registry_for, serve_metrics
from projections.queries import AuditQuery, audit, dead_letters, queues, status, tasks
from projections.runner import ProjectionRunner, runners
from projections.supervisor import Supervisor, stop_when_stdin_closes
from projections.views import VIEWS

__all__ = ["add_view_commands", "run_projections"]

Command = Callable[[argparse.Namespace], int]


def add_view_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    serve: Callable[[argparse.Namespace, Callable[[asyncio.Event], list[Any]]], int],
) -> None:
    """Register the view commands; ``serve`` runs long-lived components until SIGTERM (broker_q.cli)."""

    def command(parent: Any, name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(command=fn)
        return sub

    group = subparsers.add_parser("projections", help="run, inspect and rebuild the views",
                                  description="run, inspect and rebuild the views")
    actions = group.add_subparsers(required=True, metavar="ACTION")
    sub = command(actions, "run", lambda options: serve(options, lambda stop: [run_projections(
        _app(options), stop, metrics_port=options.metrics_port, metrics_host=options.metrics_host,
        views=options.views), *([stop_when_stdin_closes(stop)] if options.supervised else [])]),
        "follow the event log and keep every view up to date")
    sub.add_argument("--view", action="append", dest="views", choices=sorted(VIEWS), metavar="NAME",
                     help="only this view (repeatable; default every view: on SQLite, a process each)")
    sub.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    sub.add_argument("--metrics-host", default="127.0.0.1")
    sub.add_argument("-v", "--verbose", action="store_true")
    sub.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)  # stop when stdin closes
    sub = command(actions, "status", _status, "each view's position, lag and last update")
    sub.add_argument("--json", action="store_true")
    sub = command(actions, "rebuild", _rebuild, "rebuild views from the event log, beside the live ones")
    which = sub.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", choices=sorted(VIEWS), help="the view to rebuild")
    which.add_argument("--all", action="store_true", help="rebuild every view")

    sub = command(subparsers, "queues", _queues, "tasks in each state per tenant and queue")
    sub.add_argument("--tenant")
    sub.add_argument("--json", action="store_true")

    sub = command(subparsers, "tasks", _tasks, "the tasks of a queue in a state, oldest first")
    sub.add_argument("--queue", required=True)
    sub.add_argument("--state", required=True)
    sub.add_argument("--tenant")
    sub.add_argument("--limit", type=int, default=50)
    sub.add_argument("--after", metavar="CURSOR", help="the `next` cursor of the previous page")
    sub.add_argument("--json", action="store_true")

    dlq = subparsers.add_parser("dlq", help="dead letters", description="dead letters")
    dlq_actions = dlq.add_subparsers(required=True, metavar="ACTION")
    sub = command(dlq_actions, "list", _dlq_list, "dead-lettered tasks, most recent first")
    sub.add_argument("--tenant")
    sub.add_argument("--limit", type=int, default=50)
    sub.add_argument("--after", metavar="CURSOR")
    sub.add_argument("--json", action="store_true")
    sub = command(dlq_actions, "replay", _dlq_replay,
                  "run dead letters again, recording who, why and what changed in their history")
    which = sub.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="the dead letter to replay")
    which.add_argument("--all", action="store_true",
                       help="every dead letter the filters select, as of the store's head")
    sub.add_argument("--task", metavar="NAME", help="with --all: only dead letters of this task")
    sub.add_argument("--since", metavar="TIME", help="with --all: only those dead-lettered at TIME or later")
    sub.add_argument("--tenant", help="with --all: only this tenant's")
    sub.add_argument("--reason", required=True, help="why (kept in each task's history)")
    sub.add_argument("--kwargs", metavar="JSON", help="keyword arguments that replace the task's own")

    sub = command(subparsers, "audit", _audit, "the audit log, filtered")
    for option in ("--tenant", "--actor", "--task"):
        sub.add_argument(option)
    sub.add_argument("--type", action="append", dest="types", metavar="TYPE")
    sub.add_argument("--since", metavar="TIME")
    sub.add_argument("--until", metavar="TIME")
    sub.add_argument("--limit", type=int, default=1000)
    sub.add_argument("--after", type=int, metavar="POSITION")
    sub.add_argument("--format", choices=("table", "json"), default="table",
                     help="json: one JSON object per line (JSON lines), for export")


def _app(options: argparse.Namespace) -> App:
    store = getattr(options, "store", None)
    amqp_url = getattr(options, "amqp_url", None)
    return App(**{k: v for k, v in (("store", store), ("amqp_url", amqp_url)) if v})


async def run_projections(app: App, stop: asyncio.Event, *, metrics_port: int | None = None,
                          metrics_host: str = "127.0.0.1", views: Sequence[str] | None = None) -> None:
    """Keep every view (or ``views``) up to date until ``stop`` is set; serve metrics if a port is given.

    Views that share a database (PostgreSQL, ``memory://``) are applied by one runner in this process.
    Views in databases of their own (a file per view on SQLite) are applied each by a process of its
    own, ``broker-q projections run --view NAME``, which this one starts and supervises
    (:mod:`projections.supervisor`): it raises :class:`~projections.supervisor.ProjectionProcessesFailing`
    if one of them keeps exiting.
    """
    store = await asyncio.to_thread(lambda: app.store)
    url = app.settings.store
    databases = open_view_databases(url, views or VIEWS)
    try:
        if metrics_port is not None:
            await asyncio.to_thread(_set_up, databases, store)
            serve_metrics(registry_for(databases, store), metrics_port, metrics_host)
        if len(databases) == 1:
            await ProjectionRunner(store, next(iter(databases))).run(stop, store_url=url)
            return
        verbose = ["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []
        await Supervisor({
            view: [sys.executable, "-m", "broker_q.cli", "--store", url, "projections", "run", "--view", view,
                   "--supervised", *verbose]
            for view in databases.views
        }).run(stop)
    finally:
        databases.close()


def _set_up(databases: ViewDatabases, store: EventStore) -> None:
    """Create every view's tables and position (idempotent): queries and metrics work before a first batch."""
    for runner in runners(store, databases):
        runner.setup()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _status(options: argparse.Namespace) -> int:
    app = _app(options)
    with open_view_databases(app.settings.store, VIEWS) as databases:
        _set_up(databases, app.store)
        views = status(databases, app.store)
    if options.json:
        _print_json([asdict(v) for v in views])
        return 0
    print(f"{'view':<8} {'gen':>4} {'position':>10} {'head':>10} {'lag':>8} {'lag s':>8}  updated")
    for v in views:
        print(f"{v.name:<8} {v.generation:>4} {v.position:>10} {v.head:>10} {v.lag_events:>8} "
              f"{v.lag_seconds:>8.1f}  {v.updated_at or '-'}"
              + (f"  (rebuilding: generation {v.rebuilding['generation']} at {v.rebuilding['position']})"
                 if v.rebuilding else ""))
    return 0


def _rebuild(options: argparse.Namespace) -> int:
    app = _app(options)
    for name in sorted(VIEWS) if options.all else [options.name]:
        database = open_view_database(app.settings.store, name)
        try:
            runner = ProjectionRunner(app.store, database, [VIEWS[name]])
            runner.setup()
            started = time.monotonic()
            bar = _ProgressBar(name)
            applied = runner.rebuild(name, progress=bar.update)
            bar.done()
        finally:
            database.close()
        elapsed = time.monotonic() - started
        print(f"{name}: rebuilt from {applied:,} events in {elapsed:.1f}s "
              f"({applied / elapsed if elapsed else 0:,.0f} events/s)")
    return 0


class _ProgressBar:
    def __init__(self, name: str, width: int = 30) -> None:
        self._name = name
        self._width = width
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._shown = 0.0
        self._last = -1

    def update(self, position: int, head: int) -> None:
        if position == self._last:
            return  # the last batch and the swap report the same position
        self._last = position
        now = time.monotonic()
        if not self._tty and now - self._shown < 1 and position < head:
            return  # a log file gets a line a second, a terminal a moving bar
        self._shown = now
        fraction = 1.0 if head <= 0 else min(1.0, position / head)
        filled = int(fraction * self._width)
        rate = position / max(now - self._started, 1e-9)
        line = (f"{self._name:<6} [{'#' * filled}{'.' * (self._width - filled)}] {fraction:6.1%} "
                f"{position:,}/{head:,} {rate:,.0f} events/s")
        print(("\r" + line) if self._tty else line, end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._tty:
            print(file=sys.stderr)


def _queues(options: argparse.Namespace) -> int:
    app = _app(options)
    with open_view_databases(app.settings.store, ["tasks"]) as databases:
        summaries = queues(databases, tenant=options.tenant)
    if options.json:
        _print_json([asdict(s) for s in summaries])
        return 0
    states = tuple(s.value for s in TaskStatus)
    print(f"{'tenant':<12} {'queue':<16} " + " ".join(f"{s:>10}" for s in states) + "  oldest waiting")
    for s in summaries:
        oldest = "-" if s.oldest_waiting_seconds is None else f"{s.oldest_waiting_seconds:.1f}s"
        print(f"{s.tenant:<12} {s.queue:<16} " + " ".join(f"{s.counts.get(state, 0):>10}" for state in states)
              + f"  {oldest}")
    return 0


def _tasks(options: argparse.Namespace) -> int:
    app = _app(options)
    with open_view_databases(app.settings.store, ["tasks"]) as databases:
        page = tasks(databases, queue=options.queue, state=options.state, tenant=options.tenant,
                     limit=options.limit, after=options.after)
    return _print_page(page.items, page.next, options.json)


def _dlq_list(options: argparse.Namespace) -> int:
    app = _app(options)
    with open_view_databases(app.settings.store, ["tasks"]) as databases:
        page = dead_letters(databases, tenant=options.tenant, limit=options.limit, after=options.after)
    return _print_page(page.items, page.next, options.json)


def _dlq_replay(options: argparse.Namespace) -> int:
    from broker_q.cli import _json_arg, actor_of, authorize_task
    from broker_q.domain.access import Permission

    app = _app(options)
    kwargs = None if options.kwargs is None else _json_arg(options.kwargs, dict, "--kwargs")
    if options.id is not None:
        if options.task or options.since:
            raise ValidationError("--task and --since select among --all; an ID names one dead letter")
        tenant = app.get_task(options.id).tenant
        if options.tenant is not None and options.tenant != tenant:
            raise ValidationError(f"dead letter {options.id} is not of tenant {options.tenant!r}")
        authorize_task(options, Permission.REPLAY, tenant, f"dlq replay {options.id}")
        state = app.replay_dead_letter(options.id, reason=options.reason, actor=actor_of(options), kwargs=kwargs)
        print(f"{state.task_id}  replayed at v{state.version}: ready for attempt {state.attempts + 1}")
        return 0
    selected = _dead_letters_now(app, task=options.task, since=parse_time(options.since, "--since"),
                                 tenant=options.tenant)
    actor, replayed = actor_of(options), 0
    for item in selected:
        try:
            state = app.replay_dead_letter(item["id"], reason=options.reason, actor=actor, kwargs=kwargs,
                                           version=item["version"])
        except DomainError as e:
            print(f"{item['id']}  skipped: {e}", file=sys.stderr)  # replayed by someone else since it was selected
            continue
        replayed += 1
        print(f"{state.task_id}  replayed at v{state.version}: ready for attempt {state.attempts + 1}")
    skipped = len(selected) - replayed
    print(f"{replayed} dead letter(s) replayed" + (f", {skipped} skipped" if skipped else ""), file=sys.stderr)
    return 0


def _dead_letters_now(app: App, *, task: str | None, since: datetime | None,
                      tenant: str | None) -> list[dict[str, Any]]:
    """The dead letters that ``dlq replay --all`` selects, from the tasks view brought up to the store's head.

    The view is caught up here first: read as it stood, a view that lags, or that no projections
    process keeps up at all, would leave out the newest dead letters without a word. Catching up
    beside a running projections process is safe: a batch and the view's position commit together
    under the views' write lock, so each event is applied once, whichever runner applies it.
    """
    databases = open_view_databases(app.settings.store, ["tasks"])
    try:
        runner = ProjectionRunner(app.store, databases.of("tasks"), [VIEWS["tasks"]])
        try:
            runner.setup()
            head = app.store.max_position()
            runner.catch_up()
        finally:
            runner.close()
        position = runner.positions()["tasks"].position
        if position < head:
            raise StoreError(f"the tasks view reached position {position}, short of the store's head at {head}: "
                             "nothing was replayed; run the command again")
        selected: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = dead_letters(databases, tenant=tenant, task=task, since=since, limit=1000, after=after)
            selected += page.items
            if page.next is None:
                return selected
            after = page.next
    finally:
        databases.close()


def _print_page(items: Sequence[dict[str, Any]], following: str | None, as_json: bool) -> int:
    if as_json:
        _print_json({"items": list(items), "next": following})
        return 0
    for item in items:
        error = f"  {item['error_type']}: {item['error']}" if item["error_type"] else ""
        print(f"{item['id']}  {item['state']:<10} {item['task']:<24} attempts={item['attempts']} "
              f"ready={item['ready_at']}{error}")
    if following:
        print(f"(more: --after '{following}')")
    return 0


def _audit(options: argparse.Namespace) -> int:
    app = _app(options)
    query = AuditQuery(tenant=options.tenant, actor=options.actor, task=options.task, types=options.types or (),
                       since=parse_time(options.since, "--since"), until=parse_time(options.until, "--until"))
    with open_view_databases(app.settings.store, ["audit"]) as databases:
        records = audit(databases, query, limit=options.limit, after=options.after)
    for record in records:
        if options.format == "json":
            print(json.dumps(record))
        else:
            print(f"{record['position']:>8}  {record['time']}  {record['tenant']:<10} {record['actor']:<36} "
                  f"{record['type']:<17} {record['summary']}")
    return 0
