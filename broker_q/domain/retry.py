"""Retry policies: whether a failed attempt runs again, and when.

Pure: the caller passes the random draw, so a decision can be tested and explained. The delay of
retry ``n`` (the first retry is 1) is ``backoff * factor ** (n - 1)``, capped at ``backoff_max``;
with ``jitter`` it is drawn uniformly from ``[delay / 2, delay]`` ("equal jitter"), which spreads
the retries of tasks that failed together without ever retrying at once.

A task's policy (:class:`RetryPolicy`) names exceptions by their classes. A submit's changes to it
(:class:`RetryOverride`) travel with the task, recorded in its ``submitted`` event and carried in its
work messages, so they name exceptions by their qualified names instead, which any worker can match
without importing anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from broker_q.errors import DomainError

__all__ = ["Decision", "Retry", "RetryOverride", "RetryPolicy", "matches", "qualified_name"]

_QUALIFIED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.(?:[A-Za-z_]\w*|<locals>))+")
_MAX_DELAY = 86400.0 * 7
_MAX_FACTOR = 100.0
"""Above it, ``factor ** 64`` could overflow a float (the delay is capped long before)."""
_MAX_NAMES = 100


def qualified_name(cls: type[BaseException]) -> str:
    """How a :class:`RetryOverride` names an exception class: ``builtins.ValueError``, ``myapp.errors.Throttled``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def matches(error: BaseException, names: Collection[str]) -> bool:
    """Whether the class of ``error`` or one of its bases is named in ``names``: ``isinstance`` by name."""
    return any(qualified_name(cls) in names for cls in type(error).__mro__)


class Retry(Exception):
    """Raised by a handler to ask for another attempt, after ``delay`` seconds if given.

    It counts against the task's ``max_attempts`` like any failure: once they are spent the task
    is dead-lettered with this exception's message.
    """

    def __init__(self, message: str = "the handler asked to be retried", *, delay: float | None = None) -> None:
        if delay is not None and not 0 <= delay <= 86400 * 7:
            raise ValueError(f"a retry delay must be between 0 and a week, got {delay}")
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True, slots=True)
class Decision:
    """Retry after ``delay`` seconds, or (``delay`` None) dead-letter with ``why``."""

    delay: float | None
    why: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task's failed attempts are retried. The default retries nothing: retrying work that is
    not idempotent must be asked for, per task (``@app.task(max_attempts=5)``) or per submit."""

    max_attempts: int = 1
    """Attempts in all, the first included (1: never retried)."""
    backoff: float = 1.0
    """Seconds before the first retry."""
    factor: float = 2.0
    backoff_max: float = 600.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Exceptions that are retried (with their subclasses)."""
    dont_retry_on: tuple[type[BaseException], ...] = ()
    """Exceptions never retried, even when they are also in ``retry_on``."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 1000:
            raise DomainError(f"max_attempts must be between 1 and 1000, got {self.max_attempts}")
        if self.backoff < 0 or self.backoff_max < 0 or self.factor < 1:
            raise DomainError("backoff and backoff_max must not be negative, and factor must be at least 1")

    def delay(self, retry: int, draw: float) -> float:
        """Seconds before retry number ``retry`` (from 1); ``draw`` is uniform in [0, 1)."""
        delay = min(self.backoff * self.factor ** min(retry - 1, 64), self.backoff_max)
        return delay * (0.5 + draw / 2) if self.jitter else delay

    def decide(self, error: BaseException, *, tries: int, draw: float, max_attempts: int | None = None,
               override: RetryOverride | None = None) -> Decision:
        """What to do after attempt number ``tries`` (counted from the last replay) raised ``error``.

        ``override`` (a submit's) replaces each field of the policy that it gives; ``max_attempts``
        (a submit's too) replaces the attempts in all, and comes before the override's.
        """
        if override is None:
            override = RetryOverride()
        limit = max_attempts or override.max_attempts or self.max_attempts
        if tries >= limit:
            return Decision(None, f"attempt {tries} of {limit} failed")
        timing = replace(self, **{name: value for name in ("backoff", "factor", "backoff_max", "jitter")
                                  if (value := getattr(override, name)) is not None})
        if isinstance(error, Retry):
            return Decision(error.delay if error.delay is not None else timing.delay(tries, draw), "asked to retry")
        never = (matches(error, override.dont_retry_on) if override.dont_retry_on is not None
                 else isinstance(error, self.dont_retry_on))
        retried = (matches(error, override.retry_on) if override.retry_on is not None
                   else isinstance(error, self.retry_on))
        if never or not retried:
            return Decision(None, f"{type(error).__name__} is not retried")
        return Decision(timing.delay(tries, draw), f"attempt {tries} of {limit} failed")


@dataclass(frozen=True, slots=True)
class RetryOverride:
    """A submit's changes to its task's :class:`RetryPolicy`: each field given (not None) replaces the
    policy's own, the others are the policy's. ``RetryOverride.of(policy)`` gives every field.

    ``retry_on`` and ``dont_retry_on`` are qualified class names (:func:`qualified_name`), such as
    ``"builtins.ValueError"``: an error matches a name when its class or one of its bases has it, as
    with ``isinstance``. A name that no class has matches nothing; ``dont_retry_on`` still comes
    first. An empty tuple is given too: ``retry_on=()`` retries nothing but :class:`Retry`.
    """

    max_attempts: int | None = None
    backoff: float | None = None
    factor: float | None = None
    backoff_max: float | None = None
    jitter: bool | None = None
    retry_on: tuple[str, ...] | None = None
    dont_retry_on: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (type(self.max_attempts) is not int
                                              or not 1 <= self.max_attempts <= 1000):
            raise DomainError(f"max_attempts must be between 1 and 1000, got {self.max_attempts!r}")
        for name, low, high in (("backoff", 0.0, _MAX_DELAY), ("backoff_max", 0.0, _MAX_DELAY),
                                ("factor", 1.0, _MAX_FACTOR)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and low <= value <= high):
                raise DomainError(f"retry {name} must be a number from {low:g} to {high:g}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.jitter is not None and not isinstance(self.jitter, bool):
            raise DomainError(f"retry jitter must be true or false, got {self.jitter!r}")
        for name in ("retry_on", "dont_retry_on"):
            names = getattr(self, name)
            if names is None:
                continue
            if isinstance(names, str) or not isinstance(names, (tuple, list)):
                raise DomainError(f"{name} must be a sequence of qualified class names, got {names!r}")
            if len(names) > _MAX_NAMES:
                raise DomainError(f"{name} may name at most {_MAX_NAMES} classes, got {len(names)}")
            for item in names:
                if not isinstance(item, str) or len(item) > 300 or not _QUALIFIED_NAME.fullmatch(item):
                    raise DomainError(f"{name}: {item!r} is not a qualified class name such as "
                                      "'builtins.ValueError' or 'myapp.errors.Throttled'")
            object.__setattr__(self, name, tuple(dict.fromkeys(names)))

    @classmethod
    def of(cls, policy: RetryPolicy) -> RetryOverride:
        """Every field of ``policy``: it replaces a task's policy whole."""
        return cls(max_attempts=policy.max_attempts, backoff=policy.backoff, factor=policy.factor,
                   backoff_max=policy.backoff_max, jitter=policy.jitter,
                   retry_on=tuple(qualified_name(c) for c in policy.retry_on),
                   dont_retry_on=tuple(qualified_name(c) for c in policy.dont_retry_on))

    def to_json(self) -> dict[str, Any]:
        """The fields given, as JSON values (names as arrays)."""
        return {f.name: list(value) if isinstance(value, tuple) else value
                for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RetryOverride:
        """The override written by :meth:`to_json`; :class:`DomainError` for anything else."""
        if not isinstance(data, Mapping):
            raise DomainError(f"a retry override is a JSON object, got {data!r:.80}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise DomainError(f"a retry override has no field {', '.join(sorted(unknown))}")
        return cls(**data)
