"""The API's OpenAPI document: it is served, it parses, and it describes every endpoint fully
(request and response schemas, the bearer scheme, the errors each operation answers)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import schemathesis

from broker_q import App
from broker_q.api import create_api

ENDPOINTS = {
    ("POST", "/v1/tasks"), ("GET", "/v1/tasks/{task_id}"), ("GET", "/v1/tasks/{task_id}/history"),
    ("POST", "/v1/tasks/{task_id}/cancel"),
    ("GET", "/v1/queues"), ("GET", "/v1/queues/{queue}/tasks"),
    ("GET", "/v1/dead-letters"), ("POST", "/v1/dead-letters/{task_id}/replay"),
    ("GET", "/v1/schedules"), ("POST", "/v1/schedules"), ("GET", "/v1/schedules/{name}"),
    ("GET", "/v1/schedules/{name}/next"), ("POST", "/v1/schedules/{name}/pause"),
    ("POST", "/v1/schedules/{name}/resume"), ("DELETE", "/v1/schedules/{name}"),
    ("GET", "/v1/workflows/{workflow_id}"), ("POST", "/v1/workflows/{workflow_id}/cancel"),
    ("GET", "/v1/audit"), ("GET", "/v1/events"), ("GET", "/v1/state"),
    ("GET", "/v1/breakers"), ("GET", "/v1/breakers/{service}/timeline"), ("POST", "/v1/breakers/{service}/open"),
    ("POST", "/v1/breakers/{service}/close"),
    ("GET", "/v1/tokens"), ("POST", "/v1/tokens"), ("DELETE", "/v1/tokens/{token_id}"),
    ("GET", "/v1/tenants"), ("POST", "/v1/tenants"), ("GET", "/v1/tenants/{tenant}/quota"),
    ("PATCH", "/v1/tenants/{tenant}/quota"),
    ("GET", "/v1/views"), ("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz"),
    ("GET", "/v1/activity"), ("GET", "/v1/activity/tasks"), ("GET", "/v1/activity/workflows"),
}
OPEN = {("GET", "/healthz"), ("GET", "/readyz")}
"""The only operations without a token."""


async def served_document() -> dict[str, Any]:
    api = create_api(App(store="memory://"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://api") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = json.loads(response.text)
    return document


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): operation for path, item in document["paths"].items()
            for method, operation in item.items()}


async def test_the_document_lists_every_endpoint_and_nothing_else() -> None:
    document = await served_document()
    assert document["openapi"].startswith("3.")
    assert set(operations(document)) == ENDPOINTS


async def test_every_listed_endpoint_is_served_behind_a_token() -> None:
    api = create_api(App(store="memory://", amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    values = {"task_id": "0" * 32, "workflow_id": "0" * 32, "token_id": "0" * 32, "queue": "q", "name": "n",
              "service": "s", "tenant": "t"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://api") as client:
        for method, path in sorted(ENDPOINTS - OPEN):
            response = await client.request(method, path.format(**values))
            assert response.status_code == 401, (method, path, response.text)


async def test_the_document_is_valid_openapi() -> None:
    schema = schemathesis.openapi.from_dict(await served_document())
    schema.validate()
    assert len([result.ok() for result in schema.get_all_operations()]) == len(ENDPOINTS)


async def test_every_operation_says_what_it_takes_returns_and_refuses() -> None:
    document = await served_document()
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"][
            "HTTPBearer"]["description"]}
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for key, operation in operations(document).items():
        assert operation.get("summary"), key
        responses = operation["responses"]
        success = next(code for code in responses if code.startswith("2"))
        assert responses[success]["content"], key
        if key in OPEN:
            assert "security" not in operation, key
            continue
        assert operation["security"] == [{"HTTPBearer": []}], key
        for code in ("401", "403", "503"):
            assert responses[code]["content"]["application/json"]["schema"] == error, (key, code)
        if "requestBody" in operation:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body["$ref"].startswith("#/components/schemas/"), key
            assert responses["400"]["content"]["application/json"]["schema"] == error, key
            assert "422" in responses, key


def test_the_submit_body_is_the_amqp_envelope_with_the_queue() -> None:
    schemas = create_api(App(store="memory://")).openapi()["components"]["schemas"]
    from broker_q.wire import TaskEnvelope

    envelope = set(TaskEnvelope.model_json_schema()["properties"])
    assert envelope <= set(schemas["TaskSubmission"]["properties"])
    assert set(schemas["TaskSubmission"]["properties"]) - envelope == {"queue", "time_limit", "soft_time_limit"}
