"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against ``broker-q run``
(relay, worker, scheduler, projections) and ``broker-q api`` as separate processes on an SQLite
store and RabbitMQ, as an operator would run them.

Each test signs in with a token through the login page and uses the pages as a person would. The
screenshots of every page are saved to ``artifacts/screenshots/`` (``BROKER_Q_SCREENSHOTS`` names
another folder: ``docs/screenshots`` regenerates the committed ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from broker_q import App, dag
from broker_q.access import Role
from tests.integration.test_api_served import free_port, wait_until_it_answers

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("BROKER_Q_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("BROKER_Q_SCREENSHOTS") or ROOT / "artifacts" / "screenshots")
LAPTOP = {"width": 1366, "height": 850}
LIVE = 20_000
"""Milliseconds a page may take to show a change by itself (its live update runs every 3 s)."""

pytestmark = pytest.mark.browser


def wait_until(condition: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return value


@dataclass
class Deployment:
    url: str
    app: App
    folder: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, role: str) -> str:
        if role not in self.tokens:
            self.tokens[role], _ = self.app.access.create_token(name=role, roles=[Role(role)], tenant=None,
                                                                actor="test")
        return self.tokens[role]

    def call(self, method: str, path: str, role: str = "admin", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(role)}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.status_code, response.text)
        return response.json()

    def gate(self, name: str) -> Path:
        """A file that a ``gated`` or ``flaky`` task waits for: it does not exist until the test says."""
        return self.folder / f"gate-{name}"

    def submit(self, task: str, *args: Any, **options: Any) -> str:
        return str(self.ok("POST", "/v1/tasks", status=201, json={"task": task, "args": list(args), **options})["id"])

    def state(self, task_id: str) -> str:
        return str(self.ok("GET", f"/v1/tasks/{task_id}")["state"])


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child writes to its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "broker_q.cli", *command], env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("dashboard")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    store = f"sqlite:///{folder}/store.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BROKER_Q_STORE": store, "BROKER_Q_AMQP_URL": amqp_url,
           "BROKER_Q_NAMESPACE": namespace}
    app = App(store=store, amqp_url=amqp_url, namespace=namespace)
    port = free_port()
    reference = "tests.e2e.dashboard_app:app"
    processes = [_start(["run", reference, "--concurrency", "8"], env, folder / "run.log"),
                 _start(["api", "--app", reference, "--port", str(port)], env, folder / "api.log")]
    deployment = Deployment(f"http://127.0.0.1:{port}", app, folder)
    try:
        with httpx.Client(base_url=deployment.url, timeout=10) as client:
            wait_until_it_answers(client, processes[1])
        warm = deployment.submit("add", 1, 2)
        wait_until(lambda: deployment.state(warm) == "succeeded", timeout=60, what="the worker to run a task")
        yield deployment
    finally:
        for name in ("first", "dag", "flaky", "then"):  # nothing left waiting for a gate
            deployment.gate(name).touch()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        app.close()
        _delete_queues(amqp_url, namespace)


def _delete_queues(amqp_url: str, namespace: str) -> None:
    import asyncio

    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url)
        try:
            for queue in (f"{namespace}.work.default", f"{namespace}.invalid", f"{namespace}.ingress.unrouted",
                          f"{namespace}.ingress.default"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in ("ingress", "ingress.unrouted", "work", "events"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(f"{namespace}.{exchange}")
        finally:
            await connection.close()

    # In a thread of its own: Playwright's sync API keeps an event loop in this one.
    worker = threading.Thread(target=asyncio.run, args=(delete(),))
    worker.start()
    worker.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    # As root (CI), chromium refuses to start with its sandbox on.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield launched
        launched.close()


@pytest.fixture
def sign_in(browser: Browser, deployment: Deployment) -> Iterator[Callable[[str], Page]]:
    """Open a browser of its own for a role, signed in with a token of that role through the login page."""
    contexts = []

    def open_as(role: str) -> Page:
        context = browser.new_context(viewport=LAPTOP, accept_downloads=True)
        context.set_default_timeout(LIVE)
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{deployment.url}/ui/")
        expect(page).to_have_url(f"{deployment.url}/ui/login?next=%2Fui%2F")
        page.get_by_label("API token").fill(deployment.token(role))
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        return page

    yield open_as
    for context in contexts:
        context.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def test_signed_in_a_submitted_task_appears_and_succeeds_without_a_reload(
        browser: Browser, deployment: Deployment, sign_in: Callable[[str], Page]) -> None:
    login = browser.new_page(viewport=LAPTOP)
    login.goto(f"{deployment.url}/ui/tasks")
    login.get_by_label("API token").fill("bq_not_a_token")
    login.get_by_role("button", name="Sign in").click()
    expect(login.get_by_role("alert")).to_be_visible()
    shot(login, "login")
    login.close()

    page = sign_in("operator")
    page.goto(f"{deployment.url}/ui/tasks")
    page.evaluate("window.stayed = true")  # gone if the page reloads
    gate = deployment.gate("first")
    task_id = deployment.submit("gated", str(gate))
    row = page.locator(f'tr[data-task="{task_id}"]')
    expect(row).to_be_visible(timeout=LIVE)
    expect(row.locator(".state")).to_have_text("started", timeout=LIVE)
    gate.touch()
    expect(row.locator(".state")).to_have_text("succeeded", timeout=LIVE)
    assert page.evaluate("window.stayed") is True, "the page reloaded"
    shot(page, "tasks")

    row.get_by_role("link", name="gated").click()
    expect(page.locator("#task-state")).to_have_text("succeeded")
    events = page.locator("#timeline > li")
    expect(events).to_have_count(3)
    expect(events.nth(0)).to_contain_text("submitted")
    expect(events.nth(0)).to_contain_text("token:admin")
    expect(events.nth(1)).to_contain_text("started")
    expect(events.nth(1)).to_contain_text("worker:")
    expect(events.nth(2)).to_contain_text("succeeded")
    expect(page.locator("#task-result")).to_have_text('"opened"')  # an operator may read payloads
    shot(page, "task")

    page.goto(f"{deployment.url}/ui/")
    expect(page.locator("#queue-table")).to_contain_text("default")
    expect(page.locator("#workers")).to_contain_text("worker:")
    expect(page.locator(".bar-succeeded").first).to_be_attached()


def test_a_dead_letter_replayed_from_its_page_runs_again(deployment: Deployment,
                                                         sign_in: Callable[[str], Page]) -> None:
    marker = deployment.gate("flaky")
    task_id = deployment.submit("flaky", str(marker), retry={"max_attempts": 1})
    wait_until(lambda: any(item["id"] == task_id for item in deployment.ok("GET", "/v1/dead-letters")["items"]),
               what="the dead letter in the view")
    page = sign_in("operator")
    page.goto(f"{deployment.url}/ui/dead-letters")
    expect(page.get_by_role("heading", name="ValueError")).to_be_visible()
    shot(page, "dead-letters")
    page.get_by_role("link", name="flaky").click()
    expect(page.locator(".traceback")).to_contain_text("ValueError: the file")
    expect(page.get_by_role("button", name="Replay (run again)")).to_be_visible()
    shot(page, "dead-letter")
    page.go_back()

    marker.touch()  # what made it fail is fixed
    page.get_by_label("Select flaky").check()
    page.get_by_label("Reason").fill("the file is back")
    page.get_by_role("button", name="Replay selected").click()
    expect(page.get_by_role("status")).to_contain_text("Replayed 1 dead letter.")
    row = page.locator(f'tr[data-task="{task_id}"]')
    expect(row.locator(".state")).to_have_text("succeeded", timeout=LIVE)
    expect(row).to_contain_text("token:operator")
    expect(row).to_contain_text("the file is back")
    shot(page, "replays")

    row.get_by_role("link", name="flaky").click()
    replayed = page.locator("#timeline > li.event-replayed")
    expect(replayed).to_contain_text("token:operator")
    expect(replayed).to_contain_text("the file is back")
    expect(page.locator("#timeline > li").last).to_contain_text("succeeded")


def test_a_role_without_the_permission_has_no_button_and_is_refused_if_it_forces_one(
        deployment: Deployment, sign_in: Callable[[str], Page]) -> None:
    task_id = deployment.submit("add", 1, 2, countdown=3600)
    page = sign_in("viewer")
    page.goto(f"{deployment.url}/ui/tasks/{task_id}")
    expect(page.locator("#task-state")).to_have_text("blocked")
    expect(page.get_by_role("button", name="Cancel task")).to_have_count(0)
    expect(page.get_by_text("Your roles allow no action on this task.")).to_be_visible()
    expect(page.locator("#task-args")).to_have_count(0)  # a viewer may not read payloads
    expect(page.get_by_role("link", name="Audit")).to_have_count(0)

    # The form the page does not offer, posted anyway with the session's own form token.
    page.evaluate("""(taskId) => {
        const form = document.createElement("form");
        form.method = "post";
        form.action = `/ui/tasks/${taskId}/cancel`;
        form.innerHTML = `<input name="csrf" value="${document.querySelector('input[name=csrf]').value}">
                          <input name="reason" value="forced">`;
        document.body.append(form);
        form.submit();
    }""", task_id)
    expect(page.get_by_role("heading", name="Refused")).to_be_visible()
    expect(page.get_by_text("recorded in the audit log")).to_be_visible()
    shot(page, "refused")
    refused = deployment.call("POST", f"/v1/tasks/{task_id}/cancel", role="viewer", json={"reason": "forced"})
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_denied"
    assert deployment.state(task_id) == "blocked"

    def denials() -> list[dict[str, Any]]:
        items = deployment.ok("GET", "/v1/audit", params={"type": "access_denied", "actor": "token:viewer"})["items"]
        return [item for item in items if task_id in item["summary"]]

    assert len(wait_until(lambda: len(denials()) >= 2 and denials(), what="both refusals in the audit view")) == 2
    admin = sign_in("admin")
    admin.goto(f"{deployment.url}/ui/audit?type=access_denied&actor=token%3Aviewer")
    expect(admin.locator("#audit-table tbody tr")).to_have_count(2)
    expect(admin.locator("#audit-table")).to_contain_text(f"cancel task {task_id}")
    shot(admin, "audit")
    with admin.expect_download() as download:
        admin.get_by_role("link", name="Export JSON lines").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["access_denied", "access_denied"]


def test_workflow_graph_schedules_breakers_and_time_travel(deployment: Deployment,
                                                           sign_in: Callable[[str], Page]) -> None:
    app = deployment.app
    workflow = app.submit_workflow(dag({
        "extract": app.signature("gated", [str(deployment.gate("dag"))]),
        "lookup": app.signature("add", [1, 2]),
        "clean": (app.signature("collect"), ["extract"]),
        "enrich": (app.signature("collect"), ["extract", "lookup"]),
        "report": (app.signature("collect"), ["clean", "enrich"]),
    }))
    page = sign_in("operator")
    page.goto(f"{deployment.url}/ui/workflows/{workflow.id}")
    expect(page.locator("svg .node")).to_have_count(5)
    expect(page.get_by_role("link", name="step lookup: succeeded")).to_be_visible(timeout=LIVE)
    expect(page.get_by_role("link", name="step extract: started")).to_be_visible(timeout=LIVE)
    expect(page.get_by_role("link", name="step report: blocked, waits for clean, enrich")).to_be_visible()
    expect(page.locator("path.edge.blocking")).to_have_count(4)
    shot(page, "workflow")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()  # the first stop of the keyboard
    page.get_by_role("link", name="step lookup: succeeded").focus()  # a step of the graph is a link, by keyboard too
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="add", level=1)).to_be_visible()
    page.goto(f"{deployment.url}/ui/workflows")
    expect(page.locator("#workflow-table")).to_contain_text(str(workflow.id)[:8], timeout=LIVE)

    deployment.ok("POST", "/v1/schedules", json={"name": "nightly-report", "cron": "0 2 * * *", "task": "add",
                                                 "args": [1, 2], "timezone": "Europe/Paris"})
    page.goto(f"{deployment.url}/ui/schedules")
    expect(page.locator(".fires li")).to_have_count(5)
    page.get_by_label("Reason").fill("quarter close")
    page.get_by_role("button", name="Pause").click()
    expect(page.get_by_role("status")).to_have_text("Schedule paused.")
    expect(page.get_by_role("heading", name="nightly-report")).to_contain_text("paused")
    shot(page, "schedules")

    deployment.ok("POST", "/v1/breakers/payments/open", json={"reason": "provider outage"})
    page.goto(f"{deployment.url}/ui/breakers")
    expect(page.get_by_role("heading", name="payments")).to_contain_text("open")
    shot(page, "breakers")
    page.get_by_label("Reason").fill("provider is back")
    page.get_by_role("button", name="Close now").click()
    expect(page.get_by_role("heading", name="payments")).to_contain_text("closed")

    # A task caught running, for time travel: its state at a moment while it ran, and now.
    gate = deployment.gate("then")
    task_id = deployment.submit("gated", str(gate))
    wait_until(lambda: deployment.state(task_id) == "started", what="the task to start")
    moment = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)  # the form takes whole seconds
    wait_until(lambda: datetime.now(UTC) > moment + timedelta(seconds=0.2), what="the moment to pass")
    gate.touch()
    wait_until(lambda: deployment.state(task_id) == "succeeded", what="the task to succeed")
    page.goto(f"{deployment.url}/ui/time-travel")
    page.get_by_label("Moment (UTC)").fill(moment.strftime("%Y-%m-%dT%H:%M:%S"))
    page.get_by_label("Task id").fill(task_id)
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#task-then tr", has_text="Then")).to_contain_text("started")
    expect(page.locator("#task-then tr", has_text="Now")).to_contain_text("succeeded")
    expect(page.locator("#counts-then")).to_contain_text("default")
    shot(page, "time-travel")


def test_the_overview_shows_each_tenant_s_throughput_and_failures(deployment: Deployment,
                                                                  sign_in: Callable[[str], Page]) -> None:
    missing = str(deployment.gate("never"))
    ids = [deployment.submit("add", i, 1, tenant="acme") for i in range(12)]
    ids += [deployment.submit("flaky", missing, tenant="acme", retry={"max_attempts": 2, "backoff": 0})
            for _ in range(3)]
    final = {"succeeded", "dead_lettered"}
    wait_until(lambda: all(deployment.state(i) in final for i in ids), timeout=30, what="acme's tasks to finish")
    page = sign_in("admin")
    expect(page.locator("#overview")).to_contain_text("acme", timeout=LIVE)
    expect(page.locator(".bar-dead_lettered").first).to_be_attached(timeout=LIVE)
    expect(page.locator(".bar-retry_scheduled").first).to_be_attached(timeout=LIVE)
    shot(page, "overview")
