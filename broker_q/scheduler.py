"""The scheduler: fires the due ticks of every cron schedule, however many schedulers run.

Each fire is one transaction of the store holding the schedule's ``schedule_fired`` at its next
version and the ``submitted`` of the fired task, whose id is derived from the schedule and the tick
(:func:`broker_q.domain.schedule.fire`). So schedulers need no lease and no coordination: when two
fire the same tick, the store refuses the second transaction whole (the version is taken), and its
scheduler reads the schedule's new events, sees the fire, and moves on. Every tick fires once and its
task exists once. The relay then publishes the task like any other.

A scheduler finds the schedules by reading the schedule index, one stream naming every schedule of
every tenant and recording every change to their definitions and status (``docs/decisions/0005``).
It keeps each schedule's state in memory and reads only the events appended since
(``read_stream(after_version=...)``): the index's new entries every ``poll_interval`` seconds,
a schedule's stream when the index says it changed or when a fire of it lost a race. It sleeps until
the next tick of any schedule, or ``poll_interval`` at most. A change made elsewhere (a pause, a
new schedule) is seen within ``poll_interval``; a fire never waits for a poll.

With ``payloads`` (the app's, as ``broker-q scheduler`` and ``broker-q run`` pass them), the
arguments of each fired task are sealed before its ``submitted`` is appended, as any submit's are.

Store calls run in a thread, as everywhere in broker_q; while the store is unreachable the
scheduler retries with a capped backoff, and the ticks missed meanwhile follow each schedule's
``catchup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker_q.domain import schedule
from broker_q.domain.events import Event, ScheduleEvent, ScheduleFired, ScheduleIndexed, TaskSubmitted
from broker_q.domain.schedule import DEFAULT_GRACE, INDEX_ID, ScheduleState
from broker_q.errors import ConcurrencyConflict, DomainError, StoreUnavailable
from broker_q.payloads import Payloads
from broker_q.store.port import EventStore

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Quiet:
    """A schedule had nothing due at its ``version``, and will not until ``next_fire``."""

    version: int
    next_fire: datetime | None


class Scheduler:
    """Fires due ticks until stopped (:meth:`run`), or one pass at a time (:meth:`step`).

    ``clock`` gives the time ticks are compared with (inject one in tests); ``grace`` is how late a
    tick may fire and still be on time (``catchup="skip"`` drops older ones). ``payloads`` seal the
    arguments of the tasks it fires (when their sealing is on); without them tasks are fired plain.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Callable[[], datetime] = _utcnow,
        poll_interval: float = 1.0,
        grace: timedelta = DEFAULT_GRACE,
        max_backoff: float = 5.0,
        max_attempts: int = 10,
        name: str | None = None,
        payloads: Payloads | None = None,
    ) -> None:
        if poll_interval <= 0 or max_attempts < 1:
            raise ValueError("poll_interval must be above 0 and max_attempts at least 1")
        self._store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._grace = grace
        self._max_backoff = max_backoff
        self._max_attempts = max_attempts
        self._payloads = payloads
        self.actor = f"scheduler:{socket.gethostname()}:{os.getpid()}:{name or uuid.uuid4().hex[:6]}"
        self.wakeup = asyncio.Event()
        """Set it to make the scheduler look at the index at once (an in-process hint; polling is the guarantee)."""
        self.fired = 0
        """Ticks this scheduler fired (its transactions that committed)."""
        self.lost = 0
        """Fires of this scheduler that another scheduler (or a change of the schedule) got to first."""
        self._states: dict[uuid.UUID, ScheduleState] = {}
        self._indexed: dict[uuid.UUID, int] = {}
        """Per schedule, the latest version the index named."""
        self._index_version = 0
        self._quiet: dict[uuid.UUID, _Quiet] = {}

    @property
    def schedules(self) -> dict[uuid.UUID, ScheduleState]:
        """The schedules as this scheduler last read them."""
        return dict(self._states)

    async def run(self, stop: asyncio.Event) -> None:
        """Fire due ticks until ``stop`` is set."""
        log.info("scheduler %s started", self.actor)
        backoff = 0.1
        while not stop.is_set():
            try:
                next_fire = await self.step()
                backoff = 0.1
                wait = self._poll_interval
                if next_fire is not None:
                    # A hair past the tick: a timer that fires a little early would find nothing due.
                    wait = min(wait, max(0.0, (next_fire - self._clock()).total_seconds()) + 0.001)
            except StoreUnavailable as e:
                log.warning("scheduler: event store unavailable (%s); retrying in %.1fs", e, backoff)
                wait, backoff = backoff, min(backoff * 2, self._max_backoff)
            await self._sleep(stop, wait)
        log.info("scheduler %s stopped (%d fired, %d lost to another)", self.actor, self.fired, self.lost)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wakeup.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
        self.wakeup.clear()

    async def step(self) -> datetime | None:
        """One pass: read what changed, fire every due tick; return the next tick of any schedule."""
        return await asyncio.to_thread(self._step)

    def _step(self) -> datetime | None:
        self._refresh()
        now = self._clock()
        due = {sid: ticks for sid, state in self._states.items() if (ticks := self._due(state, now))}
        for _ in range(self._max_attempts):
            if not due:
                break
            due = self._fire(due, now)
        if due:
            log.warning("scheduler: %d schedule(s) kept changing while firing; trying again at the next pass",
                        len(due))
        nexts = [q.next_fire for sid, q in self._quiet.items()
                 if q.next_fire is not None and sid in self._states and self._states[sid].active]
        return min(nexts, default=None)

    def _due(self, state: ScheduleState, now: datetime) -> tuple[datetime, ...]:
        """The ticks ``state`` should fire now; remembers when it fires next when nothing is due."""
        if not state.active:
            return ()
        quiet = self._quiet.get(state.schedule_id)
        if quiet is not None and quiet.version == state.version and (quiet.next_fire is None
                                                                     or now < quiet.next_fire):
            return ()
        decided = schedule.due(state, now, grace=self._grace)
        if not decided.fires:
            self._quiet[state.schedule_id] = _Quiet(state.version, decided.next_fire)
        return decided.fires

    def _fire(self, due: dict[uuid.UUID, tuple[datetime, ...]], now: datetime) -> dict[uuid.UUID, tuple[datetime, ...]]:
        """Append the fires of every schedule in ``due``, each all-or-nothing; return those to decide again."""
        ids = list(due)
        groups = [self._sealed(schedule.fire(self._states[sid], due[sid], actor=self.actor, now=now)) for sid in ids]
        results = self._store.append_groups(groups)
        again: dict[uuid.UUID, tuple[datetime, ...]] = {}
        for sid, events, result in zip(ids, groups, results, strict=True):
            if isinstance(result, ConcurrencyConflict):
                self.lost += 1
                self._read(sid)  # what got there first: a fire of another scheduler, a pause, a change
                if ticks := self._due(self._states[sid], now):
                    again[sid] = ticks
            elif isinstance(result, StoreUnavailable):
                raise result
            elif isinstance(result, Exception):
                log.error("scheduler: the fires of schedule %s were refused: %s", self._states[sid].name, result)
            else:
                fires = [e for e in events if isinstance(e, ScheduleFired)]
                self.fired += len(fires)
                self._apply(sid, fires)
                log.debug("scheduler: %s fired %s", self._states[sid].name, ", ".join(
                    e.fire_time.isoformat() for e in fires))
                self._due(self._states[sid], now)  # remembers its next tick
        return again

    def _sealed(self, events: Sequence[Event]) -> list[Event]:
        payloads = self._payloads
        if payloads is None or not payloads.sealing:
            return list(events)
        return [payloads.submitted(e) if isinstance(e, TaskSubmitted) else e for e in events]

    # -- reading ----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the index's new entries, then the new events of every schedule they say changed."""
        entries = self._store.read_stream(INDEX_ID, after_version=self._index_version)
        for entry in entries:
            if isinstance(entry, ScheduleIndexed):
                self._indexed[entry.schedule_id] = max(self._indexed.get(entry.schedule_id, 0), entry.schedule_version)
            self._index_version = entry.version
        for sid, version in list(self._indexed.items()):
            known = self._states.get(sid)
            if known is None or known.version < version:
                self._read(sid)

    def _read(self, sid: uuid.UUID) -> None:
        known = self._states.get(sid)
        events = self._store.read_stream(sid, after_version=None if known is None else known.version)
        self._apply(sid, [e for e in events if isinstance(e, ScheduleEvent)])

    def _apply(self, sid: uuid.UUID, events: Sequence[ScheduleEvent]) -> None:
        try:
            state = schedule.replay(events, self._states.get(sid))
        except DomainError as e:  # a stream that the domain would never have written: leave it alone
            log.error("scheduler: schedule %s cannot be read: %s", sid, e)
            self._indexed.pop(sid, None)
            return
        if state is not None:
            self._states[sid] = state
