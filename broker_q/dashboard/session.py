"""Signing in and out: the API token is kept in an HttpOnly, SameSite=Strict cookie for ``/ui``.

The cookie holds the token itself, checked at every request like a bearer token: a revoked or
expired token ends the session within seconds, and nothing of the session lives in the server.
"""

from __future__ import annotations

import urllib.parse

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from broker_q.api.auth import access
from broker_q.api.context import Context
from broker_q.dashboard.web import COOKIE, PREFIX, FormDep, PageRoute, page, redirect, same_origin
from broker_q.errors import Unauthenticated

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, route_class=PageRoute, include_in_schema=False)

SESSION_SECONDS = 12 * 3600
"""How long the browser keeps the cookie (the token's own expiry and revocation apply as well)."""


def _next(target: str | None) -> str:
    """Where to go after signing in: a page of the dashboard only (never another site)."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//"):
        return target
    return f"{PREFIX}/"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    return page(request, "login.html", None, next=_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    fields = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (fields.get("token") or [""])[0].strip()
    target = _next((fields.get("next") or [""])[0])
    context: Context = request.app.state.context
    error = None
    if not same_origin(request):
        error = "sign in from this dashboard's own page"
    else:
        try:
            access(context).authenticate(token)
        except Unauthenticated as e:
            error = str(e)
    if error is not None:
        return page(request, "login.html", None, status=401, next=target, error=error)
    response = redirect(target)
    response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, path=PREFIX, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(_: FormDep) -> Response:
    """Forget the token (even one revoked since: the form's token proves the page was ours)."""
    response = redirect(f"{PREFIX}/login")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response
