"""The pool of sync handler threads: abandoned threads are replaced, up to its spares, and never block an exit."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

import pytest

from broker_q.threads import HandlerThreads, ThreadCall, abandoned_threads


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{prefix}_")]


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    ready = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        ready.wait(0.01)
    raise AssertionError("the condition never came true")


class Stuck:
    """Handlers that block until released, each of them a call the pool can give up on."""

    def __init__(self, pool: HandlerThreads, name: str) -> None:
        self.pool = pool
        self.name = name
        self.release = threading.Event()
        self.running = threading.Semaphore(0)

    def start(self) -> tuple[ThreadCall, Future[Any]]:
        call = ThreadCall(self._block, [], {})
        future = self.pool.submit(call)
        assert self.running.acquire(timeout=10), "the stuck handler never started"
        return call, future

    def _block(self) -> str:
        self.running.release()
        self.release.wait(30)
        return "released"


@pytest.fixture
def stuck() -> Iterator[Stuck]:
    name = f"test-threads-{uuid.uuid4().hex[:6]}"  # threads of this test's pool alone
    handlers = Stuck(HandlerThreads(1, spare=1, name=name), name)
    yield handlers
    handlers.release.set()
    handlers.pool.shutdown(wait=True)


def test_an_abandoned_thread_is_replaced_up_to_the_spares_and_ends_when_its_handler_returns(stuck: Stuck) -> None:
    pool, before = stuck.pool, abandoned_threads()
    first, _ = stuck.start()
    assert pool.give_up(first)
    assert (pool.abandoned, pool.exhausted, abandoned_threads()) == (1, False, before + 1)
    assert pool.submit(sum, [1, 2]).result(timeout=10) == 3  # the replacement runs it
    second, _ = stuck.start()
    assert pool.give_up(second)
    assert (pool.abandoned, pool.exhausted) == (2, True)  # one spare: the second is not replaced
    assert len(threads_named(stuck.name)) == 2  # the size and one spare, never more
    late = pool.submit(sum, [3, 4])
    assert not late.done()
    stuck.release.set()
    assert late.result(timeout=10) == 7
    wait_until(lambda: pool.abandoned == 0 and abandoned_threads() == before)
    wait_until(lambda: len(threads_named(stuck.name)) == 1)  # back to its size
    assert not pool.exhausted


def test_a_call_given_up_on_before_it_starts_never_runs(stuck: Stuck) -> None:
    pool = stuck.pool
    stuck.start()  # holds the only thread
    ran: list[int] = []
    waiting = ThreadCall(ran.append, [1], {})
    future = pool.submit(waiting)
    assert not pool.give_up(waiting)  # not running: no thread is abandoned
    assert pool.abandoned == 0
    stuck.release.set()
    assert future.result(timeout=10) is None
    assert ran == []


def test_given_up_on_after_it_returned_abandons_nothing(stuck: Stuck) -> None:
    call = ThreadCall(sum, [[1, 2]], {})
    assert stuck.pool.submit(call).result(timeout=10) == 3
    assert not stuck.pool.give_up(call)
    assert stuck.pool.abandoned == 0


def test_shutdown_cancels_waiting_calls_refuses_new_ones_and_leaves_daemon_threads(stuck: Stuck) -> None:
    pool = stuck.pool
    stuck.start()
    waiting = pool.submit(sum, [1, 2])
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(CancelledError):
        waiting.result(timeout=10)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(sum, [1])
    assert all(t.daemon for t in threads_named(stuck.name))  # a stuck one cannot hold the process


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="size"):
        HandlerThreads(0)
    with pytest.raises(ValueError, match="spare"):
        HandlerThreads(1, spare=-1)
