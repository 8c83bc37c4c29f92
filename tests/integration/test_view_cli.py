"""The view commands end to end: ``python -m broker_q.cli --store URL ...`` in a subprocess, on an
SQLite file whose views a runner has built (and on PostgreSQL for ``projections status|rebuild``).

Outputs are checked against the story told to the store; bad input must exit non-zero with the
error on stderr and never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_q.domain.events import Event
from broker_q.store import open_store
from tests.helpers import catch_up_views
from tests.unit.test_replay import Story

ROOT = Path(__file__).resolve().parents[2]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


def ok(url: str, *args: str) -> str:
    done = cli(url, *args)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


@dataclass(frozen=True)
class Told:
    url: str
    story: Story
    positions: list[int]
    ids: dict[str, uuid.UUID]

    @property
    def log(self) -> Sequence[Event]:
        return self.story.log


def tell(url: str) -> Told:
    """Seven tasks over two tenants, every state, two dead letters; views built by a runner."""
    story = Story()
    ids = {"a": story.submit(), "b": story.submit()}
    ids["c"] = story.submit()
    story.start(ids["c"])
    ids["d"] = story.submit()
    story.start(ids["d"])
    story.succeed(ids["d"])
    ids["e"] = story.submit()
    story.start(ids["e"], worker="worker:e")
    story.fail(ids["e"])
    ids["f"] = story.submit(tenant="globex", queue="mail")
    story.start(ids["f"])
    story.fail(ids["f"], after=5)
    ids["g"] = story.submit(tenant="globex", queue="mail")
    story.cancel(ids["g"])
    store = open_store(url)
    try:
        positions = store.append(story.log)
        catch_up_views(store, url, batch_size=5)
    finally:
        store.close()
    return Told(url, story, positions, ids)


@pytest.fixture
def told(sqlite_url: str) -> Told:
    return tell(sqlite_url)


def test_queues_as_a_table_and_as_json(told: Told) -> None:
    lines = ok(told.url, "queues").splitlines()
    assert lines[0].split() == ["tenant", "queue", "blocked", "ready", "started", "retry_scheduled", "deferred",
                                "succeeded", "dead_lettered", "cancelled", "oldest", "waiting"]
    rows = {tuple(line.split()[:2]): line.split()[2:10] for line in lines[1:]}
    assert rows == {("acme", "default"): ["0", "2", "1", "0", "0", "1", "1", "0"],
                    ("globex", "mail"): ["0", "0", "0", "0", "0", "0", "1", "1"]}
    assert lines[1].split()[-1].endswith("s")  # the age of the oldest ready task
    assert lines[2].split()[-1] == "-"         # nothing ready

    summaries = json.loads(ok(told.url, "queues", "--json", "--tenant", "globex"))
    assert summaries == [{"tenant": "globex", "queue": "mail", "counts": {"dead_lettered": 1, "cancelled": 1},
                          "oldest_waiting_seconds": None}]


def test_tasks_pages_with_the_next_cursor(told: Told) -> None:
    first = json.loads(ok(told.url, "tasks", "--queue", "default", "--state", "ready", "--limit", "1", "--json"))
    assert [item["id"] for item in first["items"]] == [str(told.ids["a"])]
    assert first["next"]
    second = json.loads(ok(told.url, "tasks", "--queue", "default", "--state", "ready", "--limit", "1", "--json",
                           "--after", first["next"]))
    assert ([item["id"] for item in second["items"]], second["next"]) == ([str(told.ids["b"])], None)

    text = ok(told.url, "tasks", "--queue", "default", "--state", "ready", "--limit", "1").splitlines()
    assert text[0].split()[:3] == [str(told.ids["a"]), "ready", "t.add"]
    assert text[1] == f"(more: --after '{first['next']}')"
    assert ok(told.url, "tasks", "--queue", "default", "--state", "ready", "--tenant", "globex", "--json") == \
        json.dumps({"items": [], "next": None}, indent=2) + "\n"


def test_dlq_list_shows_failed_tasks_most_recent_first(told: Told) -> None:
    dead = json.loads(ok(told.url, "dlq", "list", "--json"))
    assert [(i["id"], i["state"], i["error_type"], i["error"]) for i in dead["items"]] == [
        (str(told.ids["f"]), "dead_lettered", "ValueError", "boom"),
        (str(told.ids["e"]), "dead_lettered", "ValueError", "boom")]
    page = json.loads(ok(told.url, "dlq", "list", "--json", "--limit", "1"))
    rest = json.loads(ok(told.url, "dlq", "list", "--json", "--limit", "1", "--after", page["next"]))
    assert [i["id"] for i in page["items"] + rest["items"]] == [i["id"] for i in dead["items"]]
    text = ok(told.url, "dlq", "list", "--tenant", "acme").splitlines()
    assert len(text) == 1
    assert text[0].startswith(str(told.ids["e"]))
    assert text[0].endswith("ValueError: boom")


def test_audit_exports_json_lines(told: Told) -> None:
    lines = ok(told.url, "audit", "--format", "json").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["position"] for r in records] == told.positions
    assert [r["type"] for r in records] == [e.TYPE for e in told.log]
    assert records[0]["task_id"] == str(told.ids["a"])
    assert records[0]["time"] == told.log[0].timestamp.isoformat()

    failed = [json.loads(line) for line in ok(told.url, "audit", "--format", "json", "--type", "dead_lettered",
                                              "--tenant", "acme").splitlines()]
    assert [(r["task_id"], r["actor"], r["summary"]) for r in failed] == [
        (str(told.ids["e"]), "worker:e", "dead-lettered: ValueError: boom")]
    since = told.log[-3].timestamp.replace(tzinfo=None).isoformat()  # no offset: read as UTC
    late = [json.loads(line)["position"] for line in ok(told.url, "audit", "--format", "json", "--since", since)
            .splitlines()]
    assert late == told.positions[-3:]
    after = [json.loads(line)["position"] for line in ok(told.url, "audit", "--format", "json", "--after",
                                                         str(told.positions[-2])).splitlines()]
    assert after == told.positions[-1:]
    table = ok(told.url, "audit", "--task", str(told.ids["d"])).splitlines()
    assert [line.split()[0] for line in table] == [str(p) for p in told.positions[4:7]]


def counts(url: str) -> list[tuple[str, str, dict[str, int]]]:
    return [(s["tenant"], s["queue"], s["counts"]) for s in json.loads(ok(url, "queues", "--json"))]


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
def test_projections_status_and_rebuild_all(where: str, request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue("sqlite_url" if where == "sqlite" else "pg_url"))
    told = tell(url)
    head = told.positions[-1]
    status = json.loads(ok(url, "projections", "status", "--json"))
    assert [(s["name"], s["generation"], s["position"], s["head"], s["lag_events"], s["lag_seconds"],
             s["rebuilding"]) for s in status] == [("audit", 1, head, head, 0, 0.0, None),
                                                     ("tasks", 1, head, head, 0, 0.0, None)]
    before = counts(url)

    done = cli(url, "projections", "rebuild", "--all")
    assert done.returncode == 0, done.stderr
    rebuilt = done.stdout.splitlines()
    assert [line.split(":")[0] for line in rebuilt] == ["audit", "tasks"]
    assert all(f"rebuilt from {len(told.log)} events" in line for line in rebuilt)
    progress = done.stderr.splitlines()  # not a terminal: a progress line per second and one at the end
    assert progress
    assert {line.split()[0] for line in progress} == {"audit", "tasks"}
    assert all(line.split()[3] == f"{head}/{head}" for line in progress if "100.0%" in line)
    assert [line.split()[0] for line in progress if "100.0%" in line][-1] == "tasks"
    status = json.loads(ok(url, "projections", "status", "--json"))
    assert [(s["name"], s["generation"], s["position"], s["rebuilding"]) for s in status] == [
        ("audit", 2, head, None), ("tasks", 2, head, None)]
    assert counts(url) == before

    story = told.story
    story.submit()
    store = open_store(url)
    try:
        late = store.append(story.log[-1:])[0]
    finally:
        store.close()
    lagging = json.loads(ok(url, "projections", "status", "--json"))
    assert [(s["position"], s["head"], s["lag_events"]) for s in lagging] == [(head, late, late - head)] * 2
    assert [s["lag_seconds"] for s in lagging] == [(story.log[-1].timestamp - told.log[-2].timestamp)
                                                  .total_seconds()] * 2
    text = ok(url, "projections", "status").splitlines()
    assert text[0].split()[:5] == ["view", "gen", "position", "head", "lag"]
    assert text[2].split()[:5] == ["tasks", "2", str(head), str(late), str(late - head)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "--since", "yesterday"], "error: --since: 'yesterday' is not an ISO 8601 time"),
        (["audit", "--until", "2024-13-01"], "error: --until: '2024-13-01' is not an ISO 8601 time"),
        (["tasks", "--queue", "default", "--state", "ready", "--after", "garbage"],
         "error: 'garbage' is not a page cursor"),
        (["dlq", "list", "--after", "soon/abc"], "error: 'soon/abc' is not a page cursor"),
        (["audit", "--task", "nope"], "error: 'nope' is not a task id"),
        (["tasks", "--queue", "default", "--state", "ready", "--limit", "0"], "error: limit must be between"),
    ],
    ids=["bad-since", "bad-until", "bad-cursor", "bad-dlq-cursor", "bad-task", "bad-limit"],
)
def test_bad_input_is_one_line_on_stderr(told: Told, argv: list[str], message: str) -> None:
    done = cli(told.url, *argv)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(message), done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["projections", "rebuild", "nosuch"], "argument name: invalid choice: 'nosuch'"),
        (["projections", "rebuild"], "one of the arguments name --all is required"),
        (["audit", "--after", "abc"], "argument --after: invalid int value: 'abc'"),
    ],
    ids=["unknown-view", "no-view", "bad-position"],
)
def test_a_bad_command_line_is_refused_by_the_parser(told: Told, argv: list[str], message: str) -> None:
    """argparse's refusal: exit 2, the usage, then one error line; never a traceback."""
    done = cli(told.url, *argv)
    assert done.returncode == 2
    assert done.stdout == ""
    *usage, error = done.stderr.splitlines()
    assert usage[0].startswith("usage: broker-q ")
    assert message in error
    assert "Traceback" not in done.stderr


def test_querying_views_that_were_never_built_says_what_to_do(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    store.close()
    done = cli(sqlite_url, "queues")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert "projections run" in done.stderr, done.stderr
