"""The HTTP API end to end: tasks submitted over HTTP run on a real worker (RabbitMQ, an SQLite
store), and every endpoint answers what the store and the views hold.

The API is called in process (httpx over ASGI); the worker and the relay run in the same event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker_q import App
from broker_q.canvas import chain
from tests.helpers import running, wait_for
from tests.integration.api_support import Api, api_for, catch_up


class Gate:
    """Holds the ``hold`` task's attempts until the test opens it."""

    def __init__(self) -> None:
        self.opened = threading.Event()


def make_app(url: str, amqp_url: str, namespace: str, gate: Gate) -> App:
    app = App(store=url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="divide")
    def divide(x: int, y: int) -> float:
        return x / y

    @app.task(name="hold")
    def hold() -> str:
        gate.opened.wait(30)
        return "released"

    return app


@pytest.fixture
async def api(sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]) -> AsyncIterator[Api]:
    gate = Gate()
    app = make_app(sqlite_url, amqp_url, namespace, gate)
    try:
        async with api_for(app) as client:
            yield client
    finally:
        gate.opened.set()
        app.close()


async def state_of(api: Api, task_id: str) -> str:
    return str((await api.ok("GET", f"/v1/tasks/{task_id}"))["state"])


async def until_state(api: Api, task_id: str, state: str) -> None:
    async def reached() -> bool:
        return await state_of(api, task_id) == state

    await wait_for(reached, timeout=20, what=f"task {task_id} to be {state}")


async def test_a_task_submitted_over_http_runs_and_its_state_and_history_show_it(api: Api) -> None:
    async with running(api.app):
        submitted = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [2, 3]})
        assert submitted["state"] == "ready"
        assert submitted["args"] == [2, 3]
        await until_state(api, submitted["id"], "succeeded")

    task = await api.ok("GET", f"/v1/tasks/{submitted['id']}")
    assert (task["result"], task["attempts"], task["tenant"], task["queue"]) == (5, 1, "default", "default")
    history = await api.ok("GET", f"/v1/tasks/{submitted['id']}/history")
    assert [e["type"] for e in history["events"]] == ["submitted", "started", "succeeded"]
    assert history["events"][0]["details"]["args"] == [2, 3]
    assert history["totals"]["attempts"][0]["outcome"] == "succeeded"
    assert history["totals"]["total_seconds"] >= history["totals"]["attempts"][0]["run_seconds"] >= 0
    # Recorded as the principal's doing, not the API process's.
    assert history["events"][0]["actor"] == "token:admin-all"


async def test_submit_takes_the_envelope_and_refuses_bad_input_clearly(api: Api) -> None:
    body = {"task": "add", "args": [1, 1], "queue": "q1", "priority": 9, "idempotency_key": "k-1", "tenant": "acme",
            "countdown": 3600, "retry": {"max_attempts": 3}, "time_limit": 5}
    first = await api.ok("POST", "/v1/tasks", status=201, json=body)
    again = await api.ok("POST", "/v1/tasks", status=201, json=body)
    assert first["id"] == again["id"], "an idempotency key names one task"
    assert (first["state"], first["queue"], first["priority"], first["tenant"]) == ("blocked", "q1", 9, "acme")

    for bad, status, kind in (
        ({"task": "add", "args": ["x", 1]}, 422, "validation_error"),  # the handler's signature
        ({"task": "add", "args": [1, 1], "bogus": 1}, 422, "validation_error"),
        ({"task": "add", "eta": "2030-01-01T00:00:00+00:00", "countdown": 5}, 422, "validation_error"),
        ({"task": "add", "args": [1, 1], "depends_on": [str(uuid.uuid4())]}, 422, "validation_error"),
        ({"task": "add", "args": [1, 1], "idempotency_key": "schedule:x"}, 422, "validation_error"),
        ({"task": "no such name!"}, 422, "validation_error"),
    ):
        response = await api.call("POST", "/v1/tasks", json=bad)
        assert response.status_code == status, (bad, response.text)
        error = response.json()["error"]
        assert (error["type"], bool(error["message"])) == (kind, True), bad
    response = await api.call("POST", "/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


async def test_cancel_stops_a_task_and_a_final_task_cannot_be_cancelled(api: Api) -> None:
    later = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 2], "countdown": 3600})
    cancelled = await api.ok("POST", f"/v1/tasks/{later['id']}/cancel", json={"reason": "not needed"})
    assert cancelled["state"] == "cancelled"
    again = await api.call("POST", f"/v1/tasks/{later['id']}/cancel", json={"reason": "twice"})
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "domain_error"
    missing = await api.call("POST", f"/v1/tasks/{uuid.uuid4()}/cancel", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "task_not_found"
    assert (await api.call("GET", "/v1/tasks/not-a-uuid")).status_code == 422


async def test_a_dead_letter_is_listed_and_replayed_with_new_arguments(api: Api) -> None:
    async with running(api.app):
        failing = await api.ok("POST", "/v1/tasks", status=201, json={"task": "divide", "args": [1, 0]})
        await until_state(api, failing["id"], "dead_lettered")
        await asyncio.to_thread(catch_up, api.app)
        page = await api.ok("GET", "/v1/dead-letters")
        assert [item["id"] for item in page["items"]] == [failing["id"]]
        assert page["items"][0]["error_type"] == "ZeroDivisionError"

        replay = {"reason": "fixed the divisor", "args": [1, 4], "version": page["items"][0]["version"]}
        replayed = await api.ok("POST", f"/v1/dead-letters/{failing['id']}/replay", json=replay)
        assert replayed["state"] == "ready"
        await until_state(api, failing["id"], "succeeded")
    assert (await api.ok("GET", f"/v1/tasks/{failing['id']}"))["result"] == 0.25
    stale = await api.call("POST", f"/v1/dead-letters/{failing['id']}/replay", json={"reason": "again"})
    assert stale.status_code == 409, "only a dead letter can be replayed"


async def test_queue_views_list_tasks_by_state_a_page_at_a_time(api: Api) -> None:
    ids = [(await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [i, i], "queue": "pages"}))[
        "id"] for i in range(5)]
    await asyncio.to_thread(catch_up, api.app)
    summaries = await api.ok("GET", "/v1/queues")
    assert {"tenant": "default", "queue": "pages", "counts": {"ready": 5}} | {
        "oldest_waiting_seconds": summaries[0]["oldest_waiting_seconds"]} in summaries
    seen: list[str] = []
    after: str | None = None
    while True:
        page = await api.ok("GET", "/v1/queues/pages/tasks",
                            params={"state": "ready", "limit": 2, **({"after": after} if after else {})})
        seen += [item["id"] for item in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ids
    assert (await api.ok("GET", "/v1/queues/pages/tasks", params={"state": "succeeded"}))["items"] == []
    bad = await api.call("GET", "/v1/queues/pages/tasks", params={"state": "sleeping"})
    assert bad.status_code == 422


async def test_schedules_are_defined_paused_resumed_and_removed(api: Api) -> None:
    body = {"name": "nightly", "cron": "0 3 * * *", "task": "add", "args": [1, 2], "tenant": "acme"}
    made = await api.ok("POST", "/v1/schedules", json=body)
    assert (made["status"], made["tenant"], made["next_fire"] is not None) == ("active", "acme", True)
    assert [s["name"] for s in await api.ok("GET", "/v1/schedules", params={"tenant": "acme"})] == ["nightly"]
    assert await api.ok("GET", "/v1/schedules") == [], "another tenant's schedules are not the default tenant's"
    fires = await api.ok("GET", "/v1/schedules/nightly/next", params={"tenant": "acme", "count": 3})
    assert len(fires["next"]) == 3
    assert all(t.endswith("03:00:00Z") or "T03:00:00" in t for t in fires["next"])

    paused = await api.ok("POST", "/v1/schedules/nightly/pause", params={"tenant": "acme"}, json={"reason": "freeze"})
    assert paused["status"] == "paused"
    twice = await api.call("POST", "/v1/schedules/nightly/pause", params={"tenant": "acme"}, json={})
    assert twice.status_code == 409
    assert (await api.ok("POST", "/v1/schedules/nightly/resume", params={"tenant": "acme"}, json={}))[
        "status"] == "active"
    removed = await api.ok("DELETE", "/v1/schedules/nightly", params={"tenant": "acme", "reason": "done"})
    assert removed["status"] == "removed"
    assert await api.ok("GET", "/v1/schedules", params={"tenant": "acme"}) == []

    missing = await api.call("GET", "/v1/schedules/never-made")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    bad_cron = await api.call("POST", "/v1/schedules", json={**body, "cron": "every day"})
    assert bad_cron.status_code == 422
    assert "cron" in bad_cron.json()["error"]["message"]


async def test_a_workflow_is_shown_and_cancelled(api: Api) -> None:
    app = api.app
    handle = await app.submit_workflow_async(chain(app.signature("add", [1, 2]), app.signature("add", [3])))
    shown = await api.ok("GET", f"/v1/workflows/{handle.id}")
    assert (shown["state"], [s["state"] for s in shown["steps"]]) == ("running", ["ready", "blocked"])
    cancelled = await api.ok("POST", f"/v1/workflows/{handle.id}/cancel", json={"reason": "changed my mind"})
    assert cancelled["state"] == "cancelled"
    assert {s["state"] for s in cancelled["steps"]} == {"cancelled"}
    again = await api.call("POST", f"/v1/workflows/{handle.id}/cancel", json={})
    assert again.status_code == 409
    assert (await api.call("GET", f"/v1/workflows/{uuid.uuid4()}")).status_code == 404


async def test_audit_log_filters_and_exports_as_json_lines(api: Api) -> None:
    first = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 2], "countdown": 600})
    await api.ok("POST", f"/v1/tasks/{first['id']}/cancel", json={"reason": "audited"})
    for i in range(3):
        await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [i, 0], "tenant": "other"})
    await asyncio.to_thread(catch_up, api.app)

    records = (await api.ok("GET", "/v1/audit", params={"task": first["id"]}))["items"]
    assert [(r["type"], r["actor"]) for r in records] == [("submitted", "token:admin-all"),
                                                          ("cancelled", "token:admin-all")]
    assert "audited" in records[1]["summary"]
    page = await api.ok("GET", "/v1/audit", params={"tenant": "other", "limit": 2})
    assert len(page["items"]) == 2
    assert page["next"] is not None
    rest = await api.ok("GET", "/v1/audit", params={"tenant": "other", "after": page["next"]})
    assert len(rest["items"]) == 1
    assert rest["next"] is None
    assert (await api.ok("GET", "/v1/audit", params={"type": "cancelled"}))["items"] == records[1:]

    response = await api.call("GET", "/v1/audit", params={"format": "jsonl", "tenant": "other"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines == page["items"] + rest["items"]


async def test_events_are_filtered_and_paginated_by_position(api: Api) -> None:
    async with running(api.app):
        task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [4, 4]})
        await until_state(api, task["id"], "succeeded")
    await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [0, 0]})
    everything = (await api.ok("GET", "/v1/events", params={"task": task["id"]}))["items"]
    assert [e["type"] for e in everything] == ["submitted", "started", "succeeded"]
    assert everything[2]["details"]["result"] == 8

    page = await api.ok("GET", "/v1/events", params={"task": task["id"], "limit": 2})
    assert page["items"] == everything[:2]
    following = await api.ok("GET", "/v1/events", params={"task": task["id"], "from_position": page["next"]})
    assert following["items"] == everything[2:]
    succeeded = await api.ok("GET", "/v1/events", params={"type": "succeeded"})
    assert [e["stream_id"] for e in succeeded["items"]] == [task["id"]]
    unknown = await api.call("GET", "/v1/events", params={"type": "exploded"})
    assert unknown.status_code == 422
    assert "exploded" in unknown.json()["error"]["message"]


async def test_state_as_of_a_position_or_a_time_is_replayed_from_the_events(api: Api, namespace: str,
                                                                             amqp_cleanup: list[str]) -> None:
    amqp_cleanup.append(f"{namespace}.work.then")
    async with running(api.app, ["default", "then"]):
        task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 1], "queue": "then"})
        await until_state(api, task["id"], "succeeded")
    events: list[dict[str, Any]] = (await api.ok("GET", "/v1/events", params={"task": task["id"]}))["items"]
    submitted, started = events[0], events[1]

    then = await api.ok("GET", "/v1/state", params={"task": task["id"], "position": submitted["position"]})
    assert (then["as_of"]["position"], then["task"]["state"]) == (submitted["position"], "ready")
    at_start = await api.ok("GET", "/v1/state", params={"task": task["id"], "at": started["time"]})
    assert at_start["task"]["state"] == "started"
    before = await api.ok("GET", "/v1/state", params={"task": task["id"], "position": 0})
    assert before["task"] is None

    counts = await api.ok("GET", "/v1/state", params={"position": started["position"], "queue": "then"})
    assert counts["queues"] == [{"tenant": "default", "queue": "then", "total": 1,
                                 "counts": {**dict.fromkeys(counts["queues"][0]["counts"], 0), "started": 1}}]
    both = await api.call("GET", "/v1/state", params={"position": 1, "at": started["time"]})
    assert both.status_code == 422
    assert (await api.call("GET", "/v1/state", params={"task": str(uuid.uuid4()), "position": 1})).status_code == 404


async def test_metrics_are_the_projection_metrics(api: Api) -> None:
    async with running(api.app):
        for tenant in ("acme", "globex"):
            task = await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 1], "tenant": tenant})
            await until_state(api, task["id"], "succeeded")
    await asyncio.to_thread(catch_up, api.app)
    everything = await api.call("GET", "/metrics", role="viewer")
    assert everything.status_code == 200
    assert everything.headers["content-type"].startswith("text/plain")
    assert 'broker_q_tasks_total{outcome="succeeded",queue="default",task="add",tenant="acme"} 1.0' in everything.text
    assert 'tenant="globex"' in everything.text
    assert "broker_q_projection_position" in everything.text
    acme = await api.call("GET", "/metrics", role="viewer", tenant="acme")
    assert 'tenant="acme"' in acme.text
    assert 'tenant="globex"' not in acme.text
    assert "broker_q_projection_lag_events" in acme.text
    assert (await api.call("GET", "/metrics", role=None)).status_code == 401
    assert (await api.call("GET", "/metrics", role="producer")).status_code == 403


async def test_metrics_can_be_served_without_a_token(sqlite_url: str) -> None:
    app = App(store=sqlite_url)
    try:
        async with api_for(app, public_metrics=True) as api:
            response = await api.call("GET", "/metrics", role=None)
            assert response.status_code == 200
            assert "broker_q_projection_position" in response.text
    finally:
        app.close()


async def test_values_at_the_edges_of_their_types_are_answered_not_crashed_on(api: Api) -> None:
    """Found by the schemathesis run: times at the ends of the calendar, positions past 64 bits."""
    far_eta = await api.call("POST", "/v1/tasks", json={"task": "add", "args": [1, 1],
                                                        "eta": "9999-12-31T23:59:59-05:00"})
    assert far_eta.status_code == 422
    assert "out of range" in far_eta.json()["error"]["message"]
    await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 1]})
    last = await api.ok("GET", "/v1/state", params={"at": "9999-12-31T23:59:59"})
    assert sum(row["total"] for row in last["queues"]) == 1
    far = await api.ok("GET", "/v1/events", params={"until": "9999-12-31T23:59:59", "type": "submitted"})
    assert len(far["items"]) == 1
    for path, params in (("/v1/audit", {"after": 2**63}), ("/v1/events", {"from_position": 2**63}),
                         ("/v1/state", {"position": 2**64})):
        assert (await api.call("GET", path, params=params)).status_code == 422, path


async def test_tokens_are_made_listed_and_revoked(api: Api) -> None:
    made = await api.ok("POST", "/v1/tokens", status=201, json={"name": "ci-bot", "roles": ["producer"],
                                                                "tenant": "acme", "expires_in_seconds": 3600})
    assert made["token"].startswith("bq_")
    assert (made["roles"], made["tenant"], made["active"]) == (["producer"], "acme", True)
    submitted = await api.call("POST", "/v1/tasks", token=made["token"], json={"task": "add", "args": [1, 1]})
    assert submitted.status_code == 201
    assert submitted.json()["tenant"] == "acme"
    listed = await api.ok("GET", "/v1/tokens")
    assert made["id"] in {t["id"] for t in listed}
    assert all("token" not in t for t in listed), "a token is shown once, when it is made"

    revoked = await api.ok("DELETE", f"/v1/tokens/{made['id']}", params={"reason": "rotated"})
    assert (revoked["active"], revoked["revoked_by"]) == (False, "token:admin-all")
    assert (await api.call("POST", "/v1/tasks", token=made["token"], json={"task": "add"})).status_code == 401
    assert (await api.call("DELETE", f"/v1/tokens/{made['id']}")).status_code == 409
    assert (await api.call("DELETE", f"/v1/tokens/{uuid.uuid4()}")).status_code == 404
    # An admin of one tenant manages that tenant's tokens only.
    theirs = await api.ok("POST", "/v1/tokens", status=201, json={"name": "other", "roles": ["viewer"],
                                                                  "tenant": "globex"})
    assert (await api.call("DELETE", f"/v1/tokens/{theirs['id']}", tenant="acme")).status_code == 404
    assert {t["tenant"] for t in await api.ok("GET", "/v1/tokens", tenant="acme")} == {"acme"}


async def test_a_submission_over_a_tenant_quota_is_refused_with_429_and_audited(api: Api) -> None:
    created = await api.ok("POST", "/v1/tenants", status=201, json={"name": "small", "description": "tiny"})
    assert created["quota"] == dict.fromkeys(("max_waiting", "submit_rate", "submit_burst", "max_payload_bytes"))
    assert (await api.call("POST", "/v1/tenants", json={"name": "small"})).status_code == 409
    quota = await api.ok("PATCH", "/v1/tenants/small/quota", json={"max_payload_bytes": 64})
    assert quota["max_payload_bytes"] == 64
    assert (await api.ok("GET", "/v1/tenants/small/quota"))["max_payload_bytes"] == 64
    bad = await api.call("PATCH", "/v1/tenants/small/quota", json={"submit_burst": 3})
    assert bad.status_code == 422, "a burst needs a rate"

    await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 2], "tenant": "small"})
    refused = await api.call("POST", "/v1/tasks", json={"task": "add", "kwargs": {"x": 1, "y": 10**60},
                                                        "tenant": "small"})
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "quota_exceeded"
    assert "max_payload_bytes" in refused.json()["error"]["message"]
    await asyncio.to_thread(catch_up, api.app)
    audited = (await api.ok("GET", "/v1/audit", params={"type": "quota_exceeded"}))["items"]
    assert [(r["tenant"], r["actor"]) for r in audited] == [("small", "token:admin-all")]
    assert [t["name"] for t in await api.ok("GET", "/v1/tenants")] == ["small"]


async def test_breakers_are_listed_opened_and_closed(api: Api) -> None:
    opened = await api.ok("POST", "/v1/breakers/payments/open", json={"reason": "provider down"})
    assert (opened["service"], opened["status"], opened["forced"]) == ("payments", "open", True)
    assert [b["service"] for b in await api.ok("GET", "/v1/breakers")] == ["payments"]
    closed = await api.ok("POST", "/v1/breakers/payments/close", json={"reason": "back"})
    assert closed["status"] == "closed"
    timeline = await api.ok("GET", "/v1/breakers/payments/timeline")
    assert [e["actor"] for e in timeline] == ["token:admin-all", "token:admin-all"]


async def test_views_report_their_position_and_lag(api: Api) -> None:
    await api.ok("POST", "/v1/tasks", status=201, json={"task": "add", "args": [1, 1]})
    behind = {v["name"]: v for v in await api.ok("GET", "/v1/views")}
    assert behind["tasks"]["lag_events"] >= 1
    await asyncio.to_thread(catch_up, api.app)
    caught_up = {v["name"]: v for v in await api.ok("GET", "/v1/views")}
    assert {v["lag_events"] for v in caught_up.values()} == {0}
    assert set(caught_up) == {"tasks", "audit"}
