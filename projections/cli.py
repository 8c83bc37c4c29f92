"""The replay commands of ``broker-q``: ``events``, ``replay ID`` and ``state``.

:func:`add_commands` registers them on the ``broker-q`` parser; ``python -m projections.cli`` runs
them alone. Like every ``broker-q`` command, they report an error as one line on stderr and a
non-zero exit, and their ``--json`` output is plain JSON (ids as strings, times ISO 8601, durations
in seconds). Times on the command line are ISO 8601; one without an offset is UTC.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from broker_q.app import App
from broker_q.domain.access import Permission
from broker_q.domain.task import TaskStatus
from broker_q.errors import ValidationError
from broker_q.payloads import Payloads
from broker_q.rendering import status_view
from broker_q.store.port import EventStore, Recorded
from projections.replay import EVENT_TYPES, Timeline, details, events, queue_counts_at, task_state_at, timeline

__all__ = ["add_commands", "main"]


_DETAIL_WIDTH = 60
"""The longest value the text tables show in full; ``--json`` shows everything."""

Command = Callable[[argparse.Namespace], int]


def add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Register ``events``, ``replay`` and ``state`` on ``subparsers``.

    ``common`` are parent parsers whose options every command takes as well (``parents=``). The
    commands open the store named by ``options.store`` (if the namespace has it, else the settings'
    default) and close it when done; each sets ``command`` to a function ``(options) -> exit code``
    that raises :class:`~broker_q.errors.BrokerQError` on failure.
    """

    def command(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, help=help, description=help, parents=list(common))
        sub.set_defaults(command=fn)
        return sub

    sub = command("events", _events, "list recorded events in log order, filtered")
    sub.add_argument("--from-position", type=_position, metavar="N", help="first log position (inclusive)")
    sub.add_argument("--to-position", type=_position, metavar="N", help="last log position (inclusive)")
    sub.add_argument("--since", metavar="TIME", help="events stamped at or after TIME (ISO 8601; UTC if no offset)")
    sub.add_argument("--until", metavar="TIME", help="events stamped at or before TIME")
    sub.add_argument("--type", action="append", dest="types", metavar="TYPE",
                     help=f"only this event type (repeatable): {', '.join(sorted(EVENT_TYPES))}")
    sub.add_argument("--task", metavar="ID", help="only the events of this task")
    sub.add_argument("--tenant", help="only the events of this tenant")
    sub.add_argument("--limit", type=_position, metavar="N", help="at most N events")
    sub.add_argument("--json", action="store_true", help="a JSON array of events")

    sub = command("replay", _replay, "show a task's history with the time between its events")
    sub.add_argument("id")
    sub.add_argument("--json", action="store_true")

    sub = command("state", _state, "the state of a task, or the task counts per queue, as of a time or position")
    moment = sub.add_mutually_exclusive_group(required=True)
    moment.add_argument("--at", metavar="TIME", help="as of this time (ISO 8601; UTC if no offset)")
    moment.add_argument("--position", type=_position, metavar="N", help="as of this log position")
    sub.add_argument("--task", metavar="ID", help="one task's state instead of the counts")
    sub.add_argument("--queue", help="count only this queue's tasks")
    sub.add_argument("--tenant", help="count only this tenant's tasks")
    sub.add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one replay command on its own: ``python -m projections.cli [--store URL] COMMAND ...``."""
    parser = argparse.ArgumentParser(prog="python -m projections.cli", description="broker_q replay queries")
    parser.add_argument("--store", help="event store URL (default: $BROKER_Q_STORE or sqlite:///broker_q.sqlite)")
    parser.add_argument("--token", help="an API token to act as (default: $BROKER_Q_TOKEN; none: the local operator)")
    add_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    from broker_q.cli import execute, name_commands

    name_commands(parser)
    return execute(parser.parse_args(argv))


# -- commands -----------------------------------------------------------------------------------


def _events(options: argparse.Namespace) -> int:
    since = parse_time(options.since, "--since")
    until = parse_time(options.until, "--until")
    task = _task_id(options.task)
    with _store(options) as store:
        found = events(store, from_position=options.from_position, to_position=options.to_position, since=since,
                       until=until, types=options.types, task=task, tenant=options.tenant, limit=options.limit)
        if options.json:
            # One element per line as the log is read, so that a long range never sits in memory.
            print("[", end="")
            for index, recorded in enumerate(found):
                print(("," if index else "") + "\n" + json.dumps(event_json(recorded)), end="")
            print("\n]")
        else:
            for recorded in found:
                event = recorded.event
                print(f"{recorded.position:>8}  {_time(event.timestamp)}  {event.tenant}  {event.stream_id}  "
                      f"v{event.version:<3} {event.TYPE:<10} {event.actor}  {_details_text(details(event))}".rstrip())
    return 0


def _replay(options: argparse.Namespace) -> int:
    from broker_q.cli import authorize_task, payloads_for

    task = _task_id(options.id)
    assert task is not None
    with _store(options) as store:
        history = timeline(store, task)
        authorize_task(options, Permission.READ, history.state.tenant, f"replay {task}")
        payloads, withheld = payloads_for(options, history.state.tenant, _payloads(store))
        view = status_view(history.state, payloads, withheld=withheld)  # opened here, while the store is open
    if options.json:
        print(json.dumps(timeline_json(history, view), indent=2))
        return 0
    state = history.state
    print(f"task {state.task_id}  {state.task}  {state.tenant}/{state.queue}  {state.status.value} "
          f"at version {state.version}")
    widths = (32, 11, 10, 24)
    header = ("TIME", "+DELTA", "TYPE", "ACTOR")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  DETAILS")
    for row in history.rows:
        cells = (_time(row.time), _duration(row.since_previous, sign=True), row.type, row.actor)
        print(("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  "
               + _details_text(row.details)).rstrip())
    print()
    print(_payload_text(view))
    waiting = "never started" if history.waiting is None else _duration(history.waiting)
    print(f"waiting before the first start: {waiting}")
    for attempt in history.attempts:
        if attempt.run_time is None:
            print(f"attempt {attempt.number} on {attempt.worker}: running since {_time(attempt.started_at)}")
        else:
            print(f"attempt {attempt.number} on {attempt.worker}: {_duration(attempt.run_time)}, "
                  f"{_OUTCOMES.get(attempt.outcome or '', attempt.outcome)}")
    total = f"not final ({state.status.value})" if history.total is None else _duration(history.total)
    print(f"total: {total}")
    return 0


_OUTCOMES = {"started": "taken over by the next attempt"}


def _state(options: argparse.Namespace) -> int:
    at = parse_time(options.at, "--at")
    task = _task_id(options.task)
    if task is not None and options.queue:
        raise ValidationError("--queue filters the counts: it does not apply with --task")
    as_of = {"time": at.isoformat() if at else None, "position": options.position}
    moment = f"as of {_time(at)}" if at else f"as of position {options.position}"
    with _store(options) as store:
        if task is not None:
            state = task_state_at(store, task, at=at, position=options.position)
            view = None
            if state is not None:
                if options.tenant is not None and state.tenant != options.tenant:
                    raise ValidationError(f"task {task} is not of tenant {options.tenant!r}")
                from broker_q.cli import authorize_task, payloads_for

                authorize_task(options, Permission.READ, state.tenant, f"state of {task}")
                payloads, withheld = payloads_for(options, state.tenant, _payloads(store))
                view = status_view(state, payloads, withheld=withheld)
            return _print_task_state(task, view, as_of, moment, options.json)
        counts = queue_counts_at(store, at=at, position=options.position, queue=options.queue,
                                 tenant=options.tenant)
    rows = [{"tenant": tenant, "queue": queue, **{s.value: n for s, n in per_status.items()},
             "total": sum(per_status.values())} for (tenant, queue), per_status in counts.items()]
    if options.json:
        print(json.dumps({"as_of": as_of, "queues": rows}, indent=2))
        return 0
    print(moment)
    if not rows:
        print("no tasks")
        return 0
    columns = ["tenant", "queue", *(s.value for s in TaskStatus), "total"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.upper().ljust(w) if i < 2 else c.upper().rjust(w)
                    for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) if i < 2 else str(row[c]).rjust(w)
                        for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    return 0


def _print_task_state(task: uuid.UUID, view: dict[str, Any] | None, as_of: dict[str, Any], moment: str,
                      as_json: bool) -> int:
    if as_json:
        print(json.dumps({"as_of": as_of, "task": view}, indent=2))
    elif view is None:
        print(f"task {task} did not exist yet {moment}")
    else:
        print(moment)
        for key, value in view.items():
            if value is not None:
                print(f"{key:>12}: {value if not isinstance(value, (list, dict)) else json.dumps(value)}")
    return 0


# -- JSON ---------------------------------------------------------------------------------------


def event_json(recorded: Recorded) -> dict[str, Any]:
    """A recorded event as ``events --json`` shows it."""
    event = recorded.event
    return {
        "position": recorded.position, "id": str(event.id), "stream_id": str(event.stream_id),
        "version": event.version, "time": event.timestamp.isoformat(), "type": event.TYPE, "tenant": event.tenant,
        "actor": event.actor, "correlation_id": str(event.correlation_id),
        "causation_id": str(event.causation_id) if event.causation_id else None, "details": details(event),
    }


def timeline_json(history: Timeline, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task's timeline as ``replay --json`` shows it (durations in seconds); ``state`` is the task's
    :func:`~broker_q.rendering.status_view` (its payloads opened or not), by default that of its sealed state."""

    return {
        "id": str(history.task_id),
        "state": status_view(history.state) if state is None else state,
        "events": [
            {"version": row.version, "time": row.time.isoformat(), "type": row.type, "actor": row.actor,
             "details": row.details, "since_previous_seconds": row.since_previous.total_seconds(),
             "since_submit_seconds": row.since_submit.total_seconds()}
            for row in history.rows
        ],
        "totals": {
            "waiting_seconds": _seconds(history.waiting),
            "attempts": [
                {"attempt": a.number, "worker": a.worker, "started_at": a.started_at.isoformat(),
                 "ended_at": a.ended_at.isoformat() if a.ended_at else None, "outcome": a.outcome,
                 "run_seconds": _seconds(a.run_time)}
                for a in history.attempts
            ],
            "total_seconds": _seconds(history.total),
        },
    }


# -- parsing and formatting ---------------------------------------------------------------------


def parse_time(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time from the command line, aware (UTC if it has no offset); ``None`` for ``None``."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(f"{option}: {text!r} is not an ISO 8601 time, e.g. 2024-05-01T12:30:00Z") from None
    return value if value.utcoffset() is not None else value.replace(tzinfo=UTC)


def _task_id(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValidationError(f"{text!r} is not a task id") from None


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def _payloads(store: EventStore) -> Payloads:
    """What opens the sealed payloads that these commands show (with the keys of the store's master key)."""
    return Payloads(lambda: store.keys, sealing=False)


def _payload_text(view: dict[str, Any]) -> str:
    """The task's arguments and result in one line each, or why they stay sealed."""
    if view["sealed_arguments"] is not None or view["sealed_result"] is not None:
        return f"arguments and result: sealed ({view['sealed_because'] or 'not opened'})"
    lines = [f"arguments: args={json.dumps(view['args'])} kwargs={json.dumps(view['kwargs'])}"]
    if view["state"] == TaskStatus.SUCCEEDED.value:
        lines.append(f"result: {json.dumps(view['result'])}")
    return "\n".join(lines)


@contextmanager
def _store(options: argparse.Namespace) -> Iterator[EventStore]:
    url = getattr(options, "store", None)
    app = App(**({"store": url} if url else {}))
    try:
        yield app.store
    finally:
        app.close()


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds")


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _duration(value: timedelta, *, sign: bool = False) -> str:
    """``1.250s``, ``2m03.500s``, ``1h02m03s``, ``3d04h05m``; with ``sign``, ``+`` or ``-`` in front."""
    prefix = ("-" if value < timedelta(0) else "+") if sign else ("-" if value < timedelta(0) else "")
    seconds = abs(value.total_seconds())
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    days, hours = divmod(hours, 24)
    if days:
        text = f"{days}d{hours:02d}h{minutes:02d}m"
    elif hours:
        text = f"{hours}h{minutes:02d}m{int(rest):02d}s"
    elif minutes:
        text = f"{minutes}m{rest:06.3f}s"
    else:
        text = f"{rest:.3f}s"
    return prefix + text


def _details_text(values: dict[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        if value in (None, [], {}):
            continue
        text = json.dumps(value)
        parts.append(f"{key}={text if len(text) <= _DETAIL_WIDTH else text[:_DETAIL_WIDTH - 1] + '…'}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
