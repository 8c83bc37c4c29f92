"""Tenants and their quotas, decided without I/O.

Every tenant an admin creates, and every change of its quotas, is an event of one stream
(:data:`TENANTS_STREAM`). A tenant nobody created may still be used (``default`` always is): it has
no quota. Quotas bound what a tenant may put into the queue:

- ``max_waiting``: tasks waiting at most (blocked, ready or waiting for a retry);
- ``submit_rate`` and ``submit_burst``: submissions per second on average, and at once (a token
  bucket of ``submit_burst`` tokens refilled at ``submit_rate`` a second);
- ``max_payload_bytes``: the size of a task's arguments (args and kwargs as JSON) at most.

:class:`TokenBucket` is the rate check, kept by each submitting process for itself.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime

from broker_q.domain.events import TenantCreated, TenantEvent, TenantQuotaSet, event_id
from broker_q.errors import DomainError

__all__ = ["TENANTS_STREAM", "Quota", "TenantInfo", "TenantsState", "TokenBucket", "create_tenant",
           "evolve_tenants", "set_quota"]

TENANTS_STREAM = uuid.UUID("3f8e2b7d-1c4a-5d9e-b6f0-8a2c4e6d1b39")
_TENANT = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")


@dataclass(frozen=True)
class Quota:
    max_waiting: int | None = None
    submit_rate: float | None = None
    submit_burst: int | None = None
    max_payload_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_waiting", "submit_burst", "max_payload_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DomainError(f"quota {name} must be a whole number of at least 1, got {value!r}")
        if self.submit_rate is not None and not (self.submit_rate > 0 and math.isfinite(self.submit_rate)):
            raise DomainError(f"quota submit_rate must be a positive number of submissions a second, "
                              f"got {self.submit_rate!r}")
        if self.submit_burst is not None and self.submit_rate is None:
            raise DomainError("quota submit_burst needs a submit_rate")

    @property
    def burst(self) -> int | None:
        """The bucket's size: ``submit_burst``, or the rate rounded up (at least 1)."""
        if self.submit_rate is None:
            return None
        return self.submit_burst if self.submit_burst is not None else max(1, math.ceil(self.submit_rate))

    def as_dict(self) -> dict[str, float | int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TenantInfo:
    name: str
    created_at: datetime | None
    """``None`` for a tenant that was given a quota without being created."""
    description: str = ""
    quota: Quota = field(default_factory=Quota)


@dataclass(frozen=True)
class TenantsState:
    version: int = 0
    tenants: Mapping[str, TenantInfo] = field(default_factory=dict)

    def quota(self, tenant: str) -> Quota:
        info = self.tenants.get(tenant)
        return info.quota if info is not None else Quota()


def evolve_tenants(state: TenantsState, event: TenantEvent) -> TenantsState:
    tenants = dict(state.tenants)
    known = tenants.get(event.tenant)
    match event:
        case TenantCreated():
            tenants[event.tenant] = TenantInfo(event.tenant, event.timestamp, event.description,
                                               known.quota if known else Quota())
        case TenantQuotaSet():
            quota = Quota(max_waiting=event.max_waiting, submit_rate=event.submit_rate,
                          submit_burst=event.submit_burst, max_payload_bytes=event.max_payload_bytes)
            tenants[event.tenant] = (TenantInfo(event.tenant, None, quota=quota) if known is None
                                     else TenantInfo(known.name, known.created_at, known.description, quota))
    return TenantsState(version=event.version, tenants=tenants)


def _check_name(tenant: str) -> None:
    if not _TENANT.fullmatch(tenant):
        raise DomainError(f"tenant {tenant!r} is not a tenant name (lowercase letters, digits, '_' and '-')")


def create_tenant(state: TenantsState, tenant: str, *, description: str, actor: str, now: datetime) -> TenantCreated:
    _check_name(tenant)
    known = state.tenants.get(tenant)
    if known is not None and known.created_at is not None:
        raise DomainError(f"tenant {tenant!r} exists already (created {known.created_at.isoformat()})")
    version = state.version + 1
    return TenantCreated(stream_id=TENANTS_STREAM, version=version, timestamp=now, tenant=tenant, actor=actor,
                         correlation_id=event_id(TENANTS_STREAM, version), description=description[:500])


def set_quota(state: TenantsState, tenant: str, quota: Quota, *, actor: str, now: datetime) -> TenantQuotaSet:
    _check_name(tenant)
    version = state.version + 1
    return TenantQuotaSet(stream_id=TENANTS_STREAM, version=version, timestamp=now, tenant=tenant, actor=actor,
                          correlation_id=event_id(TENANTS_STREAM, version), **quota.as_dict())  # type: ignore[arg-type]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` a second; :meth:`take` spends them or says when there are enough."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = now

    def take(self, n: int, now: float) -> float:
        """Spend ``n`` tokens and return 0, or spend none and return the seconds until there are ``n``."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate
