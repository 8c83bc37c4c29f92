"""The supervisor of the projections processes (``projections/supervisor.py``) on small stand-in
commands: a child exiting too often within the window fails it and stops the others, exits spread
wider than the window only restart, and stopping sends SIGTERM, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from projections.supervisor import ProjectionProcessesFailing, Supervisor
from tests.helpers import wait_for


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPS = python("import time; time.sleep(60)")


async def test_a_child_that_exits_too_often_within_the_window_fails_the_supervisor(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crashes = python(f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)")
    supervisor = Supervisor({"crashing": crashes, "steady": SLEEPS}, max_exits=3, window=60)
    started = time.monotonic()
    with pytest.raises(ProjectionProcessesFailing, match=r"view crashing exited 3 times within 60s \(last with "
                                                          r"exit code 3\)"):
        await asyncio.wait_for(supervisor.run(asyncio.Event()), 30)
    assert starts.read_text() == "xxx"
    assert time.monotonic() - started < 10  # a restart at once, then after half a second
    assert supervisor.processes["steady"].returncode == -signal.SIGTERM  # the other child was stopped


async def test_exits_spread_wider_than_the_window_only_restart(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crashes = python(f"import time; open({str(starts)!r}, 'a').write('x'); time.sleep(0.3); raise SystemExit(3)")
    supervisor = Supervisor({"crashing": crashes}, max_exits=2, window=0.2)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    try:
        # Each run lasts longer than the window: never two exits in it.
        await wait_for(lambda: (starts.exists() and len(starts.read_text()) >= 4) or running.done(), timeout=30,
                       what="four starts")
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


async def test_stopping_sends_sigterm_then_kills_a_child_that_ignores_it() -> None:
    ignores = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    supervisor = Supervisor({"stubborn": ignores, "polite": SLEEPS}, grace=0.5)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    await asyncio.wait_for(supervisor.started.wait(), 10)
    await wait_for(lambda: _ignores_sigterm(supervisor.processes["stubborn"].pid), timeout=10,
                   what="the stubborn child to ignore SIGTERM")
    stop.set()
    await asyncio.wait_for(running, 30)
    assert supervisor.processes["polite"].returncode == -signal.SIGTERM
    assert supervisor.processes["stubborn"].returncode == -signal.SIGKILL


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False
