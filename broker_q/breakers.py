"""The circuit breakers of downstream services, on the event store, shared by every worker process.

:class:`Breakers` runs the pure decisions of :mod:`broker_q.domain.breaker` against the store: it
reads a breaker's stream, decides, and appends with the expected version. The store's unique
(stream, version) is the lock: when two workers decide at once (both see the fifth failure, both
see the breaker half open), one append wins and the other gets
:class:`~broker_q.errors.ConcurrencyConflict`, reads the stream again and decides again on what
the winner did. So however many processes race, a breaker opens once and has one probe.

Each instance caches a breaker's state for ``cache_ttl`` seconds (1 s by default) so that a task
of a healthy service costs no read. A decision that appends anything is always made on a fresh
read, never on the cache, so the cache can only delay what a worker sees (a breaker that opened or
closed elsewhere) by ``cache_ttl``; it can never make two workers both win a transition.

The module also holds the ``broker-q breakers`` commands (:func:`add_commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from broker_q.domain import breaker
from broker_q.domain.breaker import Admission, BreakerPolicy, BreakerState, breaker_id
from broker_q.domain.events import (
    BreakerClosed,
    BreakerEvent,
    BreakerFailureRecorded,
    BreakerOpened,
    BreakerProbeStarted,
)
from broker_q.errors import ConcurrencyConflict
from broker_q.store.port import EventStore

__all__ = ["Breakers", "add_commands", "breaker_view", "event_view", "main", "operator_actor"]

T = TypeVar("T")
Decide = Callable[[BreakerState, datetime], tuple[T, Sequence[BreakerEvent]]]
"""A decision on a state at a time: its result, and the events to append for it (none: nothing to write)."""

_LOG_PAGE = 1000


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Cached:
    state: BreakerState
    read_at: float


class Breakers:
    """The breakers of the services named in ``policies`` (and of any other, with ``default``).

    ``admit`` and ``record`` are for workers (async: the store is called in a thread); ``force``,
    ``state``, ``states``, ``services`` and ``timeline`` are for the command line and tests (sync).
    """

    def __init__(
        self,
        store: EventStore,
        policies: Mapping[str, BreakerPolicy] | None = None,
        *,
        default: BreakerPolicy | None = None,
        clock: Callable[[], datetime] = _utcnow,
        cache_ttl: float = 1.0,
        max_attempts: int = 32,
        tenant: str = breaker.SYSTEM_TENANT,
    ) -> None:
        if cache_ttl < 0 or max_attempts < 1:
            raise ValueError("cache_ttl must not be negative and max_attempts must be at least 1")
        self._store = store
        self._policies = dict(policies or {})
        for service in self._policies:
            breaker_id(service)  # refuses a bad name now rather than at the first task
        self._default = default or BreakerPolicy()
        self._clock = clock
        self._cache_ttl = cache_ttl
        self._max_attempts = max_attempts
        self._tenant = tenant
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()  # the cache is written from the threads that read the store

    def policy(self, service: str) -> BreakerPolicy:
        return self._policies.get(service, self._default)

    # -- workers ----------------------------------------------------------------------------------

    async def admit(self, service: str, task_id: uuid.UUID, actor: str) -> Admission:
        """May ``task_id`` of ``service`` start now? A ``probe`` admission's event is appended already."""
        policy = self.policy(service)

        def decide(state: BreakerState, now: datetime) -> tuple[Admission, Sequence[BreakerEvent]]:
            admission = breaker.admit(state, policy, task_id=task_id, now=now, actor=actor, tenant=self._tenant)
            return admission, () if admission.event is None else (admission.event,)

        return await self._decide_async(service, decide)

    async def record(self, service: str, task_id: uuid.UUID, ok: bool, error_type: str | None,
                     actor: str) -> list[BreakerEvent]:
        """Record the outcome of an attempt of ``task_id``; return the events appended (often none)."""
        policy = self.policy(service)

        def decide(state: BreakerState, now: datetime) -> tuple[list[BreakerEvent], Sequence[BreakerEvent]]:
            if ok:
                events = breaker.record_success(state, task_id=task_id, now=now, actor=actor, tenant=self._tenant)
            else:
                events = breaker.record_failure(state, policy, task_id=task_id, error_type=error_type or "Exception",
                                                now=now, actor=actor, tenant=self._tenant)
            return events, events

        return await self._decide_async(service, decide)

    # -- operators --------------------------------------------------------------------------------

    def force(self, service: str, open: bool, reason: str, actor: str) -> BreakerEvent:
        """Open ``service``'s breaker until it is closed by hand, or close it now."""

        def decide(state: BreakerState, now: datetime) -> tuple[BreakerEvent, Sequence[BreakerEvent]]:
            event = breaker.force(state, open=open, reason=reason, actor=actor, now=now, tenant=self._tenant)
            return event, (event,)

        return self._decide(service, decide)

    def state(self, service: str) -> BreakerState:
        """``service``'s breaker as stored now (closed with no failures if it has no events)."""
        return self._read(service)

    def states(self, services: Iterable[str] | None = None) -> list[BreakerState]:
        """The breakers of ``services`` (named ones need no events), or of every service with events."""
        return [self._read(s) for s in (self.services() if services is None else services)]

    def services(self) -> list[str]:
        """Every service whose breaker has an event, found by reading the whole log (for the command line)."""
        found: set[str] = set()
        after, last = 0, self._store.max_position()
        while after < last:
            page = self._store.read_log(after, _LOG_PAGE, to_position=last)
            if not page:
                break
            found.update(r.event.service for r in page if isinstance(r.event, BreakerEvent))
            after = page[-1].position
        return sorted(found)

    def timeline(self, service: str) -> list[BreakerEvent]:
        """Every event of ``service``'s breaker, in order."""
        return [e for e in self._store.read_stream(breaker_id(service)) if isinstance(e, BreakerEvent)]

    # -- deciding ---------------------------------------------------------------------------------

    async def _decide_async(self, service: str, decide: Decide[T]) -> T:
        cached = self._cached(service)
        if cached is not None:
            result, events = decide(cached, self._clock())
            if not events:
                return result
        return await asyncio.to_thread(self._decide, service, decide)

    def _decide(self, service: str, decide: Decide[T]) -> T:
        """Read, decide and append until an append wins or nothing needs appending."""
        for _ in range(self._max_attempts):
            state = self._read(service)
            result, events = decide(state, self._clock())
            if not events:
                return result
            try:
                self._store.append(events)
            except ConcurrencyConflict:
                continue  # someone else changed the breaker first: decide again on what they did
            self._remember(breaker.replay(service, events, state))
            return result
        raise ConcurrencyConflict(f"the breaker of {service} changed under {self._max_attempts} decisions in a row")

    def _read(self, service: str) -> BreakerState:
        events = self._store.read_stream(breaker_id(service))
        state = breaker.replay(service, (e for e in events if isinstance(e, BreakerEvent)))
        self._remember(state)
        return state

    def _cached(self, service: str) -> BreakerState | None:
        with self._lock:
            cached = self._cache.get(service)
        if cached is None or time.monotonic() - cached.read_at > self._cache_ttl:
            return None
        return cached.state

    def _remember(self, state: BreakerState) -> None:
        with self._lock:
            known = self._cache.get(state.service)
            if known is None or known.state.version <= state.version:  # a slower thread's older read loses
                self._cache[state.service] = _Cached(state, time.monotonic())


# -- the command line -------------------------------------------------------------------------------


def operator_actor() -> str:
    """``operator:<user>@<host>``: who forced a breaker from this shell."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no $USER, as in some containers
        user = "unknown"
    return f"operator:{user}@{socket.gethostname()}"


def breaker_view(state: BreakerState, policy: BreakerPolicy, now: datetime) -> dict[str, Any]:
    """A breaker as the command line shows it (JSON-ready)."""
    return {
        "service": state.service,
        "status": breaker.status(state, now).value,
        "until": _iso(state.until),
        "forced": state.forced,
        "probe": str(state.probe) if state.probe else None,
        "failures_in_window": breaker.failures_in_window(state, policy, now),
        "window": policy.window,
        "changed_at": _iso(state.changed_at),
        "changed_by": state.changed_by,
        "reason": state.reason,
        "version": state.version,
    }


def event_view(event: BreakerEvent) -> dict[str, Any]:
    """One event of a breaker's timeline, with what it did in words (JSON-ready)."""
    return {"version": event.version, "time": _iso(event.timestamp), "type": event.TYPE, "actor": event.actor,
            "what": _what(event)}


def _what(event: BreakerEvent) -> str:
    match event:
        case BreakerFailureRecorded():
            return f"task {event.task_id} failed: {event.error_type}"
        case BreakerOpened(forced=True):
            return f"forced open: {event.reason}"
        case BreakerOpened():
            return f"opened until {_iso(event.until)}: {event.reason}"
        case BreakerProbeStarted():
            return f"task {event.task_id} probes until {_iso(event.until)}"
        case BreakerClosed():
            return f"{'forced closed' if event.forced else 'closed'}: {event.reason}"
    return event.TYPE


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Register ``breakers`` (list), ``breakers timeline SERVICE``, ``breakers open|close SERVICE``.

    Like the other commands, they open the store named by ``options.store`` (else the settings'
    default), set ``command`` to a function ``(options) -> exit code``, and raise
    :class:`~broker_q.errors.BrokerQError` on failure (``broker_q.cli.execute`` prints it).
    """
    sub = subparsers.add_parser("breakers", help="show the circuit breakers of downstream services",
                                description="show the circuit breakers of downstream services; "
                                            "open or close one by hand", parents=list(common))
    sub.set_defaults(command=_list)
    sub.add_argument("--service", action="append", dest="services", metavar="NAME",
                     help="only this service's breaker (repeatable); shown even if it never changed")
    sub.add_argument("--json", action="store_true")
    actions = sub.add_subparsers(metavar="ACTION", dest="action")

    timeline = actions.add_parser("timeline", help="every event of a service's breaker, in order")
    timeline.set_defaults(command=_timeline)
    timeline.add_argument("service")
    timeline.add_argument("--json", action="store_true")

    for name, opening, text in (("open", True, "open a breaker until it is closed by hand"),
                                ("close", False, "close a breaker now, whatever it was doing")):
        force = actions.add_parser(name, help=text, description=text)
        force.set_defaults(command=_force, open=opening)
        force.add_argument("service")
        force.add_argument("--reason", required=True, help="why (kept in the breaker's history)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the breaker commands alone: ``python -m broker_q.breakers [--store URL] breakers ...``."""
    parser = argparse.ArgumentParser(prog="python -m broker_q.breakers", description="broker_q circuit breakers")
    parser.add_argument("--store", help="event store URL (default: $BROKER_Q_STORE or sqlite:///broker_q.sqlite)")
    add_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    from broker_q.cli import execute

    return execute(parser.parse_args(argv))


@contextmanager
def _breakers(options: argparse.Namespace) -> Iterator[Breakers]:
    from broker_q.app import App  # here, not at the top: broker_q.cli imports this module to register it

    url = getattr(options, "store", None)
    app = App(**({"store": url} if url else {}))
    try:
        yield Breakers(app.store, cache_ttl=0)
    finally:
        app.close()


def _list(options: argparse.Namespace) -> int:
    with _breakers(options) as breakers:
        states = breakers.states(options.services)
        now = _utcnow()
        rows = [breaker_view(s, breakers.policy(s.service), now) for s in states]
    if options.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no breakers: no service's breaker has recorded anything")
        return 0
    columns = ("service", "status", "until", "failures_in_window", "changed_at", "changed_by", "reason")
    header = ("SERVICE", "STATUS", "UNTIL", "FAILURES", "CHANGED", "BY", "REASON")
    cells = [[_cell(row, c) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    for line in (list(header), *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=False)) + "  " + line[-1])
    return 0


def _cell(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if column == "until" and value is None and row["forced"]:
        return "closed by hand"
    if column == "failures_in_window":
        return f"{value} in {row['window']:g}s"
    return "-" if value is None else str(value)


def _timeline(options: argparse.Namespace) -> int:
    with _breakers(options) as breakers:
        rows = [event_view(e) for e in breakers.timeline(options.service)]
    if options.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"the breaker of {options.service} has recorded nothing: it is closed")
    for row in rows:
        print(f"{row['time']}  v{row['version']:<4} {row['type']:<16} {row['actor']:<32} {row['what']}")
    return 0


def _force(options: argparse.Namespace) -> int:
    with _breakers(options) as breakers:
        event = breakers.force(options.service, options.open, options.reason, operator_actor())
    print(f"{options.service}: {_what(event)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
