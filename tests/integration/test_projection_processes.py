"""``broker-q projections run`` on an SQLite store: a process per view, supervised by the one started.

Proved here, with real processes on real files: every view catches up and follows the log, each in
a process of its own; a runner process killed with SIGKILL is started again and its view goes on;
a runner process that keeps exiting makes the command exit non-zero with an error that names the
view, and stops the other runners; the runners stop with the command (SIGINT), and by themselves if
the command is killed. (tests/integration/test_supervisor.py checks the supervisor's restart policy
and its stopping on small stand-in commands.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_q.store import EventStore, open_store
from projections.database import ViewDatabases, open_view_databases, views_path
from projections.runner import ProjectionRunner, runners
from projections.views import VIEWS
from tests.helpers import alive, child_pids, wait_for
from tests.integration.test_projections import append_in_groups, generate, view_counts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(sqlite_url: str) -> Iterator[EventStore]:
    opened = open_store(sqlite_url)
    yield opened
    opened.close()


@pytest.fixture
def databases(sqlite_url: str) -> Iterator[ViewDatabases]:
    opened = open_view_databases(sqlite_url, VIEWS)
    yield opened
    opened.close()


def projections_run(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "broker_q.cli", "--store", url, "projections", "run"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                                stderr=subprocess.STDOUT)


def runner_of(parent: int) -> dict[str, int]:
    """The runner processes of ``projections run`` process ``parent``, by view."""
    found = {}
    for pid in child_pids(parent):
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--view" in arguments:
            found[arguments[arguments.index(b"--view") + 1].decode()] = pid
    return found


def positions(observers: list[ProjectionRunner]) -> dict[str, int] | None:
    try:
        return {name: p.position for runner in observers for name, p in runner.positions().items()}
    except Exception:  # the processes have not created the tables yet
        return None


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_each_view_has_a_file_of_its_own_beside_the_store(sqlite_url: str, store: EventStore,
                                                         databases: ViewDatabases) -> None:
    events = sqlite_url.removeprefix("sqlite:///")
    assert [d.views for d in databases] == [("audit",), ("tasks",)]
    assert views_path(events, "tasks") == events.removesuffix(".sqlite") + ".views.tasks.sqlite"
    assert views_path("/data/store", "audit") == "/data/store.views.audit"
    with pytest.raises(ValueError, match="not a view name"):
        views_path(events, "../tasks")
    with pytest.raises(ValueError, match=r"views \['audit'\] do not live in this database"):
        ProjectionRunner(store, databases.of("tasks"), list(VIEWS.values()))
    for runner in runners(store, databases):
        runner.setup()
    assert sorted(p.name for p in Path(events).parent.glob("*.views.*.sqlite")) == [
        "store.views.audit.sqlite", "store.views.tasks.sqlite"]


async def test_a_runner_killed_is_started_again_and_every_view_goes_on(
        sqlite_url: str, store: EventStore, databases: ViewDatabases, tmp_path: Path) -> None:
    generated = generate(3000)
    head = append_in_groups(store, generated.events)[-1]
    observers = runners(store, databases)
    log = tmp_path / "projections.log"
    process = projections_run(sqlite_url, log)
    try:
        await wait_for(lambda: positions(observers) == {"audit": head, "tasks": head} or process.poll() is not None,
                       timeout=30, what="every view to catch up")
        assert process.poll() is None, log.read_text()
        first = runner_of(process.pid)
        assert set(first) == set(VIEWS)
        assert process.pid not in first.values()

        os.kill(first["tasks"], signal.SIGKILL)
        await wait_for(lambda: set(runner_of(process.pid).items()) - set(first.items()) or process.poll() is not None,
                       timeout=30, what="a new runner of the tasks view")
        second = runner_of(process.pid)
        assert second["audit"] == first["audit"]
        assert second["tasks"] != first["tasks"]
        assert "projections process tasks exited with signal SIGKILL: starting it again" in log.read_text()

        late = generate(300, seed=1)
        head = append_in_groups(store, late.events)[-1]
        await wait_for(lambda: positions(observers) == {"audit": head, "tasks": head}, timeout=30,
                       what="both views to follow the events appended after the restart")
        assert view_counts(databases) == {key: generated.counts().get(key, 0) + late.counts().get(key, 0)
                                          for key in generated.counts().keys() | late.counts().keys()}

        process.send_signal(signal.SIGINT)  # a Ctrl-C: the runners are stopped by the command, in order
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()
        assert not any(map(alive, second.values()))
    finally:
        stop(process)


def test_a_runner_that_keeps_exiting_fails_the_command_and_stops_the_others(
        sqlite_url: str, store: EventStore, tmp_path: Path) -> None:
    append_in_groups(store, generate(30).events)
    # The audit view's file cannot be opened: its runner exits with an error every time it starts.
    Path(views_path(sqlite_url.removeprefix("sqlite:///"), "audit")).mkdir()
    log = tmp_path / "projections.log"
    process = projections_run(sqlite_url, log)
    try:
        assert process.wait(60) == 1, log.read_text()
        output = log.read_text()
        assert output.count("view database unavailable") == 3  # the runner's own error, each time
        assert output.splitlines()[-1] == ("error: the projections process of view audit exited 3 times within 60s "
                                           "(last with exit code 1): its view no longer follows the log; "
                                           "see its output")
        assert running_on(sqlite_url) == [], "a runner process outlived the command"
    finally:
        stop(process)


def running_on(url: str) -> list[int]:
    """The processes (not zombies) whose command line names ``url``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and url.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_runners_stop_by_themselves_when_the_command_is_killed(
        sqlite_url: str, store: EventStore, databases: ViewDatabases, tmp_path: Path) -> None:
    head = append_in_groups(store, generate(300).events)[-1]
    observers = runners(store, databases)
    log = tmp_path / "projections.log"
    process = projections_run(sqlite_url, log)
    try:
        await wait_for(lambda: positions(observers) == {"audit": head, "tasks": head} or process.poll() is not None,
                       timeout=30, what="every view to catch up")
        children = runner_of(process.pid)
        assert set(children) == set(VIEWS), log.read_text()
        process.kill()
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
        await wait_for(lambda: not any(map(alive, children.values())), timeout=30,
                       what="the runners to stop once their stdin closed")
        assert log.read_text().count("the supervising process is gone: stopping") == len(VIEWS)
    finally:
        stop(process)
