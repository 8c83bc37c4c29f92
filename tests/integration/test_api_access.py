"""Access to the HTTP API: who is let in (401), what each role may do (403, every endpoint), what a
principal bound to a tenant sees of the others (nothing: 404 and filtered lists), and payloads.

No worker runs here: every state the tests need is reached by appends (submit, cancel, a countdown).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker_q import App
from broker_q.access import ROLE_PERMISSIONS, Permission, Role
from broker_q.canvas import chain
from broker_q.domain.schedule import schedule_id
from tests.helpers import wait_for
from tests.integration.api_support import Api, api_for, catch_up


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


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    permission: Permission
    body: dict[str, Any] | None = None
    params: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("POST", "/v1/tasks", Permission.SUBMIT, {"task": "add", "args": [1, 1], "tenant": "acme"}),
    Endpoint("GET", "/v1/tasks/{task}", Permission.READ),
    Endpoint("GET", "/v1/tasks/{task}/history", Permission.READ),
    Endpoint("POST", "/v1/tasks/{task}/cancel", Permission.CANCEL, {"reason": "r"}),
    Endpoint("GET", "/v1/queues", Permission.READ),
    Endpoint("GET", "/v1/queues/default/tasks", Permission.READ, params={"state": "blocked"}),
    Endpoint("GET", "/v1/dead-letters", Permission.READ),
    Endpoint("POST", "/v1/dead-letters/{task}/replay", Permission.REPLAY, {"reason": "r"}),
    Endpoint("GET", "/v1/schedules", Permission.READ),
    Endpoint("POST", "/v1/schedules", Permission.SCHEDULES, {"name": "s2", "cron": "* * * * *", "task": "add",
                                                             "args": [1, 2]}),
    Endpoint("GET", "/v1/schedules/s1", Permission.READ),
    Endpoint("GET", "/v1/schedules/s1/next", Permission.READ),
    Endpoint("POST", "/v1/schedules/s1/pause", Permission.SCHEDULES, {}),
    Endpoint("POST", "/v1/schedules/s1/resume", Permission.SCHEDULES, {}),
    Endpoint("DELETE", "/v1/schedules/s1", Permission.SCHEDULES),
    Endpoint("GET", "/v1/workflows/{workflow}", Permission.READ),
    Endpoint("POST", "/v1/workflows/{workflow}/cancel", Permission.CANCEL, {"reason": "r"}),
    Endpoint("GET", "/v1/audit", Permission.AUDIT),
    Endpoint("GET", "/v1/audit", Permission.AUDIT, params={"format": "jsonl"}),
    Endpoint("GET", "/v1/events", Permission.READ),
    Endpoint("GET", "/v1/state", Permission.READ, params={"position": 1}),
    Endpoint("GET", "/metrics", Permission.READ),
    Endpoint("GET", "/v1/views", Permission.READ),
    Endpoint("GET", "/v1/activity", Permission.READ),
    Endpoint("GET", "/v1/activity/tasks", Permission.READ),
    Endpoint("GET", "/v1/activity/workflows", Permission.READ),
    Endpoint("GET", "/v1/breakers", Permission.READ),
    Endpoint("GET", "/v1/breakers/payments/timeline", Permission.READ),
    Endpoint("POST", "/v1/breakers/payments/open", Permission.SCHEDULES, {"reason": "r"}),
    Endpoint("POST", "/v1/breakers/payments/close", Permission.SCHEDULES, {"reason": "r"}),
    Endpoint("GET", "/v1/tokens", Permission.TOKENS),
    Endpoint("POST", "/v1/tokens", Permission.TOKENS, {"name": "t", "roles": ["viewer"]}),
    Endpoint("DELETE", "/v1/tokens/{token}", Permission.TOKENS),
    Endpoint("GET", "/v1/tenants", Permission.TENANTS),
    Endpoint("POST", "/v1/tenants", Permission.TENANTS, {"name": "acme"}),
    Endpoint("GET", "/v1/tenants/acme/quota", Permission.TENANTS),
    Endpoint("PATCH", "/v1/tenants/acme/quota", Permission.TENANTS, {"max_waiting": 1000}),
]


async def records_of(api: Api, tenant: str) -> dict[str, str]:
    """A task (not final), a workflow and a schedule of ``tenant``, made by an admin."""
    task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 2], "tenant": tenant,
                                                               "countdown": 3600})
    app = api.app
    workflow = await app.submit_workflow_async(chain(app.signature("add", [1, 2]), app.signature("add", [3])),
                                               tenant=tenant)
    await api.ok("POST", "/v1/schedules", json={"name": "s1", "cron": "0 * * * *", "task": "add", "args": [1, 2],
                                                "tenant": tenant})
    _, token = app.access.create_token(name="a-token", roles=["viewer"], tenant=tenant, actor="test")
    return {"task": task["id"], "workflow": str(workflow.id), "token": str(token.token_id)}


@pytest.mark.parametrize("role", list(Role))
async def test_each_role_may_call_exactly_the_endpoints_its_permissions_allow(api: Api, role: Role) -> None:
    ids = await records_of(api, "acme")
    for endpoint in ENDPOINTS:
        response = await api.call(endpoint.method, endpoint.path.format(**ids), role=role, tenant="acme",
                                  json=endpoint.body, params=endpoint.params)
        if endpoint.permission in ROLE_PERMISSIONS[role]:
            assert response.status_code not in (401, 403), (str(endpoint), role, response.text)
            assert response.status_code < 500, (str(endpoint), role, response.text)
        else:
            assert response.status_code == 403, (str(endpoint), role, response.text)
            error = response.json()["error"]
            assert error["type"] == "permission_denied", (str(endpoint), role)
            assert error["message"]


async def test_a_refusal_is_recorded_in_the_audit_log(api: Api) -> None:
    ids = await records_of(api, "acme")
    refused = await api.call("POST", f"/v1/tasks/{ids['task']}/cancel", role="viewer", tenant="acme", json={})
    assert refused.status_code == 403
    await asyncio.to_thread(catch_up, api.app)
    denials = (await api.ok("GET", "/v1/audit", params={"type": "access_denied"}))["items"]
    assert [(d["tenant"], d["actor"]) for d in denials] == [("acme", "token:viewer-acme")]
    assert "cancel" in denials[0]["summary"]


async def test_events_of_tokens_never_show_the_secret_hash(api: Api) -> None:
    api.token("viewer", "acme")
    issued = (await api.ok("GET", "/v1/events", params={"type": "token_issued"}))["items"]
    assert issued
    assert all("secret_sha256" not in event["details"] and event["details"]["name"] for event in issued)


async def test_only_a_valid_token_is_let_in(api: Api) -> None:
    access = api.app.access
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer not-a-token"},
                    {"Authorization": f"Bearer bq_{uuid.uuid4().hex}_{'A' * 43}"}):
        response = await api.call("GET", "/v1/queues", role=None, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["type"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    token, info = access.create_token(name="soon-gone", roles=[Role.VIEWER], tenant=None, actor="test")
    assert (await api.call("GET", "/v1/queues", token=token)).status_code == 200
    access.revoke(info.token_id, actor="test")
    assert (await api.call("GET", "/v1/queues", token=token)).status_code == 401

    brief, _ = access.create_token(name="brief", roles=[Role.VIEWER], tenant=None, actor="test",
                                   expires_at=datetime.now(UTC) + timedelta(seconds=1))
    assert (await api.call("GET", "/v1/queues", token=brief)).status_code == 200

    async def expired() -> bool:
        return (await api.call("GET", "/v1/queues", token=brief)).status_code == 401

    await wait_for(expired, timeout=10, interval=0.1, what="the token to expire")


async def test_health_and_the_schema_need_no_token(api: Api) -> None:
    for path in ("/healthz", "/openapi.json"):
        assert (await api.call("GET", path, role=None)).status_code == 200, path


async def test_a_principal_of_one_tenant_sees_nothing_of_another(api: Api) -> None:
    acme = await records_of(api, "acme")
    globex = await records_of(api, "globex")
    await asyncio.to_thread(catch_up, api.app)

    # Another tenant's task, workflow or past state is answered exactly like one that does not exist.
    unknown = str(uuid.uuid4())
    for template, role in (("/v1/tasks/{}", "viewer"), ("/v1/tasks/{}/history", "viewer"),
                           ("/v1/workflows/{}", "viewer")):
        theirs = await api.call("GET", template.format(globex["task" if "tasks" in template else "workflow"]),
                                role=role, tenant="acme")
        missing = await api.call("GET", template.format(unknown), role=role, tenant="acme")
        assert theirs.status_code == missing.status_code == 404, template
        assert theirs.json()["error"]["type"] == missing.json()["error"]["type"]
        assert theirs.json()["error"]["message"].replace(globex["task"], "ID").replace(globex["workflow"], "ID") == \
            missing.json()["error"]["message"].replace(unknown, "ID")
    # Ids derived from names can be computed for another tenant: what they name is not told either.
    for probe in (f"/v1/tasks/{schedule_id('globex', 's1')}", f"/v1/tasks/{globex['workflow']}/history",
                  f"/v1/workflows/{globex['task']}", f"/v1/workflows/{acme['task']}"):
        response = await api.call("GET", probe, role="viewer", tenant="acme")
        assert response.status_code == 404, probe
        assert "record" not in response.json()["error"]["message"], probe
    for method, path, body in (("POST", f"/v1/tasks/{globex['task']}/cancel", {}),
                               ("POST", f"/v1/dead-letters/{globex['task']}/replay", {"reason": "r"}),
                               ("POST", f"/v1/workflows/{globex['workflow']}/cancel", {})):
        response = await api.call(method, path, role="operator", tenant="acme", json=body)
        assert response.status_code == 404, path
    past = await api.call("GET", "/v1/state", role="viewer", tenant="acme",
                          params={"task": globex["task"], "position": 1})
    assert past.status_code == 404

    # Lists hold the principal's own tenant only, and naming another tenant is refused.
    queues = await api.ok("GET", "/v1/queues", role="viewer", tenant="acme")
    assert {q["tenant"] for q in queues} == {"acme"}
    events = (await api.ok("GET", "/v1/events", role="viewer", tenant="acme"))["items"]
    assert events
    assert {e["tenant"] for e in events} == {"acme"}
    assert (await api.ok("GET", "/v1/events", role="viewer", tenant="acme",
                         params={"task": globex["task"]}))["items"] == []
    counts = (await api.ok("GET", "/v1/state", role="viewer", tenant="acme", params={"position": 10_000}))["queues"]
    assert {row["tenant"] for row in counts} == {"acme"}
    audit = (await api.ok("GET", "/v1/audit", role="auditor", tenant="acme"))["items"]
    assert audit
    assert {r["tenant"] for r in audit} == {"acme"}
    schedules = await api.ok("GET", "/v1/schedules", role="viewer", tenant="acme")
    assert [(s["name"], s["tenant"]) for s in schedules] == [("s1", "acme")]
    blocked = (await api.ok("GET", "/v1/queues/default/tasks", role="viewer", tenant="acme",
                            params={"state": "blocked"}))["items"]
    assert acme["task"] in {t["id"] for t in blocked}
    assert {t["tenant"] for t in blocked} == {"acme"}
    for path, params, role in (("/v1/queues", {"tenant": "globex"}, "viewer"),
                               ("/v1/events", {"tenant": "globex"}, "viewer"),
                               ("/v1/schedules", {"tenant": "globex"}, "viewer"),
                               ("/v1/dead-letters", {"tenant": "globex"}, "viewer"),
                               ("/v1/audit", {"tenant": "globex"}, "auditor")):
        response = await api.call("GET", path, role=role, tenant="acme", params=params)
        assert response.status_code == 403, path
    # Naming another tenant's task as a parent is answered as naming no task.
    for parent in (globex["task"], unknown):
        waiting = await api.call("POST", "/v1/tasks", role="producer", tenant="acme",
                                 json={"task": "add", "args": [1, 1], "depends_on": [parent]})
        assert waiting.status_code == 422
        assert waiting.json()["error"]["message"] == f"depends_on: no task with id {parent} in tenant acme"
    submit = await api.call("POST", "/v1/tasks", role="producer", tenant="acme",
                            json={"task": "add", "args": [1, 1], "tenant": "globex"})
    assert submit.status_code == 403
    # A principal bound to a tenant submits to it when the body names none.
    own = await api.call("POST", "/v1/tasks", role="producer", tenant="acme", json={"task": "add", "args": [1, 1]})
    assert own.status_code == 201
    assert (await api.ok("GET", f"/v1/tasks/{own.json()['id']}"))["tenant"] == "acme"


async def test_payloads_need_the_read_payloads_permission(api: Api) -> None:
    task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [20, 22], "tenant": "acme"})
    await asyncio.to_thread(catch_up, api.app)

    viewer = await api.ok("GET", f"/v1/tasks/{task['id']}", role="viewer", tenant="acme")
    assert (viewer["args"], viewer["kwargs"], viewer["payloads_hidden"]) == (None, None, True)
    operator = await api.ok("GET", f"/v1/tasks/{task['id']}", role="operator", tenant="acme")
    assert (operator["args"], operator["payloads_hidden"]) == ([20, 22], False)

    history = await api.ok("GET", f"/v1/tasks/{task['id']}/history", role="viewer", tenant="acme")
    assert history["payloads_hidden"] is True
    assert "args" not in history["events"][0]["details"]
    assert "args" not in history["state"] or history["state"]["args"] is None
    events = (await api.ok("GET", "/v1/events", role="viewer", tenant="acme", params={"task": task["id"]}))["items"]
    assert "args" not in events[0]["details"]
    assert events[0]["payloads_hidden"] is True
    shown = (await api.ok("GET", "/v1/events", role="operator", tenant="acme", params={"task": task["id"]}))["items"]
    assert shown[0]["details"]["args"] == [20, 22]
    rows = (await api.ok("GET", "/v1/queues/default/tasks", role="viewer", tenant="acme"))["items"]
    assert rows[0]["payloads_hidden"] is True

    await api.ok("POST", "/v1/schedules", json={"name": "s", "cron": "0 * * * *", "task": "add", "args": [5, 6],
                                                "tenant": "acme"})
    schedule = await api.ok("GET", "/v1/schedules/s", role="viewer", tenant="acme")
    assert (schedule["args"], schedule["payloads_hidden"]) == (None, True)


async def test_sealed_payloads_are_opened_for_read_payloads_only_and_never_shown_sealed(api: Api) -> None:
    task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [20, 22], "tenant": "acme"})
    stored = await asyncio.to_thread(api.app.get_task, task["id"])
    assert (stored.args, stored.sealed_arguments is not None) == ([], True)  # sealed in the store
    for role in ("viewer", "operator"):
        shown = await api.ok("GET", f"/v1/tasks/{task['id']}", role=role, tenant="acme")
        events = (await api.ok("GET", "/v1/events", role=role, tenant="acme", params={"task": task["id"]}))["items"]
        for values in (shown, events[0]["details"]):
            assert not {"sealed_arguments", "sealed_result", "sealed_because"} & set(values)
    await asyncio.to_thread(api.app.store.keys.shred, "acme")
    unreadable = await api.ok("GET", f"/v1/tasks/{task['id']}", role="operator", tenant="acme")
    assert (unreadable["args"], unreadable["payloads_hidden"]) == (None, False)
    assert "shredded" in unreadable["payloads_unreadable"]
