"""Cron schedules on the event store: defining, pausing, resuming, removing and listing them.

:class:`Schedules` runs the pure decisions of :mod:`broker_q.domain.schedule` against the store for
one tenant: it reads a schedule's stream, decides, and appends the event with the expected version,
together with its entry in the schedule index (the stream that lets schedulers find every schedule,
``docs/decisions/0005-schedules.md``). Both appends are one transaction; when someone else wrote
either stream first, it reads again and decides again. Firing is the scheduler's
(:mod:`broker_q.scheduler`).

The module also holds the ``broker-q schedules`` and ``broker-q scheduler`` commands (:func:`add_commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from broker_q.domain import schedule
from broker_q.domain.events import ScheduleEvent, ScheduleIndexed
from broker_q.domain.schedule import INDEX_ID, ScheduleDefinition, ScheduleState, ScheduleStatus, schedule_id
from broker_q.errors import ConcurrencyConflict, DomainError
from broker_q.store.port import EventStore

if TYPE_CHECKING:
    from broker_q.app import App

__all__ = ["Schedules", "add_commands", "schedule_view"]

Decide = Callable[[ScheduleState | None, datetime], Sequence[ScheduleEvent]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Schedules:
    """The schedules of ``tenant``; ``actor`` is recorded as who changed them (a command may name another)."""

    def __init__(self, store: EventStore, *, tenant: str, actor: str, clock: Callable[[], datetime] = _utcnow,
                 max_attempts: int = 20) -> None:
        self._store = store
        self.tenant = tenant
        self._actor = actor
        self._clock = clock
        self._max_attempts = max_attempts
        self._index: dict[uuid.UUID, ScheduleIndexed] = {}
        """The latest index entry of each schedule, as far as this object has read the index."""
        self._index_version = 0
        self._lock = threading.Lock()  # the index cache is shared by the threads that call this object

    def save(self, name: str, definition: ScheduleDefinition, *, actor: str | None = None) -> ScheduleState:
        """Create schedule ``name`` or change it to ``definition``; an identical definition appends nothing."""
        state = self._decide(name, lambda state, now: schedule.create_or_change(
            state, definition, tenant=self.tenant, name=name, actor=actor or self._actor, now=now))
        assert state is not None
        return state

    def pause(self, name: str, *, reason: str = "", actor: str | None = None) -> ScheduleState:
        """Stop ``name`` from firing until it is resumed."""
        return self._command(name, schedule.pause, reason, actor)

    def resume(self, name: str, *, reason: str = "", actor: str | None = None) -> ScheduleState:
        """Let ``name`` fire again; its ``catchup`` decides what happens to the ticks it missed meanwhile."""
        return self._command(name, schedule.resume, reason, actor)

    def remove(self, name: str, *, reason: str = "", actor: str | None = None) -> ScheduleState:
        """Stop ``name`` for good (a schedule of the same name may be created later)."""
        return self._command(name, schedule.remove, reason, actor)

    def _command(self, name: str, command: Callable[..., ScheduleEvent], reason: str,
                 actor: str | None) -> ScheduleState:
        state = self._decide(name, lambda state, now: [command(state, reason=reason, actor=actor or self._actor,
                                                               now=now)])
        assert state is not None
        return state

    def get(self, name: str) -> ScheduleState:
        """Schedule ``name`` as stored now (removed ones too); :class:`DomainError` if it never existed."""
        state = self._read(schedule_id(self.tenant, name))
        if state is None:
            raise DomainError(f"there is no schedule {name!r} (tenant {self.tenant})")
        return state

    def list(self, *, removed: bool = False) -> list[ScheduleState]:
        """This tenant's schedules, by name (removed ones only if asked)."""
        self._read_index()
        with self._lock:
            ids = [e.schedule_id for e in self._index.values() if e.schedule_tenant == self.tenant]
        states = [s for s in map(self._read, ids) if s is not None]
        return sorted((s for s in states if removed or s.status is not ScheduleStatus.REMOVED), key=lambda s: s.name)

    def next(self, name: str, count: int = 5, *, after: datetime | None = None) -> builtins.list[datetime]:
        """The next ``count`` ticks of ``name`` (UTC) after ``after`` (now), whether or not it is paused."""
        return schedule.upcoming(self.get(name), count, after or self._clock())

    def history(self, name: str) -> builtins.list[ScheduleEvent]:
        """Every event of schedule ``name``, its fires included, in order."""
        return [e for e in self._store.read_stream(schedule_id(self.tenant, name)) if isinstance(e, ScheduleEvent)]

    # -- deciding ---------------------------------------------------------------------------------

    def _decide(self, name: str, decide: Decide) -> ScheduleState | None:
        """Read, decide and append (with the index entries) until an append wins or nothing needs appending."""
        stream = schedule_id(self.tenant, name)
        for _ in range(self._max_attempts):
            state = self._read(stream)
            now = self._clock()
            events = list(decide(state, now))
            if not events:
                return state
            version = self._read_index()
            entries = [schedule.index_entry(e, version + i, actor=e.actor, now=now) for i, e in enumerate(events, 1)]
            try:
                self._store.append([*events, *entries])
            except ConcurrencyConflict:
                continue  # the schedule changed, or another schedule was indexed first: decide again
            self._remember(entries)
            return schedule.replay(events, state)
        raise ConcurrencyConflict(f"schedule {name} or the schedule index changed under {self._max_attempts} "
                                  "decisions in a row; try again")

    def _read(self, stream: uuid.UUID) -> ScheduleState | None:
        return schedule.replay(e for e in self._store.read_stream(stream) if isinstance(e, ScheduleEvent))

    def _read_index(self) -> int:
        """Read what the index gained since the last read; return its version."""
        with self._lock:
            after = self._index_version
        self._remember([e for e in self._store.read_stream(INDEX_ID, after_version=after)
                        if isinstance(e, ScheduleIndexed)])
        with self._lock:
            return self._index_version

    def _remember(self, entries: Sequence[ScheduleIndexed]) -> None:
        with self._lock:
            for entry in entries:
                if entry.version == self._index_version + 1:  # a slower thread's older read adds nothing
                    self._index[entry.schedule_id] = entry
                    self._index_version = entry.version


# -- the command line -------------------------------------------------------------------------------


def schedule_view(state: ScheduleState, next_fire: datetime | None) -> dict[str, Any]:
    """A schedule as the command line shows it (JSON-ready)."""
    definition = state.definition
    return {
        "name": state.name, "tenant": state.tenant, "status": state.status.value, "cron": definition.cron,
        "timezone": definition.timezone, "catchup": definition.catchup.value, "task": definition.task,
        "queue": definition.queue, "args": definition.args, "kwargs": definition.kwargs,
        "priority": definition.priority, "next_fire": _iso(next_fire), "last_fire": _iso(state.last_fire),
        "last_task_id": str(state.last_task_id) if state.last_task_id else None, "fires": state.fires,
        "changed_at": _iso(state.changed_at), "changed_by": state.changed_by, "reason": state.reason,
        "version": state.version, "id": str(state.schedule_id),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    serve: Callable[[argparse.Namespace, Callable[[asyncio.Event], list[Any]]], int],
) -> None:
    """Register ``schedules`` (list), ``schedules add|pause|resume|remove|next|history`` and ``scheduler``.

    ``serve`` runs long-lived components until SIGTERM (``broker_q.cli``). Like the other commands,
    these open the store named by ``options.store``, set ``command`` to a function
    ``(options) -> exit code`` and raise :class:`~broker_q.errors.BrokerQError` on failure.
    """
    sub = subparsers.add_parser("scheduler", help="fire the due ticks of every cron schedule",
                                description="fire the due ticks of every cron schedule of every tenant; "
                                            "any number of schedulers may run at once")
    sub.set_defaults(command=lambda options: _run_scheduler(options, serve))
    sub.add_argument("-v", "--verbose", action="store_true")

    group = subparsers.add_parser("schedules", help="cron schedules: list, add, pause, resume, remove, next",
                                  description="cron schedules: list, add, pause, resume, remove, next")
    group.set_defaults(command=_list, removed=False, json=False, tenant=None)
    actions = group.add_subparsers(metavar="ACTION")

    def action(name: str, fn: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=text, description=text)
        parser.set_defaults(command=fn)
        parser.add_argument("--tenant", help="the schedules' tenant (default: $BROKER_Q_TENANT or 'default')")
        return parser

    sub = action("list", _list, "every schedule of the tenant, with its next fire")
    sub.add_argument("--removed", action="store_true", help="removed schedules too")
    sub.add_argument("--json", action="store_true")

    sub = action("add", _add, "create a schedule, or change it to this definition")
    sub.add_argument("name")
    sub.add_argument("--cron", required=True,
                     help="five fields (minute hour day month weekday), or six with seconds last")
    sub.add_argument("--task", required=True, metavar="NAME")
    sub.add_argument("--args", default="[]", help="positional arguments as a JSON array")
    sub.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    sub.add_argument("--queue")
    sub.add_argument("--priority", type=int)
    sub.add_argument("--timezone", default="UTC", help="an IANA name, e.g. Europe/Paris (default UTC)")
    sub.add_argument("--catchup", default="skip", choices=[c.value for c in schedule.Catchup],
                     help="after downtime: skip missed ticks, fire the latest once, or fire all (default skip)")
    sub.add_argument("--app", metavar="MODULE:APP", help="check the task and its arguments against this App")

    for name, fn, text in (("pause", _pause, "stop a schedule from firing until it is resumed"),
                           ("resume", _resume, "let a paused schedule fire again (its catchup applies)"),
                           ("remove", _remove, "stop a schedule for good")):
        sub = action(name, fn, text)
        sub.add_argument("name")
        sub.add_argument("--reason", default="", help="why (kept in the schedule's history)")

    sub = action("next", _next, "the next fire times of a schedule")
    sub.add_argument("name")
    sub.add_argument("-n", "--count", type=int, default=5, help="how many (default 5)")
    sub.add_argument("--json", action="store_true")

    sub = action("history", _history, "every event of a schedule, its fires included")
    sub.add_argument("name")
    sub.add_argument("--json", action="store_true")


@contextmanager
def _app(options: argparse.Namespace) -> Iterator[App]:
    from broker_q.app import App  # here, not at the top: broker_q.app imports this module
    from broker_q.cli import load_app

    overrides = {k: v for k, v in (("store", getattr(options, "store", None)),
                                   ("amqp_url", getattr(options, "amqp_url", None))) if v}
    reference = getattr(options, "app", None)
    if reference:
        app = load_app(reference)
        if overrides:
            app.configure(**overrides)
    else:
        app = App(**overrides)
    try:
        yield app
    finally:
        app.close()


def _schedules(app: App, options: argparse.Namespace) -> Schedules:
    from broker_q.cli import operator

    return Schedules(app.store, tenant=options.tenant or app.settings.tenant, actor=operator())


def _run_scheduler(options: argparse.Namespace,
                   serve: Callable[[argparse.Namespace, Callable[[asyncio.Event], list[Any]]], int]) -> int:
    from broker_q.scheduler import Scheduler

    with _app(options) as app:
        return serve(options, lambda stop: [Scheduler(app.store, payloads=app.payloads).run(stop)])


def _list(options: argparse.Namespace) -> int:
    with _app(options) as app:
        now = _utcnow()
        rows = [schedule_view(s, schedule.due(s, now).next_fire)
                for s in _schedules(app, options).list(removed=options.removed)]
    if options.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no schedules")
        return 0
    columns = ("name", "status", "cron", "timezone", "catchup", "task", "next_fire", "last_fire", "fires")
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in ([c.upper() for c in columns], *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _add(options: argparse.Namespace) -> int:
    from broker_q.cli import _json_arg, operator

    with _app(options) as app:
        state = app.schedule(options.name, cron=options.cron, task=options.task,
                             args=_json_arg(options.args, list, "--args"),
                             kwargs=_json_arg(options.kwargs, dict, "--kwargs"), queue=options.queue,
                             priority=options.priority, timezone=options.timezone, catchup=options.catchup,
                             tenant=options.tenant, actor=operator())
        next_fire = schedule.due(state, _utcnow()).next_fire
    print(f"{state.name}: {state.status} at v{state.version}, next fire {_iso(next_fire) or 'none'}")
    return 0


def _pause(options: argparse.Namespace) -> int:
    with _app(options) as app:
        state = _schedules(app, options).pause(options.name, reason=options.reason)
    print(f"{state.name}: paused at v{state.version}")
    return 0


def _resume(options: argparse.Namespace) -> int:
    with _app(options) as app:
        state = _schedules(app, options).resume(options.name, reason=options.reason)
    print(f"{state.name}: resumed at v{state.version} (catchup {state.definition.catchup})")
    return 0


def _remove(options: argparse.Namespace) -> int:
    with _app(options) as app:
        state = _schedules(app, options).remove(options.name, reason=options.reason)
    print(f"{state.name}: removed at v{state.version}")
    return 0


def _next(options: argparse.Namespace) -> int:
    with _app(options) as app:
        schedules = _schedules(app, options)
        state = schedules.get(options.name)
        ticks = schedules.next(options.name, options.count)
    zone = ZoneInfo(state.definition.timezone)
    if options.json:
        print(json.dumps([_iso(t) for t in ticks]))
        return 0
    if state.status is not ScheduleStatus.ACTIVE:
        print(f"{state.name} is {state.status}: these are the ticks it would fire")
    for tick in ticks:
        print(f"{_iso(tick)}  {tick.astimezone(zone).isoformat()} {state.definition.timezone}")
    return 0


def _history(options: argparse.Namespace) -> int:
    from broker_q.rendering import history_row

    with _app(options) as app:
        rows = [history_row(e) for e in _schedules(app, options).history(options.name)]
    if options.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"there is no schedule {options.name!r}")
    for row in rows:
        details = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in row["data"].items()
                            if k != "name" and v not in (None, [], {}, ""))
        print(f"{row['time']}  v{row['version']:<4} {row['type']:<17} {row['actor']:<36} {details}")
    return 0
