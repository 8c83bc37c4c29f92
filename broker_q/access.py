"""Authentication and authorisation: API tokens kept as events, checks that are audited.

:class:`Access` reads the access stream (every token's issue and revocation,
:data:`~broker_q.domain.access.ACCESS_STREAM`) and keeps its state in memory, reading only what was
appended since, at most every ``refresh`` seconds, and at once for a token it does not know. So a
new token works at once everywhere, and a revocation reaches every process within ``refresh``
seconds (2 by default).

Every refusal of :meth:`Access.authorize` is an ``access_denied`` event, so the audit log shows who
tried what. The roles and their permissions are in :mod:`broker_q.domain.access`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from broker_q.domain.access import (
    ACCESS_STREAM,
    ALL_TENANTS,
    ROLE_PERMISSIONS,
    AccessState,
    Permission,
    Principal,
    Role,
    TokenInfo,
    check_token,
    evolve_access,
    format_token,
    issue_token,
    parse_token,
    revoke_token,
)
from broker_q.domain.events import AccessDenied, AccessEvent
from broker_q.errors import ConcurrencyConflict, PermissionDenied, StoreUnavailable
from broker_q.store.port import EventStore

__all__ = ["ROLE_PERMISSIONS", "Access", "Permission", "Principal", "Role", "TokenInfo"]

log = logging.getLogger(__name__)


_UNKNOWN_REFRESH = 0.2
"""Seconds between reads for tokens not known here: a new token works at once, and made-up tokens
cannot make every request read the store."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Access:
    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] = _utcnow, refresh: float = 2.0) -> None:
        self._store = store
        self._clock = clock
        self._refresh = refresh
        self._state = AccessState()
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    # -- authenticating ---------------------------------------------------------------------------

    def authenticate(self, token: str) -> Principal:
        """The principal ``token`` stands for; :class:`~broker_q.errors.Unauthenticated` if none."""
        token_id, secret = parse_token(token)
        state = self._current(must_know=token_id)
        return check_token(state, token_id, secret, self._clock())

    def authorize(self, principal: Principal, permission: Permission, tenant: str | None, *, action: str) -> str | None:
        """Check that ``principal`` may ``action`` (needing ``permission``) on ``tenant``; return the
        tenant it applies to: ``tenant``, or the principal's own when ``tenant`` is None and it is
        bound to one (``None`` then means every tenant).

        A refusal raises :class:`~broker_q.errors.PermissionDenied` and is recorded as ``access_denied``.
        """
        applies_to = tenant if tenant is not None else principal.tenant
        if principal.can(permission, applies_to):
            return applies_to
        if permission not in principal.permissions:
            why = f"needs the {permission} permission, which roles {', '.join(_roles_with(permission))} have"
        else:
            why = f"is bound to tenant {principal.tenant!r}"
        message = f"{principal.describe()} may not {action}: it {why}"
        self._record_denial(principal, permission, applies_to, action, message)
        raise PermissionDenied(message)

    def _record_denial(self, principal: Principal, permission: Permission, tenant: str | None, action: str,
                       message: str) -> None:
        stream = uuid.uuid4()
        event = AccessDenied(stream_id=stream, version=1, timestamp=self._clock(),
                             tenant=tenant or principal.tenant or ALL_TENANTS, actor=principal.name,
                             correlation_id=stream, principal=principal.describe(), token_id=principal.token_id,
                             permission=str(permission), action=action[:500])
        try:
            self._store.append([event])
        except StoreUnavailable as e:  # the refusal stands; only its record is missing
            log.warning("refusal not recorded (%s): %s", e, message)

    # -- managing tokens -------------------------------------------------------------------------

    def create_token(self, *, name: str, roles: Iterable[Role | str], tenant: str | None,
                     expires_at: datetime | None = None, actor: str) -> tuple[str, TokenInfo]:
        """A new token, returned once (only the hash of its secret is stored), and what is known of it."""
        token_id, secret = uuid.uuid4(), os.urandom(32)
        chosen = [Role(role) for role in roles]
        self._decide(lambda state: issue_token(state, token_id=token_id, secret=secret, name=name, roles=chosen,
                                               tenant=tenant, expires_at=expires_at, actor=actor, now=self._clock()))
        return format_token(token_id, secret), self._state.tokens[token_id]

    def revoke(self, token_id: uuid.UUID, *, actor: str, reason: str = "revoked") -> TokenInfo:
        self._decide(lambda state: revoke_token(state, token_id, reason=reason, actor=actor, now=self._clock()))
        return self._state.tokens[token_id]

    def tokens(self) -> list[TokenInfo]:
        """Every token ever made, revoked and expired ones included, oldest first."""
        return sorted(self._current().tokens.values(), key=lambda token: token.created_at)

    def _decide(self, decide: Callable[[AccessState], AccessEvent]) -> None:
        for _ in range(20):
            event = decide(self._current(fresh=True))
            try:
                self._store.append([event])
            except ConcurrencyConflict:
                continue  # another process wrote to the access stream first: read it and decide again
            with self._lock:
                if event.version == self._state.version + 1:
                    self._state = evolve_access(self._state, event)
            return
        raise ConcurrencyConflict("the access stream kept changing under 20 attempts to write to it")

    # -- reading ---------------------------------------------------------------------------------

    def _current(self, *, must_know: uuid.UUID | None = None, fresh: bool = False) -> AccessState:
        with self._lock:
            age = time.monotonic() - self._read_at
            unknown = must_know is not None and must_know not in self._state.tokens and age >= _UNKNOWN_REFRESH
            if fresh or age >= self._refresh or unknown:
                read_at = time.monotonic()
                state = self._state
                for event in self._store.read_stream(ACCESS_STREAM, after_version=state.version or None):
                    if isinstance(event, AccessEvent):
                        state = evolve_access(state, event)
                self._state, self._read_at = state, read_at
            return self._state


def _roles_with(permission: Permission) -> list[str]:
    return [str(role) for role, granted in ROLE_PERMISSIONS.items() if permission in granted]
