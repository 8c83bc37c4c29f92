"""Tenants on real RabbitMQ and SQLite: a flooding tenant does not starve another, and the
``max_waiting`` quota counts from the real views."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from broker_q import App, QuotaExceeded
from broker_q.amqp.topology import Topology
from broker_q.domain.events import TaskStarted, TaskSubmitted
from broker_q.relay import Relay
from projections.database import open_view_database
from projections.runner import ProjectionRunner
from tests.helpers import running, wait_for

FLOOD = 20_000
PROBES = 20
BOUND = 1.0
"""Seconds: every task of the quiet tenant starts within this of its submission, flood or not."""


@pytest.fixture
def app(sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]) -> App:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    amqp_cleanup += [f"{namespace}.work.default:flood", f"{namespace}.work.default:quiet"]

    @app.task(name="noop")
    def noop() -> None:
        return None

    return app


async def test_a_tenant_flooding_its_queue_does_not_starve_another(app: App) -> None:
    """Tenant ``flood`` puts 20,000 tasks in the queue; then tenant ``quiet`` submits one task every
    50 ms. Each of quiet's tasks starts within BOUND seconds, while most of the flood still waits:
    each created tenant has a work queue of its own, which every worker consumes with a window of
    its own (decision 0009).

    The relay publishes in log order, so the tasks submitted while it is still publishing a burst
    wait for it, whatever their tenant: the probes start once the flood is in the queue. (A burst
    of N costs the others N / the relay's rate; a tenant's ``submit_rate`` quota bounds N.)
    """
    for tenant in ("flood", "quiet"):
        app.tenants.create(tenant, actor="test")
    stop = asyncio.Event()
    settings = app.settings
    relay = Relay(app.store, settings.amqp_url, Topology(settings.namespace), store_url=settings.store)
    relaying = asyncio.create_task(relay.run(stop))
    async with running(app, relay=False, concurrency=8) as worker:
        assert worker._tenants_consumed == {"flood", "quiet"}
        for start in range(0, FLOOD, 1000):
            await asyncio.gather(*(app.submit_async("noop", tenant="flood") for _ in range(start, start + 1000)))
        flooded = app.store.max_position()
        await wait_for(lambda: relay.position >= flooded, timeout=120, interval=0.05,
                       what="the relay to publish the flood")
        started_at = time.monotonic()
        probes = []
        for _ in range(PROBES):
            probes.append((await app.submit_async("noop", tenant="quiet")).id)
            await asyncio.sleep(0.05)

        def latencies() -> list[float] | None:
            found = []
            for probe in probes:
                events = app.store.read_stream(probe, to_version=2)
                if len(events) < 2:
                    return None
                submitted, started = events
                assert isinstance(submitted, TaskSubmitted)
                assert isinstance(started, TaskStarted)
                found.append((started.timestamp - submitted.timestamp).total_seconds())
            return found

        measured: list[list[float]] = []

        async def all_started() -> bool:
            found = await asyncio.to_thread(latencies)
            if found is not None:
                measured.append(found)
            return found is not None

        await wait_for(all_started, timeout=60, interval=0.1, what="every task of the quiet tenant to start")
        elapsed = time.monotonic() - started_at
        flood_started = await asyncio.to_thread(
            lambda: sum(isinstance(r.event, TaskStarted) and r.event.tenant == "flood"
                        for r in app.store.read_log(0, 10 * FLOOD)))
    stop.set()
    await relaying
    worst = max(measured[0])
    print(f"\nquiet tenant behind a flood of {FLOOD:,}: start latency median "
          f"{statistics.median(measured[0]) * 1000:.1f} ms, worst {worst * 1000:.1f} ms; "
          f"{flood_started:,} flood tasks started by then ({elapsed:.1f} s)")
    assert worst < BOUND
    assert flood_started < FLOOD / 2, "the flood drained first: the test proved nothing"


def test_max_waiting_counts_the_tenants_waiting_tasks_in_the_views(sqlite_url: str) -> None:
    app = App(store=sqlite_url)
    app.tenants.set_quota("acme", max_waiting=3, actor="test")
    database = open_view_database(sqlite_url, "tasks")
    runner = ProjectionRunner(app.store, database)
    runner.setup()
    for _ in range(3):
        app.submit("anything", tenant="acme")
    app.submit("anything", tenant="other")  # another tenant's tasks do not count
    runner.catch_up()
    app.close()  # a new process: nothing cached
    app = App(store=sqlite_url)
    with pytest.raises(QuotaExceeded, match=r"has 3 task\(s\) waiting") as refused:
        app.submit("anything", tenant="acme")
    assert refused.value.quota == "max_waiting"
    app.submit("anything", tenant="other")
    app.close()
    database.close()
