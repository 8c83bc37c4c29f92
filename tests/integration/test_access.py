"""Tokens, roles and quotas (``broker_q/access.py``, ``broker_q/tenants.py``) on every store:
memory://, a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from broker_q.access import Access, Permission, Principal, Role
from broker_q.domain.access import ROLE_PERMISSIONS, parse_token
from broker_q.domain.events import AccessDenied, QuotaExceeded, TokenIssued
from broker_q.errors import DomainError, PermissionDenied, Unauthenticated, ValidationError
from broker_q.errors import QuotaExceeded as QuotaExceededError
from broker_q.store import EventStore, open_store
from broker_q.tenants import Tenants


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


E = TypeVar("E")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def events_of(store: EventStore, kind: type[E]) -> list[E]:
    return [r.event for r in store.read_log(0, 10_000) if isinstance(r.event, kind)]


# -- tokens -----------------------------------------------------------------------------------------


def test_a_token_authenticates_its_principal_and_only_its_hash_is_stored(store: EventStore) -> None:
    access = Access(store)
    token, info = access.create_token(name="ci-deploy", roles=["producer", "viewer"], tenant="acme", actor="admin")
    principal = access.authenticate(token)
    assert principal == Principal(name="token:ci-deploy", roles=frozenset({Role.PRODUCER, Role.VIEWER}),
                                  tenant="acme", token_id=info.token_id)
    assert Access(store).authenticate(token) == principal  # another process: read from the store
    _, secret = parse_token(token)
    (issued,) = events_of(store, TokenIssued)
    stored = repr(store.read_log(0, 100))
    assert secret.hex() not in stored
    assert token[len("bq_") + 33:] not in stored  # the secret as the token spells it
    assert issued.secret_sha256 in stored


@pytest.mark.parametrize("bad", ["", "Bearer x", "bq_zz_" + "a" * 43, "bq_" + "0" * 32 + "_" + "a" * 43])
def test_what_is_not_a_known_token_does_not_authenticate(store: EventStore, bad: str) -> None:
    access = Access(store)
    access.create_token(name="someone", roles=["viewer"], tenant=None, actor="admin")
    with pytest.raises(Unauthenticated):
        access.authenticate(bad)


def test_a_wrong_secret_for_a_real_token_id_does_not_authenticate(store: EventStore) -> None:
    access = Access(store)
    token, _ = access.create_token(name="someone", roles=["viewer"], tenant=None, actor="admin")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="unknown token"):
        access.authenticate(forged)


def test_an_expired_or_revoked_token_stops_authenticating(store: EventStore) -> None:
    clock = Clock()
    access = Access(store, clock=clock, refresh=0)
    expiring, _ = access.create_token(name="temp", roles=["viewer"], tenant=None, actor="admin",
                                      expires_at=clock.now + timedelta(hours=1))
    revoked, info = access.create_token(name="leaked", roles=["admin"], tenant=None, actor="admin")
    access.authenticate(expiring)
    clock.now += timedelta(hours=1)
    with pytest.raises(Unauthenticated, match="expired"):
        access.authenticate(expiring)
    other = Access(store, clock=clock, refresh=0)  # another process, which had it in memory
    other.authenticate(revoked)
    access.revoke(info.token_id, actor="admin", reason="leaked in a log")
    with pytest.raises(Unauthenticated, match="revoked"):
        other.authenticate(revoked)
    with pytest.raises(DomainError, match="revoked already"):
        access.revoke(info.token_id, actor="admin")
    assert [(t.name, t.revoked_at is not None) for t in access.tokens()] == [("temp", False), ("leaked", True)]


def test_a_token_needs_a_role_a_name_and_a_future_expiry(store: EventStore) -> None:
    access = Access(store)
    with pytest.raises(DomainError, match="at least one role"):
        access.create_token(name="x", roles=[], tenant=None, actor="admin")
    with pytest.raises(ValueError, match="superuser"):
        access.create_token(name="x", roles=["superuser"], tenant=None, actor="admin")
    with pytest.raises(DomainError, match="not a name"):
        access.create_token(name="two words", roles=["viewer"], tenant=None, actor="admin")
    with pytest.raises(DomainError, match="not in the future"):
        access.create_token(name="x", roles=["viewer"], tenant=None, actor="admin",
                            expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert access.tokens() == []


# -- permissions ------------------------------------------------------------------------------------


def test_the_roles_grant_what_the_issue_names() -> None:
    assert ROLE_PERMISSIONS[Role.ADMIN] == frozenset(Permission)
    assert ROLE_PERMISSIONS[Role.PRODUCER] == {Permission.SUBMIT}
    assert ROLE_PERMISSIONS[Role.VIEWER] == {Permission.READ}
    assert ROLE_PERMISSIONS[Role.AUDITOR] == {Permission.AUDIT}
    assert {Permission.CANCEL, Permission.RETRY, Permission.REPLAY, Permission.SCHEDULES} <= ROLE_PERMISSIONS[
        Role.OPERATOR]
    assert not ROLE_PERMISSIONS[Role.OPERATOR] & {Permission.TOKENS, Permission.TENANTS, Permission.KEYS,
                                                  Permission.SUBMIT}


def test_a_denial_names_what_was_missing_and_is_audited(store: EventStore) -> None:
    access = Access(store)
    token, info = access.create_token(name="dash", roles=["viewer"], tenant="acme", actor="admin")
    viewer = access.authenticate(token)
    assert access.authorize(viewer, Permission.READ, None, action="queues") == "acme"  # its own tenant
    assert access.authorize(viewer, Permission.READ, "acme", action="queues") == "acme"
    with pytest.raises(PermissionDenied,
                       match=r"token:dash \(viewer; tenant acme\) may not cancel .*cancel permission"):
        access.authorize(viewer, Permission.CANCEL, "acme", action="cancel task 42")
    with pytest.raises(PermissionDenied, match="bound to tenant 'acme'"):
        access.authorize(viewer, Permission.READ, "globex", action="queues --tenant globex")
    denials = events_of(store, AccessDenied)
    assert [(d.tenant, d.actor, d.permission, d.action, d.token_id) for d in denials] == [
        ("acme", "token:dash", "cancel", "cancel task 42", info.token_id),
        ("globex", "token:dash", "read", "queues --tenant globex", info.token_id)]


def test_an_admin_of_every_tenant_may_do_anything_anywhere(store: EventStore) -> None:
    access = Access(store)
    admin = access.authenticate(access.create_token(name="root", roles=["admin"], tenant=None, actor="boot")[0])
    for permission in Permission:
        assert access.authorize(admin, permission, "acme", action="x") == "acme"
    assert access.authorize(admin, Permission.READ, None, action="queues") is None  # every tenant
    assert events_of(store, AccessDenied) == []


# -- quotas -----------------------------------------------------------------------------------------


def test_quotas_are_events_and_changes_keep_the_quotas_not_given(store: EventStore) -> None:
    tenants = Tenants(store)
    tenants.create("acme", description="the ACME team", actor="admin")
    with pytest.raises(DomainError, match="exists already"):
        tenants.create("acme", actor="admin")
    with pytest.raises(DomainError, match="not a tenant name"):
        tenants.create("Not A Name", actor="admin")
    tenants.set_quota("acme", max_waiting=10, submit_rate=5, actor="admin")
    quota = tenants.set_quota("acme", max_payload_bytes=1000, actor="admin")
    assert (quota.max_waiting, quota.submit_rate, quota.max_payload_bytes, quota.burst) == (10, 5, 1000, 5)
    assert Tenants(store).quota("acme") == quota  # another process reads the same
    assert tenants.set_quota("acme", max_waiting=None, actor="admin").max_waiting is None
    assert tenants.set_quota("acme", clear=True, actor="admin").as_dict() == dict.fromkeys(quota.as_dict())
    with pytest.raises(DomainError, match="at least 1"):
        tenants.set_quota("acme", max_waiting=0, actor="admin")
    with pytest.raises(ValidationError, match="no quota named colour"):
        tenants.set_quota("acme", colour=1, actor="admin")
    assert [t.name for t in tenants.list()] == ["acme"]


def test_each_quota_refuses_with_its_name_and_the_refusal_is_audited(store: EventStore) -> None:
    waiting = {"acme": 0}
    tenants = Tenants(store, waiting=lambda tenant: waiting[tenant], waiting_refresh=0)
    tenants.set_quota("acme", max_payload_bytes=100, max_waiting=3, submit_rate=1, submit_burst=2, actor="admin")
    tenants.admit("globex", task="t", actor="c")  # no quota: always admitted
    with pytest.raises(QuotaExceededError, match="max_payload_bytes=100") as refused:
        tenants.admit("acme", task="t", payload_bytes=lambda: 101, actor="c")
    assert refused.value.quota == "max_payload_bytes"
    waiting["acme"] = 2
    with pytest.raises(QuotaExceededError, match=r"has 2 task\(s\) waiting; 2 more would be over .* max_waiting=3"):
        tenants.admit("acme", task="t", count=2, actor="c")
    tenants.admit("acme", task="t", actor="c")
    tenants.admit("acme", task="t", actor="c")  # the burst of 2
    with pytest.raises(QuotaExceededError, match="submit_rate=1/s") as refused:
        tenants.admit("acme", task="t", actor="client:x")
    assert refused.value.quota == "submit_rate"
    audited = events_of(store, QuotaExceeded)
    assert [(e.tenant, e.quota, e.limit) for e in audited] == [
        ("acme", "max_payload_bytes", 100), ("acme", "max_waiting", 3), ("acme", "submit_rate", 1)]
    assert audited[-1].actor == "client:x"


def test_a_max_waiting_quota_without_views_refuses_clearly(store: EventStore) -> None:
    tenants = Tenants(store)
    tenants.set_quota("acme", max_waiting=3, actor="admin")
    with pytest.raises(ValidationError, match="no view to count"):
        tenants.admit("acme", task="t", actor="c")

