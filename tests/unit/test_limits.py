"""Time limits around one handler: async, sync in a thread, and sync in a child process."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_q.errors import SerializationError
from broker_q.limits import (
    AttemptCancelled,
    HandlerError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    abandoned_threads,
    run_handler,
)
from broker_q.threads import HandlerThreads, cancelled

TARGETS = "tests.unit.limits_targets"


@pytest.fixture
def pool() -> Iterator[HandlerThreads]:
    pool = HandlerThreads(2, spare=2, name="test-limits")
    yield pool
    pool.shutdown(wait=True)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- async handlers ------------------------------------------------------------------------------

async def test_async_soft_limit_cancels_the_handler_and_surfaces_as_soft_time_limit(pool: HandlerThreads) -> None:
    seen: list[str] = []

    async def handler() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with pytest.raises(SoftTimeLimitExceeded) as raised:
        await run_handler(handler, [], {}, is_async=True, soft_time_limit=0.05, time_limit=None, pool=pool)
    assert seen == ["cancelled"]
    assert isinstance(raised.value.__cause__, asyncio.CancelledError)


async def test_async_handler_that_catches_the_soft_cancellation_returns_its_result(
        pool: HandlerThreads) -> None:
    async def handler(x: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return x * 2
        return 0

    result = await run_handler(handler, [21], {}, is_async=True, soft_time_limit=0.05, time_limit=5, pool=pool)
    assert result == 42


async def test_async_handler_swallowing_every_cancellation_times_out_within_limit_and_grace(
        pool: HandlerThreads) -> None:
    release = asyncio.Event()
    cancellations = 0
    tasks: list[asyncio.Task[Any]] = []

    async def stubborn() -> str:
        nonlocal cancellations
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancellations += 1
        return "released"

    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        await run_handler(stubborn, [], {}, is_async=True, soft_time_limit=0.1, time_limit=0.3, pool=pool,
                          grace=0.2)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 + 0.2 + 0.5
    assert cancellations == 2  # at the soft limit, then at the hard one
    release.set()
    assert await tasks[0] == "released"


async def test_cancelling_run_handler_cancels_an_async_handler(pool: HandlerThreads) -> None:
    running = asyncio.Event()
    cleaned_up = asyncio.Event()

    async def handler() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    call = asyncio.ensure_future(
        run_handler(handler, [], {}, is_async=True, soft_time_limit=10, time_limit=20, pool=pool))
    await running.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cleaned_up.is_set()


async def test_without_limits_handlers_just_run(pool: HandlerThreads) -> None:
    async def double(x: int) -> int:
        return 2 * x

    assert await run_handler(double, [4], {}, is_async=True, soft_time_limit=None, time_limit=None, pool=pool) == 8
    assert await run_handler(sorted, [[3, 1, 2]], {"reverse": True}, is_async=False, soft_time_limit=None,
                             time_limit=None, pool=pool) == [3, 2, 1]


async def test_limits_must_be_positive(pool: HandlerThreads) -> None:
    with pytest.raises(ValueError, match="time_limit must be positive"):
        await run_handler(sorted, [[]], {}, is_async=False, soft_time_limit=None, time_limit=0, pool=pool)


async def test_process_isolation_is_for_sync_handlers(pool: HandlerThreads) -> None:
    async def handler() -> None:
        pass

    with pytest.raises(ValueError, match="sync handlers only"):
        await run_handler(handler, [], {}, is_async=True, soft_time_limit=None, time_limit=1, pool=pool,
                          isolation="process", target=(TARGETS, "add"))


# -- sync handlers in a thread -------------------------------------------------------------------

def busy(seconds: float) -> str:
    """Python bytecode all along: an asynchronous exception is raised at once."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return "done"


async def test_sync_soft_limit_is_raised_inside_the_handlers_thread(pool: HandlerThreads) -> None:
    seen: list[str] = []

    def handler() -> None:
        try:
            busy(30)
        except SoftTimeLimitExceeded:
            seen.append(threading.current_thread().name)
            raise

    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        await run_handler(handler, [], {}, is_async=False, soft_time_limit=0.1, time_limit=None, pool=pool)
    assert time.monotonic() - started < 5
    assert len(seen) == 1
    assert seen[0].startswith("test-limits")


async def test_the_soft_limits_exception_never_lands_in_the_pool_after_the_handler() -> None:
    # One thread, so that a stray exception could only land in the pool's own loop or the next call.
    pool = HandlerThreads(1)
    try:
        outcomes = {"returned": 0, "soft": 0}
        # A soft limit reaches a busy thread about a GIL switch interval (5 ms) late: runtimes from 0 to
        # 30 ms around a 10 ms limit end on either side of it, and some right at its edge.
        for i in range(200):
            try:
                # The hard limit only makes a pool whose thread a stray exception killed fail fast
                await run_handler(busy, [i % 16 * 0.002], {}, is_async=False, soft_time_limit=0.01, time_limit=10,
                                  pool=pool)
                outcomes["returned"] += 1
            except SoftTimeLimitExceeded:
                outcomes["soft"] += 1
        # The race was run from both sides: some handlers beat the limit, some did not
        assert outcomes["returned"] > 0
        assert outcomes["soft"] > 0
        for _ in range(20):
            assert pool.submit(busy, 0.01).result(timeout=10) == "done"
    finally:
        pool.shutdown(wait=True)


async def test_sync_hard_limit_returns_at_once_while_the_thread_runs_on(pool: HandlerThreads) -> None:
    stop = threading.Event()
    running = threading.Event()
    finished = threading.Event()
    before = abandoned_threads()

    def handler() -> None:
        running.set()
        while not stop.wait(0.01):
            pass
        finished.set()

    started = time.monotonic()
    try:
        with pytest.raises(TimeLimitExceeded):
            await run_handler(handler, [], {}, is_async=False, soft_time_limit=None, time_limit=0.2, pool=pool)
        assert time.monotonic() - started < 1.0
        assert running.is_set()
        assert not finished.is_set()
        assert abandoned_threads() == before + 1
    finally:
        stop.set()
    await until(lambda: abandoned_threads() == before)
    assert finished.is_set()


async def test_cancelling_run_handler_raises_attempt_cancelled_in_a_sync_handlers_thread(
        pool: HandlerThreads) -> None:
    running = threading.Event()
    seen: list[tuple[str, bool]] = []
    abandons: list[str] = []
    before = abandoned_threads()

    def handler() -> None:
        running.set()
        try:
            busy(30)
        except AttemptCancelled:
            seen.append((threading.current_thread().name, cancelled()))
            raise

    call = asyncio.ensure_future(run_handler(handler, [], {}, is_async=False, soft_time_limit=None, time_limit=None,
                                             pool=pool, grace=10, on_abandon=abandons.append))
    await until(running.is_set)
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert time.monotonic() - started < 5  # it stopped well within its grace, at a bytecode boundary
    assert len(seen) == 1
    assert seen[0][0].startswith("test-limits")
    assert seen[0][1]  # cancelled() agrees
    assert (abandons, abandoned_threads(), pool.abandoned) == ([], before, 0)  # it returned: nothing abandoned


async def test_a_sync_handler_that_swallows_the_cancellation_sees_it_with_cancelled(pool: HandlerThreads) -> None:
    running = threading.Event()
    swallowed: list[str] = []

    def handler() -> str:
        assert not cancelled()
        running.set()
        while not cancelled():
            try:
                busy(0.01)
            except Exception as e:  # a broad except, as real loops have: it swallows AttemptCancelled
                swallowed.append(type(e).__name__)
        return "stopped"

    call = asyncio.ensure_future(run_handler(handler, [], {}, is_async=False, soft_time_limit=None, time_limit=None,
                                             pool=pool, grace=10))
    await until(running.is_set)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert swallowed == ["AttemptCancelled"]
    assert pool.abandoned == 0
    assert not cancelled()  # outside a handler


async def test_a_sync_handler_that_ignores_its_cancellation_is_abandoned_after_its_grace(
        pool: HandlerThreads) -> None:
    stop = threading.Event()
    running = threading.Event()
    abandons: list[str] = []
    before = abandoned_threads()

    def handler() -> None:
        running.set()
        stop.wait(30)  # in C: the exception waits for it to return

    call = asyncio.ensure_future(run_handler(handler, [], {}, is_async=False, soft_time_limit=None, time_limit=None,
                                             pool=pool, grace=0.2, on_abandon=abandons.append))
    try:
        await until(running.is_set)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert abandons == ["cancellation"]
        assert (abandoned_threads(), pool.abandoned) == (before + 1, 1)
        # Its thread was replaced: two handlers still run at once
        both = threading.Barrier(3)
        runs = [asyncio.ensure_future(run_handler(both.wait, [10], {}, is_async=False, soft_time_limit=None,
                                                  time_limit=None, pool=pool)) for _ in range(2)]
        await asyncio.to_thread(both.wait, 10)
        await asyncio.gather(*runs)
    finally:
        stop.set()
    await until(lambda: abandoned_threads() == before and pool.abandoned == 0)


async def test_the_hard_limit_abandons_the_thread_and_tells_the_handler_through_cancelled(
        pool: HandlerThreads) -> None:
    noticed = threading.Event()
    abandons: list[str] = []

    def handler() -> None:
        while not cancelled():
            time.sleep(0.01)  # the hard limit raises nothing: only cancelled() tells
        noticed.set()

    with pytest.raises(TimeLimitExceeded):
        await run_handler(handler, [], {}, is_async=False, soft_time_limit=None, time_limit=0.2, pool=pool,
                          on_abandon=abandons.append)
    assert abandons == ["hard time limit"]
    await until(noticed.is_set)
    await until(lambda: pool.abandoned == 0)


async def test_the_cancellations_exception_never_lands_in_the_pool_after_the_handler() -> None:
    # As for the soft limit: cancellations from just before to just after the handler's end.
    pool = HandlerThreads(1)
    before = abandoned_threads()
    try:
        outcomes = {"returned": 0, "cancelled": 0}
        for i in range(200):
            call = asyncio.ensure_future(run_handler(busy, [i % 16 * 0.002], {}, is_async=False,
                                                     soft_time_limit=None, time_limit=10 if i % 2 else None,
                                                     pool=pool))
            await asyncio.sleep(0.01)
            call.cancel()
            try:
                await call
                outcomes["returned"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
        assert outcomes["returned"] > 0
        assert outcomes["cancelled"] > 0
        assert (abandoned_threads(), pool.abandoned) == (before, 0)
        for _ in range(20):
            assert pool.submit(busy, 0.01).result(timeout=10) == "done"
    finally:
        pool.shutdown(wait=True)


# -- sync handlers in a child process ------------------------------------------------------------

async def in_process(attribute: str, args: list[Any], *, soft: float | None = None, hard: float | None = None,
                     pool: HandlerThreads) -> Any:
    return await run_handler(pytest.fail, args, {}, is_async=False, soft_time_limit=soft, time_limit=hard, pool=pool,
                             isolation="process", target=(TARGETS, attribute))


async def test_process_returns_the_result(pool: HandlerThreads) -> None:
    assert await in_process("add", [2, 3], pool=pool) == 5
    assert await in_process("nested.holder", [4, 5], hard=30, pool=pool) == 9


async def test_the_child_calls_the_handler_with_its_arguments_validated(pool: HandlerThreads) -> None:
    # As a handler in a thread is called by the worker: "2" for an ``int`` parameter arrives as 2.
    assert await in_process("add", ["2", 3], pool=pool) == 5


async def test_process_reports_the_handlers_exception(pool: HandlerThreads) -> None:
    with pytest.raises(HandlerError) as raised:
        await in_process("fail", [7], pool=pool)
    error = raised.value
    assert (error.error_type, error.message) == ("ValueError", "bad 7")
    assert str(error) == "ValueError: bad 7"
    assert "limits_targets.py" in error.traceback
    assert 'raise ValueError(f"bad {n}")' in error.traceback
    assert any(error.traceback.rstrip() in note for note in error.__notes__)


async def test_process_hard_limit_kills_the_child(pool: HandlerThreads, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        await in_process("sleep_forever", [str(pid_file)], hard=3, pool=pool)
    assert time.monotonic() - started < 3 + 2
    pid = int(pid_file.read_text())
    await until(lambda: not pid_exists(pid))


async def test_a_child_that_exits_by_itself_is_a_lost_worker(pool: HandlerThreads) -> None:
    with pytest.raises(HandlerError, match="exited with code 3") as raised:
        await in_process("exit_abruptly", [3], hard=30, pool=pool)
    assert raised.value.error_type == "WorkerLost"


async def test_process_soft_limit_is_raised_in_the_child(pool: HandlerThreads) -> None:
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded) as raised:
        await in_process("sleep_forever", [os.devnull], soft=0.5, hard=30, pool=pool)
    assert time.monotonic() - started < 10
    assert any("time.sleep(60)" in note for note in raised.value.__notes__)
    assert await in_process("sleep_then_clean_up", [60], soft=0.5, hard=30, pool=pool) == "cleaned up"


async def test_cancelling_run_handler_kills_the_child(pool: HandlerThreads, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    call = asyncio.ensure_future(in_process("sleep_forever", [str(pid_file)], pool=pool))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    pid = int(pid_file.read_text())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await until(lambda: not pid_exists(pid))


async def test_arguments_that_are_not_json_are_refused_before_a_child_starts(pool: HandlerThreads) -> None:
    with pytest.raises(SerializationError):
        await in_process("add", [object(), 1], pool=pool)
