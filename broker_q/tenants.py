"""Tenants and their quotas: kept as events, checked at every submission.

:class:`Tenants` reads the tenants stream (:data:`~broker_q.domain.tenants.TENANTS_STREAM`) and
keeps its state in memory, reading what was appended since at most every ``refresh`` seconds: a
quota set by an admin applies everywhere within that time (2 s by default).

:meth:`Tenants.admit` is called for every submission, before anything is recorded:

- the payload size is exact;
- the rate is a token bucket of each submitting process: with N processes submitting for one
  tenant, the tenant may reach N times its rate (a bucket shared between processes would cost a
  write to the store per submission);
- the number of waiting tasks is read from the queue view, at most once a second per tenant: a
  burst may pass the limit by what is submitted within the projections' lag and that second. With
  no view built yet, a tenant with a ``max_waiting`` quota cannot submit (the limit cannot be checked).

Every refusal raises :class:`~broker_q.errors.QuotaExceeded`, naming the quota, and is recorded as a
``quota_exceeded`` event.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from broker_q.domain.events import QuotaExceeded as QuotaExceededEvent
from broker_q.domain.events import TenantEvent
from broker_q.domain.tenants import (
    TENANTS_STREAM,
    Quota,
    TenantInfo,
    TenantsState,
    TokenBucket,
    create_tenant,
    evolve_tenants,
    set_quota,
)
from broker_q.errors import ConcurrencyConflict, QuotaExceeded, StoreUnavailable, ValidationError
from broker_q.store.port import EventStore

__all__ = ["Quota", "TenantInfo", "Tenants"]

log = logging.getLogger(__name__)

WaitingCount = Callable[[str], int]
"""How many tasks of a tenant wait now; raises :class:`~broker_q.errors.ValidationError` if unknown."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Tenants:
    def __init__(self, store: EventStore, *, waiting: WaitingCount | None = None,
                 clock: Callable[[], datetime] = _utcnow, refresh: float = 2.0, waiting_refresh: float = 1.0) -> None:
        self._store = store
        self._waiting = waiting
        self._clock = clock
        self._refresh = refresh
        self._waiting_refresh = waiting_refresh
        self._state = TenantsState()
        self._read_at = -float("inf")
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[Quota, TokenBucket]] = {}
        self._waiting_seen: dict[str, tuple[float, int]] = {}

    # -- administering ---------------------------------------------------------------------------

    def create(self, tenant: str, *, description: str = "", actor: str) -> TenantInfo:
        self._decide(lambda state: create_tenant(state, tenant, description=description, actor=actor,
                                                 now=self._clock()))
        return self._state.tenants[tenant]

    def set_quota(self, tenant: str, *, actor: str, clear: bool = False, **changes: float | int | None) -> Quota:
        """Change the quotas given in ``changes`` (``None``: no limit), the others staying as they are
        (all of them back to no limit first with ``clear``)."""
        unknown = set(changes) - set(Quota().as_dict())
        if unknown:
            names = ", ".join(Quota().as_dict())
            raise ValidationError(f"no quota named {', '.join(sorted(unknown))}; the quotas are {names}")

        def decide(state: TenantsState) -> TenantEvent:
            base = {} if clear else state.quota(tenant).as_dict()
            return set_quota(state, tenant, Quota(**{**base, **changes}), actor=actor, now=self._clock())  # type: ignore[arg-type]

        self._decide(decide)
        return self._state.quota(tenant)

    def list(self) -> list[TenantInfo]:
        return sorted(self._current().tenants.values(), key=lambda info: info.name)

    def created(self) -> frozenset[str]:
        """The tenants an admin created: each has work queues of its own (see ``Topology.route``)."""
        return frozenset(name for name, info in self._current().tenants.items() if info.created_at is not None)

    def quota(self, tenant: str) -> Quota:
        return self._current().quota(tenant)

    # -- admitting submissions -------------------------------------------------------------------

    def unlimited(self, tenant: str) -> bool:
        """Whether ``tenant`` surely has no quota now, without reading anything (False if unsure):
        lets a coroutine skip :meth:`admit`, which may read the store, for most tenants."""
        with self._lock:
            fresh = time.monotonic() - self._read_at < self._refresh
            return fresh and self._state.quota(tenant) == Quota()

    def admit(self, tenant: str, *, task: str, count: int = 1, payload_bytes: Callable[[], int] = lambda: 0,
              actor: str) -> None:
        """Check ``count`` submissions of ``task`` for ``tenant`` against its quotas (the largest
        payload being ``payload_bytes()`` bytes); raise :class:`~broker_q.errors.QuotaExceeded` if over one."""
        quota = self.quota(tenant)
        if quota == Quota():
            return
        if quota.max_payload_bytes is not None and (size := payload_bytes()) > quota.max_payload_bytes:
            self._refuse(tenant, task, actor, "max_payload_bytes", quota.max_payload_bytes,
                         f"arguments of {size} bytes are over tenant {tenant!r}'s quota "
                         f"max_payload_bytes={quota.max_payload_bytes}")
        if quota.max_waiting is not None:
            waiting = self._waiting_now(tenant)
            if waiting + count > quota.max_waiting:
                self._refuse(tenant, task, actor, "max_waiting", quota.max_waiting,
                             f"tenant {tenant!r} has {waiting} task(s) waiting; {count} more would be over its "
                             f"quota max_waiting={quota.max_waiting}")
        if quota.submit_rate is not None:
            wait = self._bucket(tenant, quota).take(count, time.monotonic())
            if wait:
                self._refuse(tenant, task, actor, "submit_rate", quota.submit_rate,
                             f"tenant {tenant!r} is over its quota submit_rate={quota.submit_rate:g}/s "
                             f"(burst {quota.burst}): try again in {wait:.2f} s")

    def _bucket(self, tenant: str, quota: Quota) -> TokenBucket:
        with self._lock:
            known = self._buckets.get(tenant)
            if known is None or known[0] != quota:  # a changed quota starts a full bucket
                assert quota.submit_rate is not None
                assert quota.burst is not None
                known = self._buckets[tenant] = (quota, TokenBucket(quota.submit_rate, quota.burst, time.monotonic()))
            return known[1]

    def _waiting_now(self, tenant: str) -> int:
        now = time.monotonic()
        seen = self._waiting_seen.get(tenant)
        if seen is not None and now - seen[0] < self._waiting_refresh:
            return seen[1]
        if self._waiting is None:
            raise ValidationError(f"tenant {tenant!r} has a max_waiting quota, and no view to count its waiting "
                                  "tasks with")
        count = self._waiting(tenant)
        self._waiting_seen[tenant] = (now, count)
        return count

    def _refuse(self, tenant: str, task: str, actor: str, quota: str, limit: float, message: str) -> None:
        stream = uuid.uuid4()
        event = QuotaExceededEvent(stream_id=stream, version=1, timestamp=self._clock(), tenant=tenant, actor=actor,
                                   correlation_id=stream, quota=quota, limit=float(limit), task=task, message=message)
        try:
            self._store.append([event])
        except StoreUnavailable as e:  # the refusal stands; only its record is missing
            log.warning("quota refusal not recorded (%s): %s", e, message)
        raise QuotaExceeded(message, quota)

    # -- reading ---------------------------------------------------------------------------------

    def _decide(self, decide: Callable[[TenantsState], TenantEvent]) -> None:
        for _ in range(20):
            event = decide(self._current(fresh=True))
            try:
                self._store.append([event])
            except ConcurrencyConflict:
                continue  # another admin wrote first: read again and decide again
            with self._lock:
                if event.version == self._state.version + 1:
                    self._state = evolve_tenants(self._state, event)
            return
        raise ConcurrencyConflict("the tenants stream kept changing under 20 attempts to write to it")

    def _current(self, *, fresh: bool = False) -> TenantsState:
        with self._lock:
            if fresh or time.monotonic() - self._read_at >= self._refresh:
                read_at = time.monotonic()
                state = self._state
                for event in self._store.read_stream(TENANTS_STREAM, after_version=state.version or None):
                    if isinstance(event, TenantEvent):
                        state = evolve_tenants(state, event)
                self._state, self._read_at = state, read_at
            return self._state
