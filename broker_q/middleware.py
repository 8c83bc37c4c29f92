"""Middleware: hooks that plugins run around every attempt a worker makes.

Register instances with :meth:`broker_q.App.add_middleware`; they run in registration order before
the handler and in reverse order after it (like nested context managers). Each hook may be a plain
method or a coroutine. A hook that raises does not stop the worker: the attempt fails with a
:class:`MiddlewareError` that names the middleware, and the task's retry policy decides as for any
failure. An ``after_attempt`` that raises turns the outcome it was shown into that failure.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass
from typing import Any

from broker_q.domain.events import TaskEvent
from broker_q.errors import BrokerQError

__all__ = ["Attempt", "Middleware", "MiddlewareError", "run_hook"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a hook is told about the attempt."""

    task_id: uuid.UUID
    task: str
    queue: str
    tenant: str
    attempt: int
    worker: str
    args: list[Any]
    kwargs: dict[str, Any]


class Middleware:
    """Override the hooks you need; the defaults do nothing."""

    def before_attempt(self, attempt: Attempt) -> Any:
        """Called after ``started`` is recorded, just before the handler runs."""

    def after_attempt(self, attempt: Attempt, outcome: TaskEvent) -> Any:
        """Called with the attempt's outcome (``succeeded``, ``retry_scheduled`` or ``dead_lettered``),
        before it is recorded."""


class MiddlewareError(BrokerQError):
    """A middleware hook raised; the attempt failed because of it."""


async def run_hook(middleware: Middleware, hook: str, *args: Any) -> None:
    """Call ``middleware.<hook>(*args)``, awaiting it if it is a coroutine; wrap what it raises."""
    try:
        result = getattr(middleware, hook)(*args)
        if inspect.isawaitable(result):
            await result
    except Exception as e:
        name = type(middleware).__name__
        raise MiddlewareError(f"middleware {name}.{hook} raised {type(e).__name__}: {e}") from e
