"""What every page of the dashboard shares: templates, errors as pages, the signed-in caller, forms.

A page handler is a plain function that calls the HTTP API's own endpoint functions with the
:class:`~broker_q.api.auth.Caller` of the session cookie: the same permission checks, the same
audit of refusals, the same queries. :class:`PageRoute` turns broker_q's errors into pages with
the API's statuses (a refusal is a 403 page; no session, a redirect to the login page).
"""

from __future__ import annotations

import hmac
import json
import logging
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from broker_q.access import Permission
from broker_q.api.auth import Caller, access
from broker_q.api.context import Context
from broker_q.api.errors import status_of
from broker_q.errors import BrokerQError, PermissionDenied, Unauthenticated

__all__ = [
    "COOKIE",
    "PREFIX",
    "FormDep",
    "FormRefused",
    "PageRoute",
    "SignedIn",
    "csrf_token",
    "field",
    "form",
    "page",
    "redirect",
    "same_origin",
    "signed_in",
    "url",
]

log = logging.getLogger(__name__)

COOKIE = "bq_session"
"""The session cookie: the API token itself, HttpOnly, SameSite=Strict, sent to ``/ui`` only."""
PREFIX = "/ui"
_CSRF_CONTEXT = b"broker_q dashboard form"

templates = Environment(loader=PackageLoader("broker_q.dashboard", "templates"),
                        autoescape=select_autoescape(default=True), undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)


class FormRefused(BrokerQError):
    """A form posted without this session's CSRF token, or from another site."""


def csrf_token(token: str) -> str:
    """The token that a session's forms carry: derived from its API token, which scripts of other
    sites cannot read (the cookie is HttpOnly), so they cannot forge it."""
    return hmac.new(token.encode(), _CSRF_CONTEXT, "sha256").hexdigest()


def signed_in(request: Request) -> Caller:
    """The caller of the session cookie; :class:`Unauthenticated` without a valid one."""
    context: Context = request.app.state.context
    token = request.cookies.get(COOKIE)
    if not token:
        raise Unauthenticated("sign in with an API token")
    return Caller(access(context).authenticate(token), context)


SignedIn = Annotated[Caller, Depends(signed_in)]


def same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this server (browsers send ``Origin`` with every POST)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request: those always carry Origin
    return origin == f"{request.url.scheme}://{request.url.netloc}"


async def form(request: Request) -> dict[str, list[str]]:
    """The fields of a posted form, once it is known to come from this session's own page."""
    fields = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    token = request.cookies.get(COOKIE, "")
    sent = (fields.get("csrf") or [""])[0]
    if not (same_origin(request) and token and hmac.compare_digest(sent, csrf_token(token))):
        raise FormRefused("this form was not sent from this dashboard's page (or the session changed): "
                          "open the page again and resend it")
    return fields


FormDep = Annotated[dict[str, list[str]], Depends(form)]


def field(fields: Mapping[str, list[str]], name: str, default: str = "") -> str:
    return (fields.get(name) or [default])[0].strip()


def redirect(url: str) -> RedirectResponse:
    """After a POST: the page that shows its outcome (303, so that a reload does not post again)."""
    return RedirectResponse(url, status_code=303)


# -- rendering ------------------------------------------------------------------------------------


NAV: tuple[tuple[str, str, Permission], ...] = (
    ("Overview", "/ui/", Permission.READ),
    ("Tasks", "/ui/tasks", Permission.READ),
    ("Dead letters", "/ui/dead-letters", Permission.READ),
    ("Workflows", "/ui/workflows", Permission.READ),
    ("Schedules", "/ui/schedules", Permission.READ),
    ("Breakers", "/ui/breakers", Permission.READ),
    ("Audit", "/ui/audit", Permission.AUDIT),
    ("Time travel", "/ui/time-travel", Permission.READ),
)


def page(request: Request, template: str, caller: Caller | None, status: int = 200, **values: Any) -> HTMLResponse:
    """``template`` rendered with ``values``, the navigation the caller may use, and its forms' token."""
    token = request.cookies.get(COOKIE, "")
    principal = None if caller is None else caller.principal
    nav = [] if principal is None else [(label, href) for label, href, permission in NAV
                                        if permission in principal.permissions]

    def can(permission: str, tenant: str | None = None) -> bool:
        """Whether the caller may do this on ``tenant`` (shows a button or not; the action checks again)."""
        return principal is not None and principal.can(Permission(permission), tenant or principal.tenant)

    html = templates.get_template(template).render(
        request=request, principal=principal, nav=nav, path=request.url.path, csrf=csrf_token(token) if token else "",
        can=can, query=dict(request.query_params), **values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _when(value: str | datetime | None) -> str:
    if value is None or value == "":
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def _ago(value: str | datetime | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return f"{_seconds(max(0.0, (datetime.now(UTC) - moment).total_seconds()))} ago"


def _local(value: datetime, zone: str) -> str:
    """``value`` in the IANA zone ``zone`` (a schedule's), as its wall clock reads."""
    try:
        return value.astimezone(ZoneInfo(zone)).strftime(f"%Y-%m-%d %H:%M:%S {zone}")
    except (ZoneInfoNotFoundError, ValueError):
        return ""


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def url(path: str, values: Mapping[str, Any] | None = None, **changes: Any) -> str:
    """``path`` with the query ``values`` updated by ``changes`` (a ``None`` removes a parameter)."""
    merged = {**(values or {}), **changes}
    query = urllib.parse.urlencode({k: v for k, v in merged.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


templates.filters.update(when=_when, seconds=_seconds, ago=_ago, pretty=_pretty, local=_local)
templates.globals.update(url=url, state_label=lambda state: str(state).replace("_", " "))


# -- errors as pages ------------------------------------------------------------------------------


class PageRoute(APIRoute):
    """A route whose errors are pages: no session sends the browser to the login page; a refusal,
    an unknown id, a state that forbids the action or bad input is a page that says so, with the
    status the API answers for it. A request of the page's own live update gets the status alone."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if request.url.query:
                # A filter form sends its empty fields too ("tenant="): they mean "not filtered".
                kept = [(k, v) for k, v in urllib.parse.parse_qsl(request.url.query, keep_blank_values=True) if v]
                request.scope["query_string"] = urllib.parse.urlencode(kept).encode()
                request = Request(request.scope, request.receive)
            try:
                return await handler(request)
            except Unauthenticated:
                if request.headers.get("x-live-update"):
                    return Response(status_code=401)  # the page's script reloads, and lands on the login page
                if request.method != "GET":  # a form posted after the token expired: sign in again
                    return redirect(f"{PREFIX}/login")
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return redirect(url(f"{PREFIX}/login", next=target))
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path"))
                return _error_page(request, 422, f"{where}: {first.get('msg', 'invalid')}")
            except pydantic.ValidationError as e:  # a form's field that an API body refuses
                first = e.errors()[0] if e.errors() else {}
                where = ".".join(str(part) for part in first.get("loc", ()))
                return _error_page(request, 422, f"{where}: {first.get('msg', 'invalid')}")
            except FormRefused as e:
                return _error_page(request, 403, str(e))
            except BrokerQError as e:
                return _error_page(request, status_of(e), str(e), refused=isinstance(e, PermissionDenied))

        return route


_TITLES = {403: "Refused", 404: "Not found", 409: "Not possible now", 410: "Gone", 422: "Invalid input",
           429: "Over quota", 503: "Unavailable"}


def _error_page(request: Request, status: int, message: str, refused: bool = False) -> HTMLResponse:
    try:
        caller: Caller | None = signed_in(request)
    except BrokerQError:
        caller = None
    if status >= 500 and status != 503:
        log.error("%s %s: %s", request.method, request.url.path, message)
        message = "internal error (logged by the server)"
    return page(request, "error.html", caller, status=status, title=_TITLES.get(status, "Error"), message=message,
                refused=refused)
