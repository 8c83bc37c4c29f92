"""``/healthz`` and ``/readyz``: the process answers; the store and RabbitMQ answer, or 503 says which does not."""

from __future__ import annotations

import socket
import uuid

from broker_q import App
from tests.conftest import TEST_MASTER_KEY
from tests.integration.api_support import api_for


def closed_port() -> int:
    """A local port that nothing listens on (bound for a moment, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_ready_when_the_store_and_rabbitmq_answer(sqlite_url: str, amqp_url: str) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url)
    try:
        async with api_for(app) as api:
            assert await api.ok("GET", "/healthz", role=None) == {"status": "ok"}
            assert await api.ok("GET", "/readyz", role=None) == {
                "status": "ready", "checks": {"store": {"ok": True, "error": None},
                                             "broker": {"ok": True, "error": None}}}
    finally:
        app.close()


async def test_not_ready_names_rabbitmq_when_it_does_not_answer(sqlite_url: str) -> None:
    app = App(store=sqlite_url, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    try:
        async with api_for(app) as api:
            response = await api.call("GET", "/readyz", role=None)
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "unavailable"
            assert body["checks"]["store"] == {"ok": True, "error": None}
            assert body["checks"]["broker"]["ok"] is False
            assert "RabbitMQ" in body["checks"]["broker"]["error"]
            assert "guest:guest" not in body["checks"]["broker"]["error"], "the password is not shown"
            assert (await api.call("GET", "/healthz", role=None)).status_code == 200, "alive all the same"
    finally:
        app.close()


async def test_not_ready_names_the_store_when_it_does_not_answer(amqp_url: str) -> None:
    # A PostgreSQL deployment gives its master key (without one, encryption on refuses to start).
    app = App(store=f"postgresql://postgres@127.0.0.1:{closed_port()}/test", amqp_url=amqp_url,
              master_key=TEST_MASTER_KEY)
    try:
        async with api_for(app) as api:
            response = await api.call("GET", "/readyz", role=None)
            assert response.status_code == 503
            checks = response.json()["checks"]
            assert checks["broker"] == {"ok": True, "error": None}
            assert checks["store"]["ok"] is False
            assert checks["store"]["error"]
            # The other endpoints say that the store is unavailable (checking a token reads it), not crash.
            token = f"bq_{uuid.uuid4().hex}_{'A' * 43}"
            task = await api.call("GET", f"/v1/tasks/{uuid.uuid4()}", role=None, token=token)
            assert task.status_code == 503
            assert task.json()["error"]["type"] == "store_unavailable"
    finally:
        app.close()
