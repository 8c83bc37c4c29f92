"""``/v1/activity``: throughput, failures and workers counted in the views, and the latest
submissions, after a real worker ran tasks (RabbitMQ, an SQLite store)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker_q import App
from broker_q.canvas import chain
from tests.helpers import running, wait_for
from tests.integration.api_support import Api, api_for, catch_up


@pytest.fixture
async def api(sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]) -> AsyncIterator[Api]:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="fail")
    def fail() -> None:
        raise ValueError("no")

    amqp_cleanup.append(f"{namespace}.work.other")
    try:
        async with api_for(app) as client:
            yield client
    finally:
        app.close()


async def test_activity_counts_outcomes_per_slot_and_names_the_workers_seen(api: Api) -> None:
    app = api.app
    async with running(app, ["default", "other"]) as worker:
        handles = [await app.submit_async("add", [i, 1]) for i in range(3)]
        handles.append(await app.submit_async("fail", max_attempts=1, tenant="acme"))

        async def finished() -> bool:
            states = [await asyncio.to_thread(app.get_task, h.id) for h in handles]
            return all(s.is_final for s in states)

        await wait_for(finished, timeout=20, what="the tasks to finish")
    await asyncio.to_thread(catch_up, app)

    seen = await api.ok("GET", "/v1/activity", params={"minutes": 5})
    assert seen["slot_seconds"] == 60
    assert len(seen["slots"]) == 5
    totals = {kind: sum(slot[kind] for slot in seen["slots"])
              for kind in ("submitted", "succeeded", "retry_scheduled", "dead_lettered")}
    assert totals == {"submitted": 4, "succeeded": 3, "retry_scheduled": 0, "dead_lettered": 1}
    assert [(w["worker"], w["events"]) for w in seen["workers"]] == [(worker.id, 8)]

    acme = await api.ok("GET", "/v1/activity", params={"tenant": "acme", "minutes": 5})
    assert sum(slot["dead_lettered"] for slot in acme["slots"]) == 1
    assert sum(slot["succeeded"] for slot in acme["slots"]) == 0
    mine = await api.ok("GET", "/v1/activity", role="viewer", tenant="acme")
    assert sum(slot["submitted"] for slot in mine["slots"]) == 1, "a tenant's token counts its own tasks only"


async def test_recent_tasks_are_newest_first_with_their_state_now_and_page_by_queue(api: Api) -> None:
    app = api.app
    ids = []
    for i in range(5):
        handle = await app.submit_async("add", [i, 1], queue="other" if i % 2 else "default", countdown=3600)
        ids.append(str(handle.id))
    await asyncio.to_thread(app.cancel, ids[0], reason="not needed")
    await asyncio.to_thread(catch_up, app)

    everything = await api.ok("GET", "/v1/activity/tasks")
    assert [t["id"] for t in everything["items"]] == ids[::-1]
    assert everything["items"][-1]["state"] == "cancelled"
    assert everything["next"] is None

    first = await api.ok("GET", "/v1/activity/tasks", params={"queue": "default", "limit": 2})
    assert [t["id"] for t in first["items"]] == [ids[4], ids[2]]
    second = await api.ok("GET", "/v1/activity/tasks", params={"queue": "default", "limit": 2,
                                                                "before": first["next"]})
    assert [t["id"] for t in second["items"]] == [ids[0]]
    assert second["next"] is None
    bad = await api.call("GET", "/v1/activity/tasks", params={"before": "1.5/99999999999999999999999"})
    assert bad.status_code == 422


async def test_recent_workflows_name_each_workflow_by_its_id(api: Api) -> None:
    app = api.app
    workflow = await app.submit_workflow_async(chain(app.signature("add", [1, 2]), app.signature("add", [3])),
                                               tenant="acme")
    await asyncio.to_thread(catch_up, app)
    found = await api.ok("GET", "/v1/activity/workflows")
    assert [(w["stream_id"], w["tenant"]) for w in found["items"]] == [(str(workflow.id), "acme")]
    assert (await api.ok("GET", "/v1/activity/workflows", role="viewer", tenant="globex"))["items"] == []


async def test_recent_replays_say_who_replayed_which_dead_letter_and_why(api: Api) -> None:
    app = api.app
    async with running(app):
        handle = await app.submit_async("fail", max_attempts=1)
        await wait_for(lambda: app.get_task(handle.id).status == "dead_lettered", timeout=20, what="a dead letter")
    await asyncio.to_thread(app.replay_dead_letter, handle.id, reason="fixed the bug", actor="token:ops")
    await asyncio.to_thread(catch_up, app)
    replays = (await api.ok("GET", "/v1/activity/tasks", params={"event": "replayed"}))["items"]
    assert [(t["id"], t["state"]) for t in replays] == [(str(handle.id), "ready")]
    assert replays[0]["event"]["actor"] == "token:ops"
    assert "fixed the bug" in replays[0]["event"]["summary"]
