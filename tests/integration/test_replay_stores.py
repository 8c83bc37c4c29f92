"""Replay queries on every real store, and the replay commands end to end.

``store_url`` runs the query checks on memory://, a SQLite file and a PostgreSQL schema: positions
there come from the database (with gaps on PostgreSQL after a rolled-back insert) and every event
goes through the codec. The commands run on a SQLite file (and PostgreSQL where it matters) through
a parser of our own, the way ``broker-q`` registers them, and through ``python -m projections.cli``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from broker_q.domain.task import TaskStatus, replay
from broker_q.errors import ConcurrencyConflict
from broker_q.store import EventStore, open_store
from projections import cli
from projections.replay import events, queue_counts_at, task_state_at, timeline
from tests.conftest import TEST_MASTER_KEY
from tests.unit.test_replay import T0, Story, prefix_until, record, reference_counts


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def busy_story() -> Story:
    """Four tasks on two tenants and two queues, interleaved, with every outcome and a takeover."""
    story = Story()
    a, b = story.submit(), story.submit(queue="mail")
    c = story.submit(tenant="globex")
    story.start(a, worker="worker:1")
    story.start(b, worker="worker:2")
    d = story.submit(after=2)
    story.start(a, worker="worker:3", after=20)
    story.succeed(a, result={"sum": 3})
    story.fail(b)
    story.cancel(c)
    story.start(d)
    return story


def test_counts_and_states_at_every_position_match_a_fold_of_the_prefix(store: EventStore) -> None:
    story = busy_story()
    positions = record(store, story.log[:5])
    with pytest.raises(ConcurrencyConflict):  # a rolled-back insert: PostgreSQL leaves a gap in the positions
        store.append([story.log[0]])
    positions += record(store, story.log[5:])
    tasks = sorted(story.states)
    for p in range(len(story.log) + 1):
        position = positions[p - 1] if p else 0
        prefix = story.log[:p]
        assert queue_counts_at(store, position=position, page_size=2) == reference_counts(prefix), p
        for task in tasks:
            assert task_state_at(store, task, position=position) == replay(
                [e for e in prefix if e.stream_id == task]), (p, task)


def test_counts_and_states_at_times_match_the_prefix_rule(store: EventStore) -> None:
    story = busy_story()
    record(store, story.log)
    streams = {task: [e for e in story.log if e.stream_id == task] for task in story.states}
    for seconds in range(-1, int((story.now - T0).total_seconds()) + 2):
        at = T0 + timedelta(seconds=seconds)
        expected = reference_counts([e for s in streams.values() for e in prefix_until(s, at)])
        assert queue_counts_at(store, at=at, page_size=3) == expected, at
        for task, stream in streams.items():
            assert task_state_at(store, task, at=at) == replay(prefix_until(stream, at))


def test_events_and_their_filters_on_a_real_store(store: EventStore) -> None:
    story = busy_story()
    positions = record(store, story.log)
    assert [(r.position, r.event) for r in events(store, page_size=4)] == list(zip(positions, story.log, strict=True))
    a = story.log[0].stream_id
    assert [r.position for r in events(store, task=a, page_size=2)] == [
        p for p, e in zip(positions, story.log, strict=True) if e.stream_id == a]
    started = [r.event.actor for r in events(store, types=["started"], from_position=positions[4])]
    assert started == ["worker:2", "worker:3", "worker:a"]
    assert [r.event.TYPE for r in events(store, tenant="globex")] == ["submitted", "cancelled"]
    assert [r.position for r in events(store, since=story.log[2].timestamp, until=story.log[4].timestamp)] == (
        positions[2:5])


def test_a_timeline_read_back_from_a_real_store(store: EventStore) -> None:
    story = busy_story()
    record(store, story.log)
    a = story.log[0].stream_id
    history = timeline(store, a)
    assert history.state == story.states[a]
    assert [r.type for r in history.rows] == ["submitted", "started", "started", "succeeded"]
    assert [(x.worker, x.outcome) for x in history.attempts] == [("worker:1", "started"), ("worker:3", "succeeded")]
    assert history.attempts[0].run_time == timedelta(seconds=23)
    assert history.rows[-1].details == {"result": {"sum": 3}, "sealed_result": None}  # the story is plain
    assert history.total == history.rows[-1].since_submit == timedelta(seconds=27)


# -- the commands -------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run a replay command through a parser like ``broker-q``'s: exit code, stdout, stderr."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def recorded(sqlite_url: str) -> tuple[str, Story, list[int]]:
    store = open_store(sqlite_url)
    story = busy_story()
    positions = record(store, story.log)
    store.close()
    return sqlite_url, story, positions


def test_events_json_is_every_event_with_its_position(recorded: tuple[str, Story, list[int]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url, story, positions = recorded
    code, out, err = run(["--store", url, "events", "--json"], capsys)
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert [r["position"] for r in rows] == positions
    assert [r["type"] for r in rows] == [e.TYPE for e in story.log]
    assert rows[0]["stream_id"] == str(story.log[0].stream_id)
    assert rows[0]["time"] == story.log[0].timestamp.isoformat()
    assert rows[0]["details"]["args"] == [1, 2]

    code, out, _ = run(["--store", url, "events", "--json", "--type", "started", "--type", "dead_lettered",
                        "--tenant", "acme", "--limit", "3"], capsys)
    assert code == 0
    assert [r["type"] for r in json.loads(out)] == ["started", "started", "started"]
    code, out, _ = run(["--store", url, "events", "--json", "--tenant", "nobody"], capsys)
    assert (code, json.loads(out)) == (0, [])


def test_events_text_is_one_line_per_event(recorded: tuple[str, Story, list[int]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    url, story, positions = recorded
    since = story.log[3].timestamp.replace(tzinfo=None).isoformat()  # no offset: read as UTC
    code, out, err = run(["--store", url, "events", "--since", since, "--to-position", str(positions[5])], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [str(p) for p in positions[3:6]]
    assert "started" in lines[0]
    assert "worker:1" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "--since", "yesterday"], "--since: 'yesterday' is not an ISO 8601 time"),
        (["events", "--type", "strated"], "unknown event type strated"),
        (["events", "--task", "nope"], "'nope' is not a task id"),
        (["replay", str(uuid.UUID(int=99))], f"no task with id {uuid.UUID(int=99)}"),
        (["state", "--position", "3", "--task", str(uuid.UUID(int=1)), "--queue", "mail"], "not apply with --task"),
        (["state", "--at", "2024-13-01", "--json"], "--at: '2024-13-01' is not an ISO 8601 time"),
    ],
    ids=["bad-time", "bad-type", "bad-id", "unknown-task", "filters-with-task", "bad-month"],
)
def test_an_error_is_one_line_on_stderr_and_exit_1(recorded: tuple[str, Story, list[int]],
                                                   capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    url, _, _ = recorded
    code, out, err = run(["--store", url, *argv], capsys)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert message in err


def test_state_needs_a_time_or_a_position(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["state"], ["state", "--at", "2024-01-01", "--position", "1"], ["state", "--position", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--store", sqlite_url, *argv])
        assert exit_info.value.code == 2
        assert "usage:" in capsys.readouterr().err


def test_replay_prints_the_timeline_and_the_totals(recorded: tuple[str, Story, list[int]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, story, _ = recorded
    a = story.log[0].stream_id
    code, out, err = run(["--store", url, "replay", str(a)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"task {a}  t.add  acme/default  succeeded")
    assert lines[1].split() == ["TIME", "+DELTA", "TYPE", "ACTOR", "DETAILS"]
    assert [line.split()[1:3] for line in lines[2:6]] == [
        ["+0.000s", "submitted"], ["+3.000s", "started"], ["+23.000s", "started"], ["+1.000s", "succeeded"]]
    assert "waiting before the first start: 3.000s" in lines
    assert "attempt 1 on worker:1: 23.000s, taken over by the next attempt" in lines
    assert "attempt 2 on worker:3: 1.000s, succeeded" in lines
    assert lines[-1] == "total: 27.000s"


def test_replay_json(recorded: tuple[str, Story, list[int]], capsys: pytest.CaptureFixture[str]) -> None:
    url, story, _ = recorded
    b = story.log[1].stream_id
    code, out, _ = run(["--store", url, "replay", str(b), "--json"], capsys)
    assert code == 0
    document = json.loads(out)
    assert document["id"] == str(b)
    assert document["state"]["state"] == "dead_lettered"
    assert [e["type"] for e in document["events"]] == ["submitted", "started", "dead_lettered"]
    assert [e["since_submit_seconds"] for e in document["events"]] == [0.0, 3.0, 27.0]
    assert document["totals"] == {
        "waiting_seconds": 3.0,
        "attempts": [{"attempt": 1, "worker": "worker:2", "started_at": story.log[4].timestamp.isoformat(),
                      "ended_at": story.log[8].timestamp.isoformat(), "outcome": "dead_lettered", "run_seconds": 24.0}],
        "total_seconds": 27.0,
    }


def test_state_counts_as_of_a_position_and_a_time(recorded: tuple[str, Story, list[int]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, story, positions = recorded
    code, out, _ = run(["--store", url, "state", "--position", str(positions[5]), "--json"], capsys)
    assert code == 0
    document = json.loads(out)
    assert document["as_of"] == {"time": None, "position": positions[5]}
    assert document["queues"] == [
        {"tenant": "acme", "queue": "default", "blocked": 0, "ready": 1, "started": 1,
         "retry_scheduled": 0, "deferred": 0, "succeeded": 0, "dead_lettered": 0, "cancelled": 0, "total": 2},
        {"tenant": "acme", "queue": "mail", "blocked": 0, "ready": 0, "started": 1,
         "retry_scheduled": 0, "deferred": 0, "succeeded": 0, "dead_lettered": 0, "cancelled": 0, "total": 1},
        {"tenant": "globex", "queue": "default", "blocked": 0, "ready": 1, "started": 0,
         "retry_scheduled": 0, "deferred": 0, "succeeded": 0, "dead_lettered": 0, "cancelled": 0, "total": 1},
    ]

    at = story.now.isoformat()
    code, out, _ = run(["--store", url, "state", "--at", at, "--queue", "default", "--tenant", "acme"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"as of {story.now.isoformat(timespec='milliseconds')}"
    assert lines[1].split() == ["TENANT", "QUEUE", *(s.value.upper() for s in TaskStatus), "TOTAL"]
    assert lines[2].split() == ["acme", "default", "0", "0", "1", "0", "0", "1", "0", "0", "2"]
    assert len(lines) == 3

    code, out, _ = run(["--store", url, "state", "--position", "0"], capsys)
    assert (code, out.splitlines()) == (0, ["as of position 0", "no tasks"])


def test_state_of_one_task(recorded: tuple[str, Story, list[int]], capsys: pytest.CaptureFixture[str]) -> None:
    url, story, positions = recorded
    d = story.log[5].stream_id
    code, out, _ = run(["--store", url, "state", "--task", str(d), "--position", str(positions[4]), "--json"],
                       capsys)
    assert (code, json.loads(out)) == (0, {"as_of": {"time": None, "position": positions[4]}, "task": None})
    code, out, _ = run(["--store", url, "state", "--task", str(d), "--position", str(positions[4])], capsys)
    assert (code, out) == (0, f"task {d} did not exist yet as of position {positions[4]}\n")

    code, out, _ = run(["--store", url, "state", "--task", str(d), "--at", story.now.isoformat(), "--json"], capsys)
    task = json.loads(out)["task"]
    assert (code, task["id"], task["state"], task["attempts"]) == (0, str(d), "started", 1)
    code, out, _ = run(["--store", url, "state", "--task", str(d), "--at", story.now.isoformat()], capsys)
    assert code == 0
    assert "       state: started" in out.splitlines()


def test_the_commands_register_on_another_parser_with_common_options(
    recorded: tuple[str, Story, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, _ = recorded
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store")
    parser = argparse.ArgumentParser(prog="broker-q")
    cli.add_commands(parser.add_subparsers(required=True, metavar="COMMAND"), [common])
    options = parser.parse_args(["events", "--store", url, "--json", "--limit", "2"])
    assert options.command(options) == 0
    assert [r["type"] for r in json.loads(capsys.readouterr().out)] == ["submitted", "submitted"]


def test_an_unreachable_store_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_Q_MASTER_KEY", TEST_MASTER_KEY)  # else that is the first error
    code, out, err = run(["--store", "postgresql://postgres@127.0.0.1:1/none", "state", "--position", "1"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: event store unavailable")
    assert err.count("\n") == 1


def test_python_dash_m_runs_the_commands(recorded: tuple[str, Story, list[int]]) -> None:
    url, _, positions = recorded
    done = subprocess.run([sys.executable, "-m", "projections.cli", "--store", url, "events", "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert [r["position"] for r in json.loads(done.stdout)] == positions
    done = subprocess.run([sys.executable, "-m", "projections.cli", "--store", url, "replay", "not-an-id"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "error: 'not-an-id' is not a task id\n")


def test_the_commands_read_a_postgresql_store(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(pg_url)
    story = busy_story()
    positions = record(store, story.log)
    store.close()
    code, out, _ = run(["--store", pg_url, "state", "--position", str(positions[-1]), "--json"], capsys)
    assert code == 0
    assert {(q["tenant"], q["queue"]): q["total"] for q in json.loads(out)["queues"]} == {
        ("acme", "default"): 2, ("acme", "mail"): 1, ("globex", "default"): 1}
    code, out, _ = run(["--store", pg_url, "replay", str(story.log[0].stream_id), "--json"], capsys)
    assert (code, json.loads(out)["totals"]["total_seconds"]) == (0, 27.0)
