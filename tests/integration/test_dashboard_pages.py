"""The dashboard's pages in process (httpx over ASGI, an SQLite store, no worker): the session
cookie, forms that only this dashboard's pages can post, the same refusals as the API (and their
audit), what a tenant's token sees, and every page rendering for an admin."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from broker_q import App
from broker_q.access import Role
from broker_q.canvas import chain
from broker_q.dashboard.web import COOKIE, csrf_token
from tests.integration.api_support import Api, api_for, catch_up

ORIGIN = "http://api"


@pytest.fixture
async def api(sqlite_url: str) -> AsyncIterator[Api]:
    app = App(store=sqlite_url)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        async with api_for(app) as client:
            yield client
    finally:
        app.close()


def signed_in(api: Api, role: Role | str, tenant: str | None = None) -> httpx.AsyncClient:
    """A client of the same API whose cookie holds a token of ``role``."""
    token = api.token(role, tenant)
    return httpx.AsyncClient(transport=api.client._transport, base_url=ORIGIN, cookies={COOKIE: token})


async def test_without_a_session_pages_lead_to_the_login_page(api: Api) -> None:
    response = await api.client.get("/ui/tasks?queue=default")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%3Fqueue%3Ddefault"
    live = await api.client.get("/ui/", headers={"X-Live-Update": "1"})
    assert live.status_code == 401, "a page's own update is told, not redirected"
    posted = await api.client.post("/ui/logout", data={})
    assert posted.status_code == 403, "a form without the session's token is refused before anything"
    expired = await api.client.post("/ui/tasks/00000000-0000-0000-0000-000000000000/cancel", data={"csrf": "x"},
                                    headers={"Cookie": f"{COOKIE}=bq_nope"})
    assert (expired.status_code, expired.headers["location"]) == (303, "/ui/login")
    assert (await api.client.get("/ui/login")).status_code == 200
    assert (await api.client.get("/ui")).headers["location"] == "/ui/"


async def test_signing_in_sets_a_cookie_scripts_cannot_read_and_other_sites_cannot_send(api: Api) -> None:
    token = api.token("viewer")
    response = await api.client.post("/ui/login", data={"token": token, "next": "/ui/dead-letters"})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/dead-letters"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={token};")
    assert {"HttpOnly", "Path=/ui", "SameSite=strict"} <= {part.strip() for part in cookie.split(";")}

    elsewhere = await api.client.post("/ui/login", data={"token": token, "next": "https://evil.example/"})
    assert elsewhere.headers["location"] == "/ui/", "never sent to another site after signing in"
    bad = await api.client.post("/ui/login", data={"token": "bq_nope"})
    assert bad.status_code == 401
    assert "set-cookie" not in bad.headers
    forged = await api.client.post("/ui/login", data={"token": token}, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 401
    assert "set-cookie" not in forged.headers


async def test_a_form_needs_the_session_s_token_and_this_origin(api: Api) -> None:
    task = await api.app.submit_async("add", [1, 2], countdown=3600)
    async with signed_in(api, "operator") as client:
        page = (await client.get(f"/ui/tasks/{task.id}")).text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf is not None
        assert csrf.group(1) == csrf_token(api.token("operator"))
        url = f"/ui/tasks/{task.id}/cancel"
        assert (await client.post(url, data={"reason": "r"})).status_code == 403
        assert (await client.post(url, data={"reason": "r", "csrf": "0" * 64})).status_code == 403
        other_site = await client.post(url, data={"reason": "r", "csrf": csrf.group(1)},
                                       headers={"Origin": "https://evil.example"})
        assert other_site.status_code == 403
        assert api.app.get_task(task.id).status == "blocked"

        done = await client.post(url, data={"reason": "not needed", "csrf": csrf.group(1)}, headers={"Origin": ORIGIN})
        assert done.status_code == 303
        assert done.headers["location"] == f"/ui/tasks/{task.id}?done=cancelled"
        assert api.app.get_task(task.id).cancel_reason == "not needed"
        again = await client.post(url, data={"reason": "twice", "csrf": csrf.group(1)})
        assert again.status_code == 409, "the API's answer for a final task, as a page"

        out = await client.post("/ui/logout", data={"csrf": csrf.group(1)})
        assert out.status_code == 303
        assert f'{COOKIE}=""' in out.headers["set-cookie"]


async def test_a_viewer_gets_no_button_and_a_forced_action_is_refused_and_audited(api: Api) -> None:
    task = await api.app.submit_async("add", [40, 2], countdown=3600)
    async with signed_in(api, "viewer") as client:
        page = (await client.get(f"/ui/tasks/{task.id}")).text
        assert "Cancel task" not in page
        assert "read_payloads" in page, "arguments are hidden, and the page says why"
        assert "40" not in re.sub(r"<[^>]*>", "", page.split("Arguments and outcome")[1].split("Actions")[0])
        assert 'href="/ui/audit"' not in page
        forced = await client.post(f"/ui/tasks/{task.id}/cancel",
                                   data={"reason": "r", "csrf": csrf_token(api.token("viewer"))})
        assert forced.status_code == 403
        assert "recorded in the audit log" in forced.text
        assert (await client.get("/ui/audit")).status_code == 403
    assert api.app.get_task(task.id).status == "blocked"
    await asyncio.to_thread(catch_up, api.app)
    denials = (await api.ok("GET", "/v1/audit", params={"type": "access_denied"}))["items"]
    assert [d["actor"] for d in denials] == ["token:viewer-all", "token:viewer-all"]
    assert f"cancel task {task.id}" in denials[0]["summary"]


async def test_a_tenant_s_token_sees_its_own_tenant_only(api: Api) -> None:
    theirs = await api.app.submit_async("add", [1, 2], tenant="globex")
    ours = await api.app.submit_async("add", [3, 4], tenant="acme")
    await asyncio.to_thread(catch_up, api.app)
    async with signed_in(api, "operator", "acme") as client:
        assert (await client.get(f"/ui/tasks/{theirs.id}")).status_code == 404
        assert (await client.get(f"/ui/tasks/{ours.id}")).status_code == 200
        listing = (await client.get("/ui/tasks")).text
        assert str(ours.id) in listing
        assert str(theirs.id) not in listing
        assert (await client.get("/ui/?tenant=globex")).status_code == 403


async def test_every_page_renders_for_an_admin(api: Api) -> None:
    app = api.app
    task = await app.submit_async("add", [1, 2], countdown=3600)
    workflow = await app.submit_workflow_async(chain(app.signature("add", [1, 2]), app.signature("add", [3])))
    await api.ok("POST", "/v1/schedules", json={"name": "nightly", "cron": "0 2 * * *", "task": "add",
                                                "args": [1, 2], "timezone": "Europe/Paris"})
    await api.ok("POST", "/v1/breakers/payments/open", json={"reason": "outage"})
    await asyncio.to_thread(catch_up, app)
    pages = ["/ui/", "/ui/?tenant=default", "/ui/tasks", "/ui/tasks?queue=default&state=blocked&tenant=",
             f"/ui/tasks/{task.id}", "/ui/dead-letters", "/ui/dead-letters/replays?replayed=2&refused=1",
             "/ui/workflows", f"/ui/workflows/{workflow.id}", "/ui/schedules", "/ui/breakers",
             "/ui/audit?type=submitted&since=2020-01-01T00:00", "/ui/time-travel",
             f"/ui/time-travel?at=2030-01-01T00:00:00&position=&task={task.id}", "/ui/time-travel?position=3"]
    async with signed_in(api, "admin") as client:
        for path in pages:
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text[:500])
            assert response.headers["cache-control"] == "no-store"
        exported = await client.get("/ui/audit/export?type=submitted")
        assert exported.headers["content-disposition"] == 'attachment; filename="broker_q-audit.jsonl"'
        assert len(exported.text.splitlines()) == 3  # the task and the workflow's two steps
        for path, status in (("/ui/tasks/not-an-id", 422), (f"/ui/workflows/{task.id}", 404),
                             ("/ui/time-travel?at=yesterday", 422), ("/ui/workflows?id=nope", 422),
                             ("/ui/static/dashboard.js", 200)):
            assert (await client.get(path)).status_code == status, path
