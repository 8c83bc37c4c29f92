"""Who may do what: roles, permissions, principals and API tokens, decided without I/O.

A principal is whoever acts: a person or a program holding an API token, or the local operator of
the CLI. It has roles, and is bound to one tenant or, with ``tenant=None``, to every tenant. A role
grants permissions; an action needs one permission on one tenant (or on every tenant, for a listing
across tenants).

Tokens are ``bq_<token id, 32 hex>_<secret, 43 base64url>``. The id names the token's entry in the
access stream; only the SHA-256 of the secret is stored, so the store never holds a usable token.
The secret is 256 random bits, so a plain hash is enough: there is nothing to guess (a password
would need a slow hash; a token does not).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from broker_q.domain.events import AccessEvent, TokenIssued, TokenRevoked, event_id
from broker_q.errors import DomainError, Unauthenticated

__all__ = [
    "ACCESS_STREAM",
    "ALL_TENANTS",
    "ROLE_PERMISSIONS",
    "AccessState",
    "Permission",
    "Principal",
    "Role",
    "TokenInfo",
    "evolve_access",
    "issue_token",
    "parse_token",
    "revoke_token",
    "secret_hash",
]

ACCESS_STREAM = uuid.UUID("7a3c1e52-9b0d-5f6e-8a41-2c9d7b5e4f10")
"""The stream of every token's issue and revocation."""
ALL_TENANTS = "*"
"""The ``tenant`` of a token that is bound to no tenant (an admin of the whole deployment)."""


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    PRODUCER = "producer"
    VIEWER = "viewer"
    AUDITOR = "auditor"


class Permission(StrEnum):
    SUBMIT = "submit"
    READ = "read"
    """Views, task states and histories, events, workflows, schedules (without payloads)."""
    READ_PAYLOADS = "read_payloads"
    """Task arguments and results, opened when they are sealed."""
    AUDIT = "audit"
    CANCEL = "cancel"
    RETRY = "retry"
    REPLAY = "replay"
    """Replay dead letters."""
    SCHEDULES = "schedules"
    """Add, change, pause, resume and remove schedules; open and close breakers."""
    TOKENS = "tokens"
    TENANTS = "tenants"
    KEYS = "keys"
    VIEWS = "views"
    """Rebuild the views."""


ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
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
    """The one tenant it may act on; ``None``: every tenant."""
    token_id: uuid.UUID | None = None
    """The token it authenticated with; ``None`` for the local operator of the CLI."""

    @classmethod
    def local(cls, name: str) -> Principal:
        """The operator of the CLI on a machine that holds the store: whoever can open the store's
        files (and the master key beside them) can read everything in them anyway."""
        return cls(name=name, roles=frozenset({Role.ADMIN}), tenant=None)

    @property
    def permissions(self) -> frozenset[Permission]:
        return frozenset().union(*(ROLE_PERMISSIONS[role] for role in self.roles))

    def can(self, permission: Permission, tenant: str | None) -> bool:
        """Whether it may use ``permission`` on ``tenant`` (``None``: on every tenant at once)."""
        return permission in self.permissions and (self.tenant is None or tenant == self.tenant)

    def describe(self) -> str:
        roles = ",".join(sorted(self.roles)) or "no role"
        return f"{self.name} ({roles}; tenant {self.tenant or 'all'})"


@dataclass(frozen=True)
class TokenInfo:
    """What is known of a token, never its secret."""

    token_id: uuid.UUID
    name: str
    roles: frozenset[Role]
    tenant: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    secret_sha256: str = field(repr=False)
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class AccessState:
    version: int = 0
    tokens: Mapping[uuid.UUID, TokenInfo] = field(default_factory=dict)


def evolve_access(state: AccessState, event: AccessEvent) -> AccessState:
    tokens = dict(state.tokens)
    match event:
        case TokenIssued():
            tokens[event.token_id] = TokenInfo(
                token_id=event.token_id, name=event.name, roles=frozenset(Role(r) for r in event.roles),
                tenant=None if event.tenant == ALL_TENANTS else event.tenant, created_at=event.timestamp,
                created_by=event.actor, expires_at=event.expires_at, secret_sha256=event.secret_sha256)
        case TokenRevoked():
            token = tokens.get(event.token_id)
            if token is not None:
                tokens[event.token_id] = replace(token, revoked_at=event.timestamp, revoked_by=event.actor)
    return AccessState(version=event.version, tokens=tokens)


_NAME = re.compile(r"[A-Za-z0-9_.@:\-]{1,100}")


def issue_token(state: AccessState, *, token_id: uuid.UUID, secret: bytes, name: str, roles: Iterable[Role],
                tenant: str | None, expires_at: datetime | None, actor: str, now: datetime) -> TokenIssued:
    """Decide a new token's ``token_issued``: its secret is hashed here and kept nowhere else."""
    if not _NAME.fullmatch(name):
        raise DomainError(f"token name {name!r} is not a name (letters, digits, '_', '.', '@', ':', '-'; at most 100)")
    chosen = sorted({Role(role) for role in roles})
    if not chosen:
        raise DomainError("a token needs at least one role: " + ", ".join(Role))
    if expires_at is not None:
        if expires_at.utcoffset() is None:
            raise DomainError("expires_at must be an aware datetime (with a timezone)")
        if expires_at <= now:
            raise DomainError(f"expires_at {expires_at.isoformat()} is not in the future")
    if token_id in state.tokens:
        raise DomainError(f"token {token_id} exists already")
    version = state.version + 1
    return TokenIssued(stream_id=ACCESS_STREAM, version=version, timestamp=now, tenant=tenant or ALL_TENANTS,
                       actor=actor, correlation_id=event_id(ACCESS_STREAM, version),
                       token_id=token_id, name=name, roles=[str(role) for role in chosen],
                       secret_sha256=secret_hash(secret), expires_at=expires_at)


def revoke_token(state: AccessState, token_id: uuid.UUID, *, reason: str, actor: str, now: datetime) -> TokenRevoked:
    token = state.tokens.get(token_id)
    if token is None:
        raise DomainError(f"no token has the id {token_id}")
    if token.revoked_at is not None:
        raise DomainError(f"token {token_id} ({token.name}) was revoked already, at {token.revoked_at.isoformat()}")
    return TokenRevoked(stream_id=ACCESS_STREAM, version=state.version + 1, timestamp=now,
                        tenant=token.tenant or ALL_TENANTS, actor=actor,
                        correlation_id=event_id(ACCESS_STREAM, state.version + 1), token_id=token_id, reason=reason)


def format_token(token_id: uuid.UUID, secret: bytes) -> str:
    return f"bq_{token_id.hex}_{base64.urlsafe_b64encode(secret).rstrip(b'=').decode()}"


_TOKEN = re.compile(r"bq_([0-9a-f]{32})_([A-Za-z0-9_\-]{43})")


def parse_token(token: str) -> tuple[uuid.UUID, bytes]:
    """The id and secret of a token; :class:`Unauthenticated` if it is not one."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise Unauthenticated("not a broker_q token (bq_<id>_<secret>)")
    return uuid.UUID(match[1]), base64.urlsafe_b64decode(match[2] + "=")


def secret_hash(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def check_token(state: AccessState, token_id: uuid.UUID, secret: bytes, now: datetime) -> Principal:
    """The principal a token authenticates, or :class:`Unauthenticated` (the same message whatever
    the reason, but the one who holds a real token learns that it expired or was revoked)."""
    token = state.tokens.get(token_id)
    if token is None or not hmac.compare_digest(token.secret_sha256, secret_hash(secret)):
        raise Unauthenticated("unknown token")
    if token.revoked_at is not None:
        raise Unauthenticated(f"token {token.name!r} was revoked")
    if token.expires_at is not None and now >= token.expires_at:
        raise Unauthenticated(f"token {token.name!r} expired at {token.expires_at.isoformat()}")
    return Principal(name=f"token:{token.name}", roles=token.roles, tenant=token.tenant, token_id=token.token_id)
