"""Who calls, and what they may see: bearer tokens, permission checks, tenants, payloads.

Every endpoint but ``/healthz`` and ``/readyz`` (and ``/metrics`` when it is made public) takes a
:class:`Caller`: the principal of the ``Authorization: Bearer`` token. Each endpoint then asks
:meth:`Caller.authorize` for the one permission its action needs, on the tenant the action touches.
For one task (or workflow), that is the record's own tenant, read first; a principal of another
tenant is answered 404 exactly as for an id that does not exist, so that ids of other tenants
cannot be probed (the refusal is still recorded by ``authorize``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker_q.access import Access, Permission, Principal
from broker_q.api.context import Context
from broker_q.errors import PermissionDenied, TaskNotFound, Unauthenticated

__all__ = ["PAYLOAD_FIELDS", "Caller", "CallerDep", "access", "authenticated", "bearer"]

PAYLOAD_FIELDS = ("args", "kwargs", "result")
"""The fields of events and views that hold a task's payloads: shown only with ``read_payloads``."""

bearer = HTTPBearer(auto_error=False, description="An API token: `broker-q tokens create ...` prints one.")


def access(context: Context) -> Access:
    """The access checks of the API's App."""
    return context.app.access


@dataclass(frozen=True)
class Caller:
    """The principal behind a request, and the checks made on its behalf."""

    principal: Principal
    context: Context

    @property
    def actor(self) -> str:
        """Who is recorded as having done what this caller asks."""
        return self.principal.name

    def authorize(self, permission: Permission, tenant: str | None, action: str) -> str | None:
        """The tenant the action applies to (``None``: every tenant, for a principal bound to none);
        :class:`PermissionDenied` (recorded in the audit log) if the principal may not."""
        return access(self.context).authorize(self.principal, permission, tenant, action=action)

    def tenant_for(self, permission: Permission, tenant: str | None, action: str) -> str:
        """:meth:`authorize` for an action on one tenant: the App's default tenant when none is implied."""
        return self.authorize(permission, tenant, action) or self.context.app.settings.tenant

    def authorize_record(self, permission: Permission, tenant: str, action: str, missing: str) -> None:
        """:meth:`authorize` on a record of ``tenant`` whose existence a principal bound to another
        tenant must not learn: it gets :class:`TaskNotFound` with the message ``missing``, the very
        answer for an id that does not exist."""
        try:
            self.authorize(permission, tenant, action)
        except PermissionDenied:
            if self.principal.tenant is not None and self.principal.tenant != tenant:
                raise TaskNotFound(missing) from None
            raise

    def sees_payloads(self, tenant: str) -> bool:
        return self.principal.can(Permission.READ_PAYLOADS, tenant)

    def payloads(self, values: Mapping[str, Any], tenant: str, task_id: uuid.UUID | None) -> dict[str, Any]:
        """``values`` with its payload fields opened, or removed if the caller may not see them
        (then ``payloads_hidden`` is true)."""
        shown = {k: v for k, v in values.items() if k not in PAYLOAD_FIELDS}
        if any(k in values for k in PAYLOAD_FIELDS):
            hidden = not self.sees_payloads(tenant)
            if not hidden:
                shown.update({k: _payload(values[k], tenant, task_id) for k in PAYLOAD_FIELDS if k in values})
            shown["payloads_hidden"] = hidden
        return shown

    def event_details(self, details: Mapping[str, Any], tenant: str,
                      task_id: uuid.UUID | None) -> tuple[dict[str, Any], bool]:
        """An event's own fields as the caller may see them, and whether payloads were left out."""
        shown = self.payloads(details, tenant, task_id)
        return shown, bool(shown.pop("payloads_hidden", False))


def _payload(value: Any, tenant: str, task_id: uuid.UUID | None) -> Any:
    """A payload as shown to a caller allowed to read it. The one place where sealed values
    (``bq1:...``, :mod:`broker_q.crypto`) are to be opened, once the keyring opens them on demand."""
    return value


def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller of a request; :class:`Unauthenticated` without a valid bearer token."""
    context: Context = request.app.state.context
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthenticated("this endpoint needs an API token: send 'Authorization: Bearer <token>'")
    return Caller(access(context).authenticate(credentials.credentials), context)


CallerDep = Annotated[Caller, Depends(authenticated)]
