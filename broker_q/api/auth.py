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
from broker_q.crypto import is_sealed
from broker_q.errors import ConfigurationError, DecryptionError, PermissionDenied, TaskNotFound, Unauthenticated
from broker_q.payloads import Payloads

__all__ = ["PAYLOAD_FIELDS", "SEALED_FIELDS", "Caller", "CallerDep", "access", "authenticated", "bearer"]

PAYLOAD_FIELDS = ("args", "kwargs", "result")
"""The fields of events and views that hold a task's payloads: shown only with ``read_payloads``."""
SEALED_FIELDS = ("sealed_arguments", "sealed_result", "sealed_because")
"""Where those payloads are when sealed (:mod:`broker_q.payloads`): never shown as such; opened into
the payload fields for a caller who may read them."""

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
        (then ``payloads_hidden`` is true). Payloads that are sealed but cannot be opened (the
        tenant's keys were shredded, say) are null, and ``payloads_unreadable`` says why."""
        shown = {k: v for k, v in values.items() if k not in PAYLOAD_FIELDS and k not in SEALED_FIELDS}
        if any(k in values for k in PAYLOAD_FIELDS):
            hidden = not self.sees_payloads(tenant)
            if not hidden:
                shown.update({k: values[k] for k in PAYLOAD_FIELDS if k in values})
                shown.update(_opened(self.context.app.payloads, values, tenant, task_id))
            shown["payloads_hidden"] = hidden
        return shown

    def event_details(self, details: Mapping[str, Any], tenant: str,
                      task_id: uuid.UUID | None) -> tuple[dict[str, Any], bool]:
        """An event's own fields as the caller may see them, and whether payloads were left out."""
        shown = self.payloads(details, tenant, task_id)
        return shown, bool(shown.pop("payloads_hidden", False))


def _opened(payloads: Payloads, values: Mapping[str, Any], tenant: str, task_id: uuid.UUID | None) -> dict[str, Any]:
    """The payload fields of ``values`` whose values are sealed, opened: for a caller allowed to read
    them, the one place of the API where sealed values are opened (:func:`broker_q.payloads.reveal`
    does it for the CLI). A view's row holds a sealed result as its sealed text in ``result``."""
    opened: dict[str, Any] = {}
    if task_id is None:
        return opened
    try:
        if values.get("sealed_arguments") is not None:
            args, kwargs = payloads.open_arguments(tenant, task_id, values["sealed_arguments"])
            opened.update(args=args, kwargs=kwargs)
        if values.get("sealed_result") is not None:
            opened["result"] = payloads.open_result(tenant, task_id, values["sealed_result"])
        elif is_sealed(values.get("result")):
            opened["result"] = payloads.open_result(tenant, task_id, values["result"])
    except (DecryptionError, ConfigurationError) as e:
        opened = {name: None for name in PAYLOAD_FIELDS if name in values or name in opened}
        opened["payloads_unreadable"] = str(e)
    return opened


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
