"""Prometheus metrics read from the views (``projections/metrics.py``) on the durable stores.

The exposition is checked three ways: parsed back with ``prometheus_client``'s own parser (families,
samples and values), linted by ``promtool check metrics`` (Debian's ``prometheus`` package: a missing
promtool fails the test, it never skips it), and served over HTTP by ``broker-q projections run
--metrics-port``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker_q.domain import task as domain
from broker_q.domain.events import Event, TaskEvent
from broker_q.store import EventStore, open_store
from projections.database import ViewDatabases, open_view_databases
from projections.metrics import exposition, registry_for
from projections.runner import runners
from projections.views import VIEWS
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
PROMTOOL = "/usr/bin/promtool"


def stories() -> list[Event]:
    """Five tasks with known waits and run times, and every outcome."""
    log: list[Event] = []

    def task(n: int, tenant: str, queue: str, name: str, submitted_after: float) -> TaskEvent:
        event = domain.submit(task_id=uuid.UUID(int=n), task=name, queue=queue, args=[], kwargs={}, priority=5,
                              tenant=tenant, actor="client:test", now=T0 + timedelta(seconds=submitted_after))
        log.append(event)
        return event

    def then(event: TaskEvent, after: float, kind: str) -> TaskEvent:
        state = domain.replay([e for e in log if isinstance(e, TaskEvent) and e.stream_id == event.stream_id])
        assert state is not None
        now = event.timestamp + timedelta(seconds=after)
        following: TaskEvent
        if kind == "start":
            following = domain.start(state, worker="worker:1", now=now)
        elif kind == "succeed":
            following = domain.succeed(state, result=1, now=now)
        elif kind == "fail":
            following = domain.dead_letter(state, error_type="ValueError", message="boom", traceback=None, now=now)
        else:
            following = domain.cancel(state, reason="no", actor="client:test", now=now)
        log.append(following)
        return following

    a = task(1, "acme", "default", "t.add", 0)
    then(then(a, 0.3, "start"), 2.0, "succeed")              # waited 0.3 s, ran 2 s
    b = task(2, "acme", "default", "t.add", 0)
    then(then(b, 45, "start"), 0.004, "fail")                # waited 45 s, ran 4 ms
    then(task(3, "acme", "default", "t.add", 1), 1, "cancel")
    then(task(4, "globex", "mail", "t.mail", 2), 1.5, "start")  # waited 1.5 s, still running
    task(5, "acme", "default", "t.add", 50)                  # still waiting
    return log


@pytest.fixture
def store(durable_store_url: str) -> Iterator[EventStore]:
    opened = open_store(durable_store_url)
    yield opened
    opened.close()


@pytest.fixture
def databases(durable_store_url: str) -> Iterator[ViewDatabases]:
    opened = open_view_databases(durable_store_url, VIEWS)
    yield opened
    opened.close()


def samples(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The families (name -> type) and every sample (name, labels) -> value of an exposition."""
    families: dict[str, str] = {}
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            assert isinstance(sample, Sample)
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, values


def value(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def promtool() -> str:
    if not os.path.exists(PROMTOOL) and shutil.which("promtool") is None:
        pytest.fail(f"promtool is missing ({PROMTOOL}): install Debian's prometheus package "
                    "(apt-get install prometheus); .ci/run does")
    return PROMTOOL if os.path.exists(PROMTOOL) else str(shutil.which("promtool"))


def test_the_exposition_parses_with_the_expected_values_and_passes_promtool(
        store: EventStore, databases: ViewDatabases) -> None:
    log = stories()
    positions = store.append(log)
    for runner in runners(store, databases, batch_size=4):
        runner.setup()
        runner.catch_up()
    late = domain.submit(task_id=uuid.UUID(int=6), task="t.add", queue="default", args=[], kwargs={}, priority=5,
                         tenant="acme", actor="client:test", now=log[-1].timestamp + timedelta(seconds=30))
    head = store.append([late])[0]  # not applied yet: the views lag one event, 30 s
    text = exposition(registry_for(databases, store)).decode()

    families, values = samples(text)
    assert families == {
        "broker_q_tasks": "counter", "broker_q_tasks_in_state": "gauge",
        "broker_q_task_queue_wait_seconds": "histogram", "broker_q_task_run_seconds": "histogram",
        "broker_q_projection_position": "gauge", "broker_q_projection_lag_events": "gauge",
        "broker_q_projection_lag_seconds": "gauge",
    }
    acme = {"tenant": "acme", "queue": "default"}
    for outcome in ("succeeded", "dead_lettered", "cancelled"):
        assert value(values, "broker_q_tasks_total", **acme, task="t.add", outcome=outcome) == 1.0
    assert not [k for k in values if k[0] == "broker_q_tasks_total" and ("tenant", "globex") in k[1]]
    in_state = {dict(labels)["state"]: v for (name, labels), v in values.items()
                if name == "broker_q_tasks_in_state" and ("tenant", "acme") in labels and v}
    assert in_state == {"ready": 1.0, "succeeded": 1.0, "dead_lettered": 1.0, "cancelled": 1.0}
    assert value(values, "broker_q_tasks_in_state", tenant="globex", queue="mail", state="started") == 1.0

    wait = "broker_q_task_queue_wait_seconds"
    assert value(values, f"{wait}_count", **acme) == 2.0
    assert value(values, f"{wait}_sum", **acme) == pytest.approx(45.3, abs=1e-5)
    assert [value(values, f"{wait}_bucket", **acme, le=le) for le in ("0.25", "0.5", "30.0", "60.0", "+Inf")] == [
        0.0, 1.0, 1.0, 2.0, 2.0]
    assert [value(values, f"{wait}_bucket", tenant="globex", queue="mail", le=le) for le in ("1.0", "2.5")] == [
        0.0, 1.0]
    run = "broker_q_task_run_seconds"
    assert value(values, f"{run}_count", **acme) == 2.0
    assert value(values, f"{run}_sum", **acme) == pytest.approx(2.004, abs=1e-5)
    assert [value(values, f"{run}_bucket", **acme, le=le) for le in ("0.001", "0.005", "1.0", "2.5", "+Inf")] == [
        0.0, 1.0, 1.0, 2.0, 2.0]
    assert not [k for k in values if k[0].startswith(run) and ("tenant", "globex") in k[1]]  # nothing finished

    for view in ("tasks", "audit"):
        assert value(values, "broker_q_projection_position", view=view) == positions[-1]
        assert value(values, "broker_q_projection_lag_events", view=view) == head - positions[-1] == 1
        assert value(values, "broker_q_projection_lag_seconds", view=view) == pytest.approx(30.0)

    checked = subprocess.run([promtool(), "check", "metrics"], input=text.encode(), capture_output=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert (checked.stdout + checked.stderr).decode().strip() == ""  # no lint warnings either


def test_an_empty_store_exposes_positions_and_passes_promtool(store: EventStore, databases: ViewDatabases) -> None:
    for runner in runners(store, databases):
        runner.setup()
    text = exposition(registry_for(databases, store)).decode()
    _, values = samples(text)
    assert {k: v for k, v in values.items() if k[0].startswith("broker_q_projection")} == {
        (f"broker_q_projection_{m}", frozenset({("view", v)})): 0.0
        for m in ("position", "lag_events", "lag_seconds") for v in ("tasks", "audit")}
    checked = subprocess.run([promtool(), "check", "metrics"], input=text.encode(), capture_output=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_projections(url: str, port: int, output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "broker_q.cli", "--store", url, "projections", "run", "--metrics-port", str(port)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


async def test_projections_run_serves_the_metrics_over_http(durable_store_url: str, store: EventStore,
                                                           tmp_path: Path) -> None:
    log = stories()
    head = store.append(log)[-1]
    port = free_port()
    output = tmp_path / "projections.log"
    process = start_projections(durable_store_url, port, output)
    url = f"http://127.0.0.1:{port}/metrics"
    scraped: list[str] = []

    async def caught_up() -> bool:
        text = await asyncio.to_thread(scrape, url)
        if text is None:
            return process.poll() is not None
        scraped.append(text)
        _, values = samples(text)
        # On SQLite each view has a process of its own: the server shows the positions of both.
        return all(values.get(("broker_q_projection_position", frozenset({("view", view)}))) == head
                   for view in VIEWS)

    try:
        await wait_for(caught_up, timeout=30, what="the served metrics to show every view at the head")
        assert process.poll() is None, output.read_text()
        families, values = samples(scraped[-1])
        assert "broker_q_task_run_seconds" in families
        assert value(values, "broker_q_tasks_total", tenant="acme", queue="default", task="t.add",
                     outcome="succeeded") == 1.0
        assert value(values, "broker_q_task_queue_wait_seconds_count", tenant="acme", queue="default") == 2.0
        assert not [k for k in values if k[0] == "python_info" or k[0].startswith("process_")]  # our registry only

        late = domain.submit(task_id=uuid.UUID(int=7), task="t.add", queue="default", args=[], kwargs={},
                             priority=5, tenant="acme", actor="client:test", now=T0)
        store.append([late])

        def ready_in_acme() -> float | None:
            text = scrape(url)
            return None if text is None else samples(text)[1].get(
                ("broker_q_tasks_in_state", frozenset({("tenant", "acme"), ("queue", "default"), ("state", "ready")})))

        await wait_for(lambda: ready_in_acme() == 2.0, timeout=15, what="a new task to show in the next scrape")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, output.read_text()
