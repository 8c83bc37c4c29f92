"""``broker-q dlq replay``: ``--all`` selects every dead letter the store holds, whatever the views'
lag, and replays each once; one named by its id fails clearly if it is not a dead letter.

The dead letters are told to the store with the domain's commands (no worker is needed to replay:
a replay is an append). The commands run in a process of their own, as an operator runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_q import App, TaskStatus
from broker_q.cli import main
from broker_q.domain import task as domain
from broker_q.domain.events import TaskReplayed
from broker_q.errors import DomainError
from broker_q.store import open_store
from broker_q.store.port import EventStore
from projections import commands
from tests.helpers import catch_up_views
from tests.unit.test_replay import Story

ROOT = Path(__file__).resolve().parents[2]


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_q.cli", "--store", url, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


def replay(url: str, *args: str) -> tuple[list[str], str]:
    """Run ``dlq replay ARGS``; return the ids it says it replayed, and its stderr."""
    done = cli(url, "dlq", "replay", *args)
    assert done.returncode == 0, done.stderr
    return [line.split()[0] for line in done.stdout.splitlines()], done.stderr


@pytest.fixture
def store(durable_store_url: str) -> Iterator[EventStore]:
    opened = open_store(durable_store_url)
    yield opened
    opened.close()


def dead_letter(story: Story, *, task: str = "charge", tenant: str = "acme") -> uuid.UUID:
    """A task that failed its only attempt, a minute after the last event of the story."""
    task_id = story.submit(task=task, tenant=tenant)
    story.start(task_id)
    story.fail(task_id, after=60)
    return task_id


def replays(store: EventStore, task_id: uuid.UUID) -> list[TaskReplayed]:
    return [e for e in store.read_stream(task_id) if isinstance(e, TaskReplayed)]


def replayed(store: EventStore, ids: dict[str, uuid.UUID]) -> set[str]:
    """The names of the tasks that have been replayed (each exactly once)."""
    counts = {name: len(replays(store, task_id)) for name, task_id in ids.items()}
    assert set(counts.values()) <= {0, 1}, counts
    return {name for name, n in counts.items() if n}


def test_replay_all_selects_dead_letters_that_the_views_have_not_seen(durable_store_url: str,
                                                                      store: EventStore) -> None:
    url, story = durable_store_url, Story()
    ids = {"charge1": dead_letter(story), "mail": dead_letter(story, task="mail")}
    ids["done"] = story.submit(task="charge")
    story.start(ids["done"])
    story.succeed(ids["done"])
    store.append(story.log)
    catch_up_views(store, url)  # the views have seen these; no projections process follows the log from here
    seen = len(story.log)
    ids["charge2"] = dead_letter(story)
    ids["globex"] = dead_letter(story, tenant="globex")
    store.append(story.log[seen:])

    names = {str(task_id): name for name, task_id in ids.items()}
    out, err = replay(url, "--all", "--task", "charge", "--reason", "vendor fixed")
    assert sorted(names[i] for i in out) == ["charge1", "charge2", "globex"]
    assert err == "3 dead letter(s) replayed\n"
    assert replayed(store, ids) == {"charge1", "charge2", "globex"}
    replay_event = replays(store, ids["charge2"])[0]
    assert (replay_event.reason, replay_event.version, replay_event.actor.startswith("operator:")) == (
        "vendor fixed", 4, True)

    # The views now lag by the three replays: a selection from them as they stood would try those again.
    out, err = replay(url, "--all", "--reason", "mail is back")
    assert ([names[i] for i in out], err) == (["mail"], "1 dead letter(s) replayed\n")
    assert replayed(store, ids) == {"charge1", "charge2", "globex", "mail"}
    assert replay(url, "--all", "--reason", "again") == ([], "0 dead letter(s) replayed\n")


def test_replay_all_filters_by_dead_letter_time_and_tenant_with_no_views_built(durable_store_url: str,
                                                                               store: EventStore) -> None:
    url, story = durable_store_url, Story()
    ids = {"old": dead_letter(story), "old_mail": dead_letter(story, task="mail")}
    ids["at"] = dead_letter(story)
    since = story.now  # the time of the dead letter "at": --since keeps it ("at TIME or later")
    ids["new_mail"] = dead_letter(story, task="mail")
    ids["globex"] = dead_letter(story, tenant="globex")
    store.append(story.log)
    names = {str(task_id): name for name, task_id in ids.items()}

    out, err = replay(url, "--all", "--since", since.isoformat(), "--reason", "after the outage")
    assert sorted(names[i] for i in out) == ["at", "globex", "new_mail"]
    assert err == "3 dead letter(s) replayed\n"
    # --all without --task: every task of the tenant, and no other tenant's
    out, err = replay(url, "--all", "--tenant", "acme", "--reason", "the rest")
    assert sorted(names[i] for i in out) == ["old", "old_mail"]
    assert replayed(store, ids) == set(ids)

    done = cli(url, "dlq", "replay", str(ids["old"]), "--reason", "twice")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"error: task {ids['old']} is ready: only a dead letter can be replayed\n"
    assert len(replays(store, ids["old"])) == 1


def test_two_operators_replaying_all_at_once_replay_each_dead_letter_once(durable_store_url: str,
                                                                          store: EventStore) -> None:
    url, story = durable_store_url, Story()
    ids = {f"t{n}": dead_letter(story) for n in range(20)}
    store.append(story.log)
    argv = [sys.executable, "-m", "broker_q.cli", "--store", url, "dlq", "replay", "--all", "--reason", "both"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    running = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [process.communicate(timeout=60) for process in running]
    assert [process.returncode for process in running] == [0, 0], outputs
    said = [line.split()[0] for out, _ in outputs for line in out.splitlines()]
    assert sorted(said) == sorted(str(task_id) for task_id in ids.values())  # each replayed by one of them
    assert replayed(store, ids) == set(ids)


def test_a_dead_letter_replayed_and_failed_again_since_it_was_selected_is_skipped(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    story = Story()
    raced, other = dead_letter(story), dead_letter(story)
    app = App(store=sqlite_url)
    app.store.append(story.log)
    select = commands.dead_letters

    def select_then_race(*args: Any, **kwargs: Any) -> Any:
        """Another operator replays ``raced`` right after the selection, and it fails again."""
        page = select(*args, **kwargs)
        app.replay_dead_letter(raced, reason="tried first", actor="operator:bob@ops")
        state = app.get_task(raced)
        started = domain.start(state, worker="worker:a", now=story.now)
        again = domain.dead_letter(domain.evolve(state, started), error_type="ValueError", message="boom",
                                   traceback=None, now=story.now)
        app.store.append([started, again])
        return page

    monkeypatch.setattr(commands, "dead_letters", select_then_race)
    assert main(["--store", sqlite_url, "dlq", "replay", "--all", "--reason", "bulk"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{other}  replayed at v4: ready for attempt 2\n"
    assert err == (f"{raced}  skipped: task {raced} changed since its dead letter was seen at v3: "
                   "it is dead_lettered at v6\n1 dead letter(s) replayed, 1 skipped\n")
    assert [(e.actor, e.reason) for e in replays(app.store, raced)] == [("operator:bob@ops", "tried first")]
    assert app.get_task(raced).status is TaskStatus.DEAD_LETTERED
    assert app.get_task(other).status is TaskStatus.READY


def test_replaying_one_dead_letter_at_a_stale_version_is_refused(sqlite_url: str) -> None:
    story = Story()
    task_id = dead_letter(story)
    app = App(store=sqlite_url)
    app.store.append(story.log)
    with pytest.raises(DomainError, match="seen at v2: it is dead_lettered at v3"):
        app.replay_dead_letter(task_id, reason="stale", version=2)
    assert app.replay_dead_letter(task_id, reason="current", version=3).status is TaskStatus.READY
