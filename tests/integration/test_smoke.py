"""The shortest path through the whole system: submit, relay, worker, outcome, on a real broker."""

from __future__ import annotations

from broker_q import App
from tests.helpers import running


async def test_a_submitted_task_runs_and_its_result_is_recorded(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    async with running(app):
        handle = await add.submit(1, 2)
        assert await handle.result(timeout=10) == 3
    assert [e.TYPE for e in app.history(handle.id)] == ["submitted", "started", "succeeded"]
