"""Sync handlers in threads: telling one to stop, giving up on one, and the pool they run in.

A thread cannot be killed. What can be done to a sync handler running in one:

- raise an exception in its thread, at its next bytecode boundary (:meth:`ThreadCall.interrupt`): the
  soft time limit and cancellation tell a handler to stop this way;
- let it ask whether the worker has given up on it (:func:`cancelled`), which it sees wherever it is
  and whatever it catches;
- give up on it (:meth:`HandlerThreads.give_up`): its outcome is discarded, and a handler still running
  keeps its thread, which is then *abandoned* until the handler returns.

:class:`HandlerThreads` replaces each abandoned thread, up to ``spare`` of them, so that handlers that
never return do not take the pool's capacity with them. Past that it is *exhausted*; the worker then
stops, for its supervisor to start it again with fresh threads (``docs/time-limits.md``).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from broker_q.errors import BrokerQError

__all__ = ["HandlerThreads", "ThreadCall", "ThreadsExhausted", "abandoned_threads", "cancelled"]

P = ParamSpec("P")
T = TypeVar("T")

_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_NO_EXCEPTION = ctypes.py_object()  # NULL: clears a pending asynchronous exception

# Threads are the process's, not a worker's: so is their count.
_abandoned_lock = threading.Lock()
_abandoned_count = 0

_current = threading.local()
"""``call``: the :class:`ThreadCall` whose handler runs in this thread now, if any."""


class ThreadsExhausted(BrokerQError):
    """More sync handlers ran on past their hard time limit or cancellation than their pool replaces.

    Raised by :meth:`broker_q.worker.Worker.run` after it stopped because of it: a restart of the
    worker's process is the only way to get its threads back.
    """


def cancelled() -> bool:
    """Whether the worker has given up on the sync handler that calls this.

    True once the handler's attempt was cancelled (its task was cancelled, or the worker is stopping
    and its shutdown grace ran out) or ran past its hard time limit: whatever the handler does from
    then on is discarded, so a long loop should check it and return. It costs a thread-local lookup.

    False outside a sync handler run in a worker's thread: in an ``async def`` handler (which is told
    by ``asyncio.CancelledError``), in a handler with ``isolation="process"`` (which is killed), and
    outside any handler.
    """
    call: ThreadCall | None = getattr(_current, "call", None)
    return call is not None and call.stopped


def abandoned_threads() -> int:
    """How many sync handlers, in this process, run on in threads whose calls were given up on.

    A thread is abandoned when its call is given up on while the handler runs (at the hard limit, or
    when the attempt is cancelled and the handler has not returned within its grace), and counted
    until its handler returns.
    """
    return _abandoned_count


def _count_abandoned(change: int) -> None:
    global _abandoned_count
    with _abandoned_lock:
        _abandoned_count += change


class ThreadCall:
    """One sync handler call in a pool thread, and the only ways to interrupt it or give up on it.

    An exception is raised in the thread asynchronously, at its next bytecode boundary, wherever it
    is. So that it can only land inside this call, the lock orders :meth:`interrupt` against the
    call's start and finish: at most one exception is sent, only while the call runs, and a pending
    one is cleared when the call finishes. The first interruption wins: a handler told to stop by its
    soft limit is not sent the cancellation too (:func:`cancelled` still tells it).
    """

    def __init__(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> None:
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._thread_id = 0  # set while the handler runs
        self._finished = False
        self._early: type[BaseException] | None = None  # an interruption before the handler started
        self._sent: type[BaseException] | None = None
        self._given_up = False
        self._counted = False
        self.stopped = False
        """Told to stop for good (cancelled, or given up on): what :func:`cancelled` answers."""

    def __call__(self) -> Any:
        try:
            with self._lock:
                if self._given_up:
                    return None  # given up on before a thread was free; the outcome is discarded
                if self._early is not None:
                    raise self._early()
                self._thread_id = threading.get_ident()
                _current.call = self
            return self._fn(*self._args, **self._kwargs)
        finally:
            try:
                self._finish()
            except BaseException as e:
                if self._sent is None or not isinstance(e, self._sent):
                    raise
                # It arrived after the handler, before _finish cleared it. It is sent once, so
                # _finish cannot be interrupted again; the handler was told before the call ended.
                self._finish()
                raise

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            _current.call = None
            if self._sent is not None:
                _set_async_exc(self._thread_id, _NO_EXCEPTION)
            if self._counted:
                self._counted = False
                _count_abandoned(-1)

    def interrupt(self, error: type[BaseException]) -> bool:
        """Raise ``error`` in the handler, or as it starts if it has not; True if it was sent to it running.

        Nothing is sent if an exception was already sent or armed, or once the handler finished.
        """
        with self._lock:
            return self._interrupt(error)

    def _interrupt(self, error: type[BaseException]) -> bool:
        if self._early is not None or self._sent is not None or self._finished:
            return False
        if not self._thread_id:
            self._early = error
            return False
        self._sent = error
        _set_async_exc(self._thread_id, error)
        return True

    def cancel(self, error: type[BaseException]) -> bool:
        """Tell the handler its attempt is over: :func:`cancelled` turns true and ``error`` is raised in it.

        Returns whether the handler is running (it may still clean up and return).
        """
        with self._lock:
            self.stopped = True
            self._interrupt(error)
            return bool(self._thread_id) and not self._finished

    def give_up(self) -> bool:
        """Stop caring: the outcome is discarded, :func:`cancelled` turns true, and a call not started never starts.

        True when the handler is running: its thread is abandoned, and counted by
        :func:`abandoned_threads` until the handler returns.
        """
        with self._lock:
            self.stopped = True
            self._given_up = True
            if self._thread_id and not self._finished and not self._counted:
                self._counted = True
                _count_abandoned(1)
                return True
            return False


class HandlerThreads(Executor):
    """Threads for sync handlers: up to ``size`` calls run at once, whatever the abandoned threads do.

    A thread whose :class:`ThreadCall` was given up on while it ran (:meth:`give_up`) is abandoned:
    it no longer counts, and a new thread takes its place, up to ``spare`` threads beyond ``size``.
    When its handler returns, an abandoned thread ends, or serves again if no other thread replaced
    it. Past ``spare`` abandoned threads, the pool is :attr:`exhausted`: fewer than ``size`` calls can
    run until abandoned handlers return.

    Threads start as calls need them, and are daemon threads: a handler that never returns does not
    keep the process from exiting.
    """

    def __init__(self, size: int, *, spare: int = 0, name: str = "broker_q-handler") -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        if spare < 0:
            raise ValueError(f"spare must not be negative, not {spare}")
        self.size = size
        self.spare = spare
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...],
                                            dict[str, Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._started = 0
        self._calls = 0
        """Calls submitted and not over, except the abandoned ones: each needs a thread."""
        self._stuck: set[ThreadCall] = set()
        """Calls given up on while their handler runs: their threads are abandoned."""
        self._shut = False

    @property
    def abandoned(self) -> int:
        """This pool's threads whose handlers run on after their calls were given up on."""
        return len(self._stuck)

    @property
    def exhausted(self) -> bool:
        """More threads are abandoned than ``spare``: fewer than ``size`` calls can run at once."""
        return len(self._stuck) > self.spare

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._calls += 1
            self._work.put((future, fn, args, kwargs))
            self._grow()
        return future

    def give_up(self, call: ThreadCall) -> bool:
        """Give up on ``call``, submitted to this pool (:meth:`ThreadCall.give_up`); True if its thread is abandoned.

        An abandoned thread is replaced at once, unless ``spare`` threads replace others already.
        """
        with self._lock:
            if not call.give_up():
                return False
            self._stuck.add(call)
            self._calls -= 1
            self._grow()
            return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; idle threads end, busy ones once their call returns.

        ``wait`` waits for every thread, abandoned ones included: a handler that never returns makes
        it wait forever.
        """
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        work = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None and work[0].cancel():
                        self._calls -= 1
            for _ in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _target(self) -> int:
        return self.size + min(len(self._stuck), self.spare)

    def _grow(self) -> None:
        """Start threads for the calls that need one, up to the pool's size plus its replacements."""
        while len(self._threads) < min(self._calls + len(self._stuck), self._target()):
            self._started += 1
            thread = threading.Thread(target=self._serve, name=f"{self._name}_{self._started}", daemon=True)
            self._threads.add(thread)
            thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            work = self._work.get()
            if work is None:
                with self._lock:
                    self._threads.discard(me)
                return
            future, fn, args, kwargs = work
            del work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:
                    future.set_exception(e)
                    del e
                else:
                    future.set_result(result)
                    del result
            del future, args, kwargs
            with self._lock:
                if isinstance(fn, ThreadCall) and fn in self._stuck:
                    self._stuck.discard(fn)
                else:
                    self._calls -= 1
                if len(self._threads) > self._target():
                    self._threads.discard(me)  # its replacement serves in its place
                    return
            del fn
