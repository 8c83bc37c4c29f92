"""``/v1/tokens`` and ``/v1/tenants``: who may act, and what each tenant may put in the queue
(``broker-q tokens`` and ``broker-q tenants``).

Tokens need the ``tokens`` permission, tenants the ``tenants`` permission (both are the admins').
An admin bound to one tenant sees and manages that tenant's tokens and quotas only.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from broker_q.access import Permission
from broker_q.api.auth import Caller, CallerDep
from broker_q.api.errors import NotFound, errors
from broker_q.api.models import (
    TENANT_PATTERN,
    QuotaChange,
    TenantRequest,
    TenantView,
    TokenCreated,
    TokenRequest,
    TokenView,
)
from broker_q.api.models import Quota as QuotaView
from broker_q.domain.access import TokenInfo
from broker_q.domain.tenants import Quota, TenantInfo
from broker_q.errors import DomainError, ValidationError

__all__ = ["router"]

router = APIRouter(tags=["administration"])

TenantName = Annotated[str, Path(pattern=TENANT_PATTERN)]


def _token(info: TokenInfo) -> TokenView:
    return TokenView(id=info.token_id, name=info.name, roles=sorted(info.roles), tenant=info.tenant,
                     created_at=info.created_at, created_by=info.created_by, expires_at=info.expires_at,
                     revoked_at=info.revoked_at, revoked_by=info.revoked_by, active=info.active(datetime.now(UTC)))


def _visible_token(caller: Caller, token_id: uuid.UUID, action: str) -> TokenInfo:
    """The token, once ``caller`` may manage tokens of its tenant (404 for another tenant's, as for none)."""
    info = next((t for t in caller.context.app.access.tokens() if t.token_id == token_id), None)
    missing = f"no token has the id {token_id}"
    if info is None:
        raise NotFound(missing)
    if info.tenant is None:
        caller.authorize(Permission.TOKENS, None, action)
        if caller.principal.tenant is not None:  # a token of every tenant is not one tenant's business
            raise NotFound(missing)
    else:
        caller.authorize_record(Permission.TOKENS, info.tenant, action, missing)
    return info


@router.get("/v1/tokens", response_model=list[TokenView], responses=errors(401, 403, 503), summary="API tokens")
def list_tokens(caller: CallerDep) -> list[TokenView]:
    """Every token, revoked and expired ones included, oldest first (of the caller's tenant only, for
    a principal bound to one)."""
    scope = caller.authorize(Permission.TOKENS, None, "list tokens")
    return [_token(t) for t in caller.context.app.access.tokens() if scope is None or t.tenant == scope]


@router.post("/v1/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated,
             responses=errors(400, 401, 403, 422, 503), summary="Make an API token")
def create_token(body: TokenRequest, caller: CallerDep) -> TokenCreated:
    """The token is in the answer, and nowhere else ever: only the hash of its secret is stored."""
    tenant = caller.authorize(Permission.TOKENS, body.tenant, f"create token {body.name}")
    expires_at = None if body.expires_in_seconds is None else (
        datetime.now(UTC) + timedelta(seconds=body.expires_in_seconds))
    token, info = caller.context.app.access.create_token(name=body.name, roles=body.roles, tenant=tenant,
                                                         expires_at=expires_at, actor=caller.actor)
    return TokenCreated(**_token(info).model_dump(), token=token)


@router.delete("/v1/tokens/{token_id}", response_model=TokenView, responses=errors(401, 403, 404, 409, 422, 503),
               summary="Revoke an API token")
def revoke_token(
    token_id: uuid.UUID,
    caller: CallerDep,
    reason: Annotated[str, Query(min_length=1, max_length=500)] = "revoked by an operator",
) -> TokenView:
    """The token no longer authenticates anyone (in every process within a few seconds). 409 if it
    was revoked already."""
    _visible_token(caller, token_id, f"revoke token {token_id}")
    return _token(caller.context.app.access.revoke(token_id, actor=caller.actor, reason=reason))


def _tenant(info: TenantInfo) -> TenantView:
    return TenantView(name=info.name, created_at=info.created_at, description=info.description,
                      quota=QuotaView.model_validate(info.quota.as_dict()))


@router.get("/v1/tenants", response_model=list[TenantView], responses=errors(401, 403, 503),
            summary="Tenants and their quotas")
def list_tenants(caller: CallerDep) -> list[TenantView]:
    """Every tenant created or given a quota (a tenant nobody created may still be used: it has no quota)."""
    scope = caller.authorize(Permission.TENANTS, None, "list tenants")
    return [_tenant(t) for t in caller.context.app.tenants.list() if scope is None or t.name == scope]


@router.post("/v1/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantView,
             responses=errors(400, 401, 403, 409, 422, 503), summary="Create a tenant")
def create_tenant(body: TenantRequest, caller: CallerDep) -> TenantView:
    """409 if it was created already."""
    caller.authorize(Permission.TENANTS, body.name, f"create tenant {body.name}")
    return _tenant(caller.context.app.tenants.create(body.name, description=body.description, actor=caller.actor))


@router.get("/v1/tenants/{tenant}/quota", response_model=QuotaView, responses=errors(401, 403, 422, 503),
            summary="A tenant's quotas")
def get_quota(tenant: TenantName, caller: CallerDep) -> QuotaView:
    caller.authorize(Permission.TENANTS, tenant, f"read the quotas of tenant {tenant}")
    return QuotaView.model_validate(caller.context.app.tenants.quota(tenant).as_dict())


@router.patch("/v1/tenants/{tenant}/quota", response_model=QuotaView, responses=errors(400, 401, 403, 422, 503),
              summary="Change a tenant's quotas")
def change_quota(tenant: TenantName, body: QuotaChange, caller: CallerDep) -> QuotaView:
    """Change the quotas given (null: no limit); the others stay as they are, unless ``clear``."""
    caller.authorize(Permission.TENANTS, tenant, f"set the quotas of tenant {tenant}")
    changes = {name: getattr(body, name) for name in Quota().as_dict() if name in body.model_fields_set}
    try:
        quota = caller.context.app.tenants.set_quota(tenant, actor=caller.actor, clear=body.clear, **changes)
    except DomainError as e:  # quotas that do not fit together (a burst without a rate): bad input
        raise ValidationError(str(e)) from e
    return QuotaView.model_validate(quota.as_dict())
