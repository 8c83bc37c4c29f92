"""Circuit breakers on the real stores: workers racing on one breaker, and the operator's commands.

Each "worker process" is a :class:`Breakers` on a store of its own opened on the same URL, as two
processes would have: only the store's unique (stream, version) stands between them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker_q.breakers import Breakers
from broker_q.domain.breaker import BreakerPolicy, BreakerStatus, status
from broker_q.domain.events import BreakerClosed, BreakerFailureRecorded, BreakerOpened, BreakerProbeStarted
from broker_q.store import open_store
from broker_q.store.port import EventStore
from tests.helpers import catch_up_views

ROOT = Path(__file__).resolve().parents[2]
POLICY = BreakerPolicy(failure_threshold=5, window=60.0, open_for=30.0, probe_timeout=60.0)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def stores(durable_store_url: str) -> Iterator[list[EventStore]]:
    opened = [open_store(durable_store_url), open_store(durable_store_url)]
    yield list(opened)
    for store in opened:
        store.close()


def two_workers(stores: list[EventStore], clock: Clock, cache_ttl: float = 1.0) -> list[Breakers]:
    return [Breakers(store, {"payments": POLICY}, clock=clock, cache_ttl=cache_ttl) for store in stores]


async def test_racing_failures_open_the_breaker_once(stores: list[EventStore]) -> None:
    clock = Clock()
    workers = two_workers(stores, clock)
    await asyncio.gather(*(workers[i % 2].record("payments", uuid.uuid4(), False, "ConnectionError", f"worker:{i % 2}")
                           for i in range(40)))
    timeline = workers[0].timeline("payments")
    assert [type(e) for e in timeline] == [BreakerFailureRecorded] * 5 + [BreakerOpened]
    assert [e.version for e in timeline] == list(range(1, 7))
    state = workers[1].state("payments")
    assert status(state, clock.now) is BreakerStatus.OPEN
    assert state.until == T0 + timedelta(seconds=30)
    deferred = await workers[1].admit("payments", uuid.uuid4(), "worker:1")
    assert (deferred.action, deferred.until) == ("defer", T0 + timedelta(seconds=30))


async def test_racing_admissions_when_half_open_start_one_probe(stores: list[EventStore]) -> None:
    clock = Clock()
    workers = two_workers(stores, clock)
    for _ in range(5):
        await workers[0].record("payments", uuid.uuid4(), False, "ConnectionError", "worker:0")
    clock.now = T0 + timedelta(seconds=31)
    tasks = [uuid.uuid4() for _ in range(40)]
    admissions = await asyncio.gather(*(workers[i % 2].admit("payments", task, f"worker:{i % 2}")
                                        for i, task in enumerate(tasks)))
    probes = [task for task, a in zip(tasks, admissions, strict=True) if a.action == "probe"]
    assert len(probes) == 1
    assert all(a.action == "defer" for a in admissions if a.action != "probe")
    started = [e for e in workers[1].timeline("payments") if isinstance(e, BreakerProbeStarted)]
    assert [e.task_id for e in started] == probes

    closer = Breakers(stores[1], {"payments": POLICY}, clock=clock, cache_ttl=0)
    assert await closer.record("payments", uuid.uuid4(), True, None, "worker:1") == []  # not the probe
    closed = await closer.record("payments", probes[0], True, None, "worker:1")
    assert [type(e) for e in closed] == [BreakerClosed]
    assert (await closer.admit("payments", uuid.uuid4(), "worker:1")).action == "run"


async def test_a_failed_probe_reopens_and_a_lost_probe_is_replaced(stores: list[EventStore]) -> None:
    clock = Clock()
    worker, other = two_workers(stores, clock, cache_ttl=0)
    for _ in range(5):
        await worker.record("payments", uuid.uuid4(), False, "ConnectionError", "worker:0")
    clock.now = T0 + timedelta(seconds=30)
    probe = uuid.uuid4()
    assert (await worker.admit("payments", probe, "worker:0")).action == "probe"
    reopened = await worker.record("payments", probe, False, "ConnectionError", "worker:0")
    assert [type(e) for e in reopened] == [BreakerOpened]
    clock.now += timedelta(seconds=30)
    lost = uuid.uuid4()
    assert (await worker.admit("payments", lost, "worker:0")).action == "probe"
    clock.now += timedelta(seconds=61)  # the probe's worker died: after probe_timeout another task probes
    assert (await other.admit("payments", uuid.uuid4(), "worker:1")).action == "probe"


def test_forced_open_stays_open_and_states_lists_every_breaker(stores: list[EventStore]) -> None:
    clock = Clock()
    breakers = Breakers(stores[0], {"payments": POLICY}, clock=clock)
    breakers.force("payments", True, "vendor outage", "operator:ann@host")
    clock.now = T0 + timedelta(days=30)
    assert status(breakers.state("payments"), clock.now) is BreakerStatus.OPEN
    admission = asyncio.run(breakers.admit("payments", uuid.uuid4(), "worker:0"))
    assert admission.action == "defer"
    assert [s.service for s in Breakers(stores[1]).states()] == ["payments"]
    assert [s.service for s in breakers.states(["mail", "payments"])] == ["mail", "payments"]
    breakers.force("payments", False, "vendor back", "operator:ann@host")
    assert status(breakers.state("payments"), clock.now) is BreakerStatus.CLOSED


# -- the commands, in a process of their own ------------------------------------------------------------
# ``broker_q.cli`` does not register the breaker commands yet; ``python -m broker_q.breakers`` runs the
# same parser and handlers through ``broker_q.cli.execute``.


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


def ok(url: str, *args: str) -> str:
    done = cli(url, *args)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


def test_operator_opens_and_closes_a_breaker_from_the_command_line(durable_store_url: str) -> None:
    url = durable_store_url
    assert json.loads(ok(url, "breakers", "--json")) == []
    assert "forced open: vendor outage" in ok(url, "breakers", "open", "payments", "--reason", "vendor outage")
    [row] = json.loads(ok(url, "breakers", "--json"))
    assert (row["service"], row["status"], row["until"], row["forced"], row["reason"]) == (
        "payments", "open", None, True, "vendor outage")
    assert row["changed_by"].startswith("operator:")
    assert "@" in row["changed_by"]

    refused = cli(url, "breakers", "open", "payments", "--reason", "again")
    assert refused.returncode == 1
    assert refused.stderr == "error: the breaker of payments is forced open already\n"

    ok(url, "breakers", "close", "payments", "--reason", "vendor back")
    table = ok(url, "breakers").splitlines()
    assert table[0].split()[:2] == ["SERVICE", "STATUS"]
    assert table[1].split()[:2] == ["payments", "closed"]
    events = json.loads(ok(url, "breakers", "timeline", "payments", "--json"))
    assert [(e["version"], e["type"], e["what"]) for e in events] == [
        (1, "breaker_opened", "forced open: vendor outage"), (2, "breaker_closed", "forced closed: vendor back")]
    assert len(ok(url, "breakers", "timeline", "payments").splitlines()) == 2

    store = open_store(url)
    try:
        assert [type(e) for e in Breakers(store).timeline("payments")] == [BreakerOpened, BreakerClosed]
        catch_up_views(store, url)
    finally:
        store.close()
    # The audit log says who forced the breaker and why, in its own words.
    operator = row["changed_by"]
    opened = "breaker payments forced open until closed by hand: vendor outage"
    closed = "breaker payments forced closed: vendor back"
    records = [json.loads(line) for line in ok(url, "audit", "--format", "json").splitlines()]
    assert [(r["type"], r["actor"], r["summary"]) for r in records] == [
        ("breaker_opened", operator, opened), ("breaker_closed", operator, closed)]
    lines = ok(url, "audit", "--actor", operator).splitlines()
    assert [line.split()[3] for line in lines] == [operator, operator]
    assert lines[0].endswith(f"breaker_opened    {opened}")
    assert lines[1].endswith(f"breaker_closed    {closed}")
