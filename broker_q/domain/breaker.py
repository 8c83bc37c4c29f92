"""Circuit breakers: one per downstream service, a fold over that service's breaker stream.

Every worker process shares a service's breaker, so its state lives in the event store, in the
stream :func:`breaker_id` names (a uuid5 of the service name: every process names the same
stream without asking anyone). Commands are pure functions ``(state, inputs) -> events``; the
caller passes ``now`` and appends the events with the expected versions they carry, so that two
workers deciding the same transition at once conflict in the store and only one decision stands.
:func:`evolve` refuses any event the commands could not have produced.

Phases (stored) and statuses (the phase as seen at ``now``)::

    closed ──(threshold failures within window)──> open(until) ──(now >= until)──> half_open
      ^                                                ^                              │ admit
      │                                                └──(the probe fails)── probing(task, until)
      └──────────────────(the probe succeeds)─────────────────────────────────────────┘
    forced open (until None): stays open until an operator closes it
    probing whose ``until`` has passed: half_open again, so a probe whose worker died cannot wedge it

Only a closed breaker records failures; an open or probing one has already said what it knows.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, TypedDict

from broker_q.domain.events import (
    BreakerClosed,
    BreakerEvent,
    BreakerFailureRecorded,
    BreakerOpened,
    BreakerProbeStarted,
)
from broker_q.errors import DomainError

__all__ = [
    "MAX_FAILURE_THRESHOLD",
    "SYSTEM_TENANT",
    "Admission",
    "BreakerPhase",
    "BreakerPolicy",
    "BreakerState",
    "BreakerStatus",
    "admit",
    "breaker_id",
    "evolve",
    "failures_in_window",
    "force",
    "new_state",
    "record_failure",
    "record_success",
    "replay",
    "status",
]

SYSTEM_TENANT = "system"
"""The tenant of breaker streams: a breaker belongs to the deployment, not to one tenant."""
MAX_FAILURE_THRESHOLD = 1000
"""The state keeps this many recent failures at most, so a threshold cannot be higher."""

_BREAKER_NS = uuid.UUID("3c0f6a52-8e1d-5b7a-a4c9-2f6e1d0b9a47")
_SERVICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")


def breaker_id(service: str) -> uuid.UUID:
    """The stream id of ``service``'s breaker: the same in every process, for ever."""
    if not _SERVICE.fullmatch(service):
        raise DomainError(f"service name {service!r} is not a name (letters, digits, '_', '.', ':', '-'; at most 200)")
    return uuid.uuid5(_BREAKER_NS, service)


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a service's breaker opens, and for how long. Durations are seconds."""

    failure_threshold: int = 5
    """Failures within ``window`` that open the breaker."""
    window: float = 60.0
    open_for: float = 30.0
    """How long an opened breaker defers tasks before it lets one probe run."""
    probe_timeout: float = 60.0
    """How long a probe may run before another task may probe instead (its worker may have died)."""
    probe_wait: float = 5.0
    """How long a task waits while another task probes, at most (the probe may end sooner)."""

    def __post_init__(self) -> None:
        if not 1 <= self.failure_threshold <= MAX_FAILURE_THRESHOLD:
            raise DomainError(f"failure_threshold must be between 1 and {MAX_FAILURE_THRESHOLD}, "
                              f"got {self.failure_threshold}")
        for name in ("window", "open_for", "probe_timeout", "probe_wait"):
            value = getattr(self, name)
            if not 0 < value <= 86400 * 7:
                raise DomainError(f"{name} must be a number of seconds above 0 and at most a week, got {value}")


class BreakerPhase(StrEnum):
    """What the events say, without a clock."""

    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class BreakerStatus(StrEnum):
    """The phase as seen at a given time."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    """Open and due: the next task admitted runs as the probe."""
    PROBING = "probing"


@dataclass(frozen=True, slots=True)
class BreakerState:
    """A service's breaker as of its latest applied event (version 0: no event yet, closed)."""

    service: str
    stream_id: uuid.UUID
    version: int = 0
    phase: BreakerPhase = BreakerPhase.CLOSED
    failures: tuple[datetime, ...] = ()
    """When the failures recorded since the breaker last closed happened (the latest few)."""
    until: datetime | None = None
    """Open: when it becomes half open (None if forced). Probing: the probe's deadline."""
    forced: bool = False
    probe: uuid.UUID | None = None
    reason: str | None = None
    """Why it last opened or closed."""
    changed_at: datetime | None = None
    """When it last opened, closed or began a probe."""
    changed_by: str | None = None


def new_state(service: str) -> BreakerState:
    """The state of a breaker with no events: closed, no failures."""
    return BreakerState(service=service, stream_id=breaker_id(service))


def status(state: BreakerState, now: datetime) -> BreakerStatus:
    if state.phase is BreakerPhase.CLOSED:
        return BreakerStatus.CLOSED
    if state.until is None:  # forced open
        return BreakerStatus.OPEN
    if now < state.until:
        return BreakerStatus.OPEN if state.phase is BreakerPhase.OPEN else BreakerStatus.PROBING
    return BreakerStatus.HALF_OPEN


def failures_in_window(state: BreakerState, policy: BreakerPolicy, now: datetime) -> int:
    """Failures recorded in the ``window`` seconds up to ``now`` (only a closed breaker has any)."""
    since = now - timedelta(seconds=policy.window)
    # No upper bound: a failure stamped by a process whose clock runs ahead still counts.
    return sum(1 for t in state.failures if t > since)


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a task of the service may start now.

    ``run``: start it. ``probe``: start it as the breaker's probe, after appending ``event`` (it is
    the probe only if that append wins; its outcome then closes or reopens the breaker). ``defer``:
    do not start it, offer it again at ``until`` without spending an attempt.
    """

    action: Literal["run", "probe", "defer"]
    event: BreakerProbeStarted | None = None
    until: datetime | None = None
    reason: str = ""

    @property
    def runs(self) -> bool:
        return self.action != "defer"


def record_failure(state: BreakerState, policy: BreakerPolicy, *, task_id: uuid.UUID, error_type: str,
                   now: datetime, actor: str, tenant: str = SYSTEM_TENANT) -> list[BreakerEvent]:
    """A task of the service failed: count it, open the breaker at the threshold, reopen on a failed probe."""
    if state.phase is BreakerPhase.PROBING and task_id == state.probe:
        return [_opened(state, 1, now=now, actor=actor, tenant=tenant, until=now + _seconds(policy.open_for),
                        reason=f"probe {task_id} failed: {error_type}")]
    if state.phase is not BreakerPhase.CLOSED:
        return []
    failed = BreakerFailureRecorded(**_meta(state, 1, now, actor, tenant), task_id=task_id, error_type=error_type)
    count = failures_in_window(state, policy, now) + 1
    if count < policy.failure_threshold:
        return [failed]
    return [failed, _opened(state, 2, now=now, actor=actor, tenant=tenant, until=now + _seconds(policy.open_for),
                            reason=f"{count} failures within {policy.window:g}s, the last {error_type}")]


def record_success(state: BreakerState, *, task_id: uuid.UUID, now: datetime, actor: str,
                   tenant: str = SYSTEM_TENANT) -> list[BreakerEvent]:
    """A task of the service succeeded: the probe's success closes the breaker; any other changes nothing."""
    if state.phase is not BreakerPhase.PROBING or task_id != state.probe:
        return []
    return [BreakerClosed(**_meta(state, 1, now, actor, tenant), reason=f"probe {task_id} succeeded")]


def admit(state: BreakerState, policy: BreakerPolicy, *, task_id: uuid.UUID, now: datetime, actor: str,
          tenant: str = SYSTEM_TENANT) -> Admission:
    """May ``task_id`` start now? See :class:`Admission`."""
    current = status(state, now)
    if current is BreakerStatus.CLOSED:
        return Admission("run")
    if current is BreakerStatus.HALF_OPEN:
        until = now + _seconds(policy.probe_timeout)
        event = BreakerProbeStarted(**_meta(state, 1, now, actor, tenant), task_id=task_id, until=until)
        return Admission("probe", event=event, until=until, reason=f"probing {state.service}")
    if current is BreakerStatus.PROBING:
        assert state.until is not None
        if task_id == state.probe:  # the probe delivered again: it is still the probe
            return Admission("probe", until=state.until, reason=f"probing {state.service}")
        return Admission("defer", until=min(state.until, now + _seconds(policy.probe_wait)),
                         reason=f"breaker of {state.service} is probing with task {state.probe}")
    # Forced open has no end: look again after ``open_for``, as an automatic opening would.
    until = state.until if state.until is not None else now + _seconds(policy.open_for)
    return Admission("defer", until=until, reason=f"breaker of {state.service} is open: {state.reason}")


def force(state: BreakerState, *, open: bool, reason: str, actor: str, now: datetime,
          tenant: str = SYSTEM_TENANT) -> BreakerEvent:
    """An operator opens the breaker until closed by hand, or closes it whatever it was doing."""
    if not reason.strip():
        raise DomainError("forcing a breaker needs a reason (it is kept in the breaker's history)")
    if open:
        if state.phase is BreakerPhase.OPEN and state.forced:
            raise DomainError(f"the breaker of {state.service} is forced open already")
        return _opened(state, 1, now=now, actor=actor, tenant=tenant, until=None, reason=reason, forced=True)
    if state.phase is BreakerPhase.CLOSED:
        raise DomainError(f"the breaker of {state.service} is closed already")
    return BreakerClosed(**_meta(state, 1, now, actor, tenant), reason=reason, forced=True)


def _opened(state: BreakerState, offset: int, *, now: datetime, actor: str, tenant: str, until: datetime | None,
            reason: str, forced: bool = False) -> BreakerOpened:
    return BreakerOpened(**_meta(state, offset, now, actor, tenant), until=until, reason=reason, forced=forced)


class _Meta(TypedDict):
    stream_id: uuid.UUID
    version: int
    timestamp: datetime
    tenant: str
    actor: str
    correlation_id: uuid.UUID
    service: str


def _meta(state: BreakerState, offset: int, now: datetime, actor: str, tenant: str) -> _Meta:
    # The stream id is the correlation id: everything a breaker does belongs to the breaker's story.
    return {"stream_id": state.stream_id, "version": state.version + offset, "timestamp": now, "tenant": tenant,
            "actor": actor, "correlation_id": state.stream_id, "service": state.service}


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def evolve(state: BreakerState, event: BreakerEvent) -> BreakerState:
    """Apply ``event`` to ``state``; refuse an event that does not follow from it."""
    if event.stream_id != state.stream_id or event.service != state.service or event.version != state.version + 1:
        raise DomainError(f"{event.TYPE} v{event.version} of breaker {event.service} does not follow "
                          f"breaker {state.service} v{state.version}")
    match event:
        case BreakerFailureRecorded():
            if state.phase is not BreakerPhase.CLOSED:
                raise DomainError(f"the breaker of {state.service} is {state.phase}: it records no failures")
            failures = (*state.failures, event.timestamp)[-MAX_FAILURE_THRESHOLD:]
            return replace(state, version=event.version, failures=failures)
        case BreakerOpened():
            if event.forced and state.phase is BreakerPhase.OPEN and state.forced:
                raise DomainError(f"the breaker of {state.service} is forced open already")
            if not event.forced and (state.phase is BreakerPhase.OPEN or event.until is None):
                raise DomainError(f"the breaker of {state.service} is {state.phase}: it cannot open "
                                  f"until {event.until}")
            return _changed(state, event, BreakerPhase.OPEN, until=event.until, forced=event.forced,
                            reason=event.reason)
        case BreakerProbeStarted():
            if state.phase is BreakerPhase.CLOSED or state.until is None or event.timestamp < state.until:
                raise DomainError(f"the breaker of {state.service} is not half open: no probe can start")
            return _changed(state, event, BreakerPhase.PROBING, until=event.until, probe=event.task_id,
                            reason=state.reason)
        case BreakerClosed():
            if state.phase is BreakerPhase.CLOSED or (not event.forced and state.phase is not BreakerPhase.PROBING):
                raise DomainError(f"the breaker of {state.service} is {state.phase}: it cannot close"
                                  + ("" if event.forced else " without a probe"))
            return _changed(state, event, BreakerPhase.CLOSED, reason=event.reason)
    raise DomainError(f"{event.TYPE} is not an event of a breaker")


def _changed(state: BreakerState, event: BreakerEvent, phase: BreakerPhase, *, reason: str | None,
             until: datetime | None = None, forced: bool = False, probe: uuid.UUID | None = None,
             failures: tuple[datetime, ...] = ()) -> BreakerState:
    return BreakerState(service=state.service, stream_id=state.stream_id, version=event.version, phase=phase,
                        failures=failures, until=until, forced=forced, probe=probe, reason=reason,
                        changed_at=event.timestamp, changed_by=event.actor)


def replay(service: str, events: Iterable[BreakerEvent], state: BreakerState | None = None) -> BreakerState:
    """The state after ``events`` in order, from ``state`` (a new breaker's if None)."""
    state = new_state(service) if state is None else state
    for event in events:
        state = evolve(state, event)
    return state
