"""Run one task handler under a soft and a hard time limit.

:func:`run_handler` is the one entry point; ``docs/time-limits.md`` says what each limit guarantees
for each kind of handler and what it does not. In short:

- the **soft limit** asks the handler to stop: an async handler is cancelled, a sync handler gets
  :class:`SoftTimeLimitExceeded` raised inside it. A handler that ends because of it makes
  ``run_handler`` raise :class:`SoftTimeLimitExceeded`; one that catches it and returns has
  returned.
- the **hard limit** stops waiting: ``run_handler`` raises :class:`TimeLimitExceeded`. Only a handler
  run with ``isolation="process"`` is sure to be stopped (its process is killed); an async handler is
  cancelled once more and left behind after a short grace; a sync handler's thread runs on, its
  outcome discarded, and is counted by :func:`abandoned_threads` (``broker_q.threads`` replaces it).
- **cancelling** the call cancels an async handler, kills a child process, and raises
  :class:`AttemptCancelled` in a sync handler's thread (which :func:`broker_q.cancelled` also tells).

Both limits are measured from the call to ``run_handler``, except a soft limit with
``isolation="process"``, which the child process measures from the moment it calls the handler.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Literal

from broker_q.arguments import Parameters
from broker_q.errors import BrokerQError, SerializationError
from broker_q.threads import HandlerThreads, ThreadCall, abandoned_threads

__all__ = [
    "AttemptCancelled",
    "HandlerError",
    "Isolation",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "abandoned_threads",
    "run_handler",
]

Isolation = Literal["thread", "process"]


class SoftTimeLimitExceeded(BrokerQError):
    """The soft time limit passed.

    Raised inside a sync handler (in its thread, or in its process) so that it may clean up, and by
    :func:`run_handler` when a handler ended because of its soft limit.
    """

    def __init__(self, message: str = "the soft time limit passed") -> None:
        super().__init__(message)


class TimeLimitExceeded(BrokerQError):
    """The hard time limit passed before the handler finished: the attempt timed out."""


class AttemptCancelled(BrokerQError):
    """The attempt was cancelled while the handler ran: its task was cancelled, or its worker is stopping.

    Raised inside a sync handler's thread so that it stops, and may clean up; whatever it returns or
    raises then is discarded. An async handler gets ``asyncio.CancelledError`` instead, and a handler
    with ``isolation="process"`` is killed.
    """

    def __init__(self, message: str = "the attempt was cancelled") -> None:
        super().__init__(message)


class HandlerError(BrokerQError):
    """A handler run with ``isolation="process"`` raised, or its process died without a reply.

    ``error_type`` is the name of the exception's class in the child (``"WorkerLost"`` when the
    process died), ``message`` its message and ``traceback`` the child's formatted traceback.
    """

    def __init__(self, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.traceback = traceback
        if traceback:
            self.add_note(f"In the handler's process:\n{traceback.rstrip()}")


async def run_handler(
    fn: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    *,
    is_async: bool,
    soft_time_limit: float | None,
    time_limit: float | None,
    pool: HandlerThreads,
    isolation: Isolation = "thread",
    target: tuple[str, str] | None = None,
    grace: float = 1.0,
    on_abandon: Callable[[str], None] | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` under the given limits (seconds; None for none) and return its result.

    Async handlers run in the event loop; sync handlers in a thread of ``pool``, or, with
    ``isolation="process"``, in a fresh child process that imports ``target`` = (module, dotted
    attribute path) of the function, or of an object whose ``fn`` is the function; ``fn`` itself is
    not used then. Arguments and result cross to and from the child as JSON; the child validates the
    arguments against the function's type hints (:mod:`broker_q.arguments`) and calls it with the values.

    ``grace`` bounds how long a handler cancelled at the hard limit, or whose caller was cancelled, is
    waited for (async, or sync in a thread), and how long a child that replied is given to exit before
    it is killed.

    ``on_abandon`` is called, in the event loop, when a sync handler's thread is abandoned: the call
    was given up on while the handler still ran, at the ``"hard time limit"`` or at the
    ``"cancellation"`` (after its grace). The handler runs on; ``pool`` replaces its thread.

    Raises :class:`SoftTimeLimitExceeded`, :class:`TimeLimitExceeded`, :class:`HandlerError`
    (process isolation), or whatever the handler raised. Cancelling the call cancels an async handler,
    kills a child process, and raises :class:`AttemptCancelled` in a sync handler's thread (which is
    abandoned if the handler has not returned within ``grace``), then propagates the cancellation.
    """
    for name, limit in (("soft_time_limit", soft_time_limit), ("time_limit", time_limit)):
        if limit is not None and limit <= 0:
            raise ValueError(f"{name} must be positive, not {limit}")
    if soft_time_limit is not None and time_limit is not None and soft_time_limit >= time_limit:
        soft_time_limit = None  # the hard limit comes first: a soft limit would never be seen
    if isolation == "process":
        if is_async:
            raise ValueError("isolation='process' runs sync handlers only")
        if target is None:
            raise ValueError("isolation='process' needs the handler's target (module, attribute path)")
        return await _run_in_process(target, args, kwargs, soft_time_limit, time_limit, grace)
    if isolation != "thread":
        raise ValueError(f"isolation must be 'thread' or 'process', not {isolation!r}")
    if is_async:
        if soft_time_limit is None and time_limit is None:
            return await fn(*args, **kwargs)
        return await _run_async(fn(*args, **kwargs), soft_time_limit, time_limit, grace)
    return await _run_in_thread(ThreadCall(fn, args, kwargs), soft_time_limit, time_limit, pool, grace, on_abandon)


async def _supervise(work: asyncio.Future[Any], soft: float | None, hard: float | None,
                     on_soft: Callable[[], object]) -> bool:
    """Wait for ``work``, calling ``on_soft`` at the soft limit; False if the hard limit passed first."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    if soft is not None:
        done, _ = await asyncio.wait({work}, timeout=soft)
        if not done:
            on_soft()
    remaining = None if hard is None else max(0.0, start + hard - loop.time())
    done, _ = await asyncio.wait({work}, timeout=remaining)
    return bool(done)


def _hard_limit_passed(limit: float | None) -> TimeLimitExceeded:
    return TimeLimitExceeded(f"the handler ran past its hard time limit of {limit} s")


# -- async handlers -------------------------------------------------------------------------------

async def _run_async(coroutine: Any, soft: float | None, hard: float | None, grace: float) -> Any:
    task: asyncio.Future[Any] = asyncio.ensure_future(coroutine)
    soft_cancelled = False

    def cancel_softly() -> None:
        nonlocal soft_cancelled
        soft_cancelled = True
        task.cancel()

    try:
        finished = await _supervise(task, soft, hard, cancel_softly)
    except asyncio.CancelledError:
        await _give_up(task, grace)
        raise
    if not finished:
        await _give_up(task, grace)
        raise _hard_limit_passed(hard)
    try:
        return task.result()
    except asyncio.CancelledError as e:
        if soft_cancelled:
            raise SoftTimeLimitExceeded() from e
        raise


async def _give_up(task: asyncio.Future[Any], grace: float) -> None:
    """Cancel the handler and give its cleanup ``grace`` seconds; a handler that ignores it is left behind."""
    task.cancel()
    # Nobody will read the outcome: retrieving it spares asyncio's "exception was never retrieved"
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.wait({task}, timeout=grace)


# -- sync handlers in a thread --------------------------------------------------------------------

async def _run_in_thread(call: ThreadCall, soft: float | None, hard: float | None, pool: HandlerThreads,
                         grace: float, on_abandon: Callable[[str], None] | None) -> Any:
    running = pool.submit(call)
    work = asyncio.wrap_future(running)
    try:
        if soft is None and hard is None:
            return await work  # the cheapest wait, for the common case
        finished = await _supervise(work, soft, hard, lambda: call.interrupt(SoftTimeLimitExceeded))
    except asyncio.CancelledError:
        try:
            if call.cancel(AttemptCancelled):
                # Time to clean up, as an async handler has. ``work`` may have been cancelled with
                # this task: wait for the call itself.
                waiting = asyncio.wrap_future(running)
                try:
                    await asyncio.wait({waiting}, timeout=grace)
                finally:
                    _drop(waiting)
        finally:
            _drop(work)
            _give_up_thread(call, pool, "cancellation", on_abandon)
        raise
    if not finished:
        _drop(work)
        _give_up_thread(call, pool, "hard time limit", on_abandon)
        raise _hard_limit_passed(hard)
    return work.result()


def _drop(work: asyncio.Future[Any]) -> None:
    """Let go of the outcome of a call nobody will read."""
    if not work.done():
        work.cancel()  # and so its outcome is dropped, even once the loop is closed
    elif not work.cancelled():
        work.exception()  # read: asyncio would report an exception nobody retrieved


def _give_up_thread(call: ThreadCall, pool: HandlerThreads, reason: str,
                    on_abandon: Callable[[str], None] | None) -> None:
    if pool.give_up(call) and on_abandon is not None:
        on_abandon(reason)


# -- sync handlers in a child process -------------------------------------------------------------

def _context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    # forkserver: a fresh child forked from a clean server process, without the worker's threads,
    # event loop or signal handlers; spawn where there is no forkserver.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


async def _run_in_process(target: tuple[str, str], args: list[Any], kwargs: dict[str, Any],
                          soft: float | None, hard: float | None, grace: float) -> Any:
    loop = asyncio.get_running_loop()
    deadline = None if hard is None else loop.time() + hard
    try:
        call = json.dumps({"args": args, "kwargs": kwargs}).encode()
    except (TypeError, ValueError) as e:
        raise SerializationError(f"the arguments cannot be sent to the handler's process: {e}") from e
    context = _context()
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(writer, *target, call, soft),
                               name="broker_q-handler", daemon=True)
    # Starting talks to the fork server (and starts it, the first time): not in the event loop.
    starting = loop.run_in_executor(None, child.start)
    reply: bytes | None = None
    try:
        await asyncio.shield(starting)
        writer.close()  # the child's copy is the last: its exit ends the pipe
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        reply = await _receive(reader, child.sentinel, timeout)
    finally:
        # A second cancellation must not leave the child running: the cleanup runs on regardless.
        stopping = asyncio.ensure_future(_stop(child, starting, reader, writer, reply, grace))
        await asyncio.shield(stopping)
    if reply is None:
        raise _hard_limit_passed(hard)
    return _outcome(reply, stopping.result())


async def _receive(reader: Connection, sentinel: int, timeout: float | None) -> bytes | None:
    """All the child wrote, once its end of the pipe closed or it exited; None after ``timeout``."""
    loop = asyncio.get_running_loop()
    fd = reader.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    ended = loop.create_future()

    def drain(at_exit: bool) -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except BlockingIOError:
            if not at_exit:
                return  # more to come
        if not ended.done():
            ended.set_result(None)

    # The exit counts too: a process the handler forked may hold a copy of the pipe open.
    loop.add_reader(fd, drain, False)
    loop.add_reader(sentinel, drain, True)
    try:
        done, _ = await asyncio.wait({ended}, timeout=timeout)
    finally:
        loop.remove_reader(fd)
        loop.remove_reader(sentinel)
    return b"".join(chunks) if done else None


async def _stop(child: BaseProcess, starting: asyncio.Future[None], reader: Connection, writer: Connection,
                reply: bytes | None, grace: float) -> int | None:
    """Make sure the child is gone and reaped, close the pipe, and return the child's exit code."""
    try:
        await asyncio.wait({starting})
        writer.close()
        if starting.exception() is not None:
            return None
        # A child that replied is let exit (and flush its output); any other is killed at once.
        exited = await _exited(child, grace if reply else 0)
        if not exited:
            child.kill()  # SIGKILL: nothing the handler does can delay it
            exited = await _exited(child, grace)
        if not exited:
            _reap_later(child)  # stuck in the kernel; the loop joins it when it is gone
            return None
        exitcode = child.exitcode
        child.join()
        child.close()
        return exitcode
    finally:
        reader.close()


async def _exited(child: BaseProcess, timeout: float) -> bool:
    if child.exitcode is not None:
        return True
    if timeout <= 0:
        return False
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(child.sentinel, exited)
    try:
        await asyncio.wait({gone}, timeout=timeout)
    finally:
        loop.remove_reader(child.sentinel)
    return child.exitcode is not None


def _reap_later(child: BaseProcess) -> None:
    loop = asyncio.get_running_loop()
    sentinel = child.sentinel

    def reap() -> None:
        loop.remove_reader(sentinel)
        child.join()
        child.close()

    loop.add_reader(sentinel, reap)


def _outcome(reply: bytes, exitcode: int | None) -> Any:
    try:
        message = json.loads(reply)
    except ValueError:
        raise HandlerError("WorkerLost", f"the handler's process exited with code {exitcode}") from None
    if "error" not in message:
        return message["result"]
    error = message["error"]
    if error["soft"]:
        soft = SoftTimeLimitExceeded()
        soft.add_note(f"In the handler's process:\n{error['traceback'].rstrip()}")
        raise soft
    raise HandlerError(error["type"], error["message"], error["traceback"])


def _child_main(writer: Connection, module: str, attribute: str, call: bytes, soft: float | None) -> None:
    """The child process: run the handler and write one JSON reply, ``{"result": ...}`` or ``{"error": ...}``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whoever sends SIGTERM means it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the worker, which decides
    try:
        try:
            fn = _resolve(module, attribute)
            arguments = json.loads(call)
            # Called with its arguments validated, as in a thread (the worker checked them already).
            args, kwargs = Parameters(fn, f"{module}:{attribute}").values(arguments["args"], arguments["kwargs"])
            if soft is not None:
                signal.signal(signal.SIGALRM, _raise_soft_limit)
                signal.setitimer(signal.ITIMER_REAL, soft)
            try:
                result = fn(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = json.dumps({"result": result})
        except BaseException as e:  # everything the handler can do, SystemExit included, is reported
            reply = json.dumps({"error": {
                "type": type(e).__name__,
                "message": str(e),
                "traceback": traceback.format_exc(),
                "soft": isinstance(e, SoftTimeLimitExceeded),
            }})
        with os.fdopen(writer.fileno(), "wb", closefd=False) as out:
            out.write(reply.encode())
    finally:
        writer.close()


def _raise_soft_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded()


def _resolve(module: str, attribute: str) -> Callable[..., Any]:
    found: Any = importlib.import_module(module)
    for name in attribute.split("."):
        found = getattr(found, name)
    fn = getattr(found, "fn", found)  # a TaskDefinition holds its function in .fn
    if not callable(fn):
        raise TypeError(f"{module}:{attribute} is not a function")
    return fn  # type: ignore[no-any-return]
