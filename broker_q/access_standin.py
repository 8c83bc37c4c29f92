"""A stand-in for ``broker_q.access`` while it is written: the same interface, tokens in memory.

The HTTP API is written against the interface of ``broker_q.access`` (tokens kept as events,
refusals audited). Until that module is merged, this one keeps tokens in the memory of the process
and records no refusal. This file is deleted when ``broker_q.access`` lands.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from broker_q.errors import BrokerQError
from broker_q.store.port import EventStore

if TYPE_CHECKING:
    from broker_q.app import App

__all__ = [
    "ROLE_PERMISSIONS",
    "Access",
    "Permission",
    "PermissionDenied",
    "Principal",
    "Role",
    "TokenInfo",
    "Unauthenticated",
    "access_of",
]


class Unauthenticated(BrokerQError):
    """No valid token was given: missing, malformed, unknown, expired or revoked."""


class PermissionDenied(BrokerQError):
    """The principal may not do this."""


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    PRODUCER = "producer"
    VIEWER = "viewer"
    AUDITOR = "auditor"


class Permission(StrEnum):
    SUBMIT = "submit"
    READ = "read"
    READ_PAYLOADS = "read_payloads"
    AUDIT = "audit"
    CANCEL = "cancel"
    RETRY = "retry"
    REPLAY = "replay"
    SCHEDULES = "schedules"
    TOKENS = "tokens"
    TENANTS = "tenants"
    KEYS = "keys"


ROLE_PERMISSIONS = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset({Permission.READ, Permission.READ_PAYLOADS, Permission.CANCEL, Permission.RETRY,
                              Permission.REPLAY, Permission.SCHEDULES}),
    Role.PRODUCER: frozenset({Permission.SUBMIT}),
    Role.VIEWER: frozenset({Permission.READ}),
    Role.AUDITOR: frozenset({Permission.AUDIT}),
}


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[Role]
    tenant: str | None
    token_id: uuid.UUID | None = None

    @property
    def permissions(self) -> frozenset[Permission]:
        return frozenset().union(*(ROLE_PERMISSIONS[role] for role in self.roles))

    def can(self, permission: Permission, tenant: str | None) -> bool:
        return permission in self.permissions and (self.tenant is None or tenant == self.tenant)


@dataclass(frozen=True)
class TokenInfo:
    token_id: uuid.UUID
    name: str
    roles: frozenset[Role]
    tenant: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    secret_sha256: str
    revoked_at: datetime | None = None
    revoked_by: str | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Access:
    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._clock = clock
        self._tokens: dict[uuid.UUID, TokenInfo] = {}
        self._lock = threading.Lock()

    def authenticate(self, token: str) -> Principal:
        prefix, _, rest = token.partition("_")
        token_hex, _, secret = rest.partition("_")
        try:
            token_id = uuid.UUID(hex=token_hex)
        except ValueError:
            raise Unauthenticated("the token is malformed") from None
        with self._lock:
            info = self._tokens.get(token_id)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if prefix != "bq" or info is None or not hmac.compare_digest(digest, info.secret_sha256):
            raise Unauthenticated("the token is unknown")
        if info.revoked_at is not None:
            raise Unauthenticated("the token was revoked")
        if info.expires_at is not None and self._clock() >= info.expires_at:
            raise Unauthenticated("the token has expired")
        return Principal(info.name, info.roles, info.tenant, info.token_id)

    def authorize(self, principal: Principal, permission: Permission, tenant: str | None, *,
                  action: str) -> str | None:
        applies_to = tenant if tenant is not None else principal.tenant
        if principal.can(permission, applies_to):
            return applies_to
        raise PermissionDenied(f"{principal.name} may not {action}")

    def create_token(self, *, name: str, roles: Iterable[Role | str], tenant: str | None,
                     expires_at: datetime | None = None, actor: str) -> tuple[str, TokenInfo]:
        token_id, secret = uuid.uuid4(), os.urandom(24).hex()
        info = TokenInfo(token_id, name, frozenset(Role(r) for r in roles), tenant, self._clock(), actor, expires_at,
                         hashlib.sha256(secret.encode()).hexdigest())
        with self._lock:
            self._tokens[token_id] = info
        return f"bq_{token_id.hex}_{secret}", info

    def revoke(self, token_id: uuid.UUID, *, actor: str, reason: str = "revoked") -> TokenInfo:
        with self._lock:
            info = self._tokens[token_id] = replace(self._tokens[token_id], revoked_at=self._clock(), revoked_by=actor)
        return info

    def tokens(self) -> list[TokenInfo]:
        with self._lock:
            return sorted(self._tokens.values(), key=lambda token: token.created_at)


_ACCESS: weakref.WeakKeyDictionary[App, Access] = weakref.WeakKeyDictionary()
_ACCESS_LOCK = threading.Lock()


def access_of(app: App) -> Access:
    """``app.access`` to be: one :class:`Access` per App."""
    with _ACCESS_LOCK:
        if app not in _ACCESS:
            _ACCESS[app] = Access(app.store)
        return _ACCESS[app]
