"""Retry policies: whether a failed attempt runs again, and when.

Pure: the caller passes the random draw, so a decision can be tested and explained. The delay of
retry ``n`` (the first retry is 1) is ``backoff * factor ** (n - 1)``, capped at ``backoff_max``;
with ``jitter`` it is drawn uniformly from ``[delay / 2, delay]`` ("equal jitter"), which spreads
the retries of tasks that failed together without ever retrying at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker_q.errors import DomainError

__all__ = ["Decision", "Retry", "RetryPolicy"]


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

    def decide(self, error: BaseException, *, tries: int, draw: float, max_attempts: int | None = None) -> Decision:
        """What to do after attempt number ``tries`` (counted from the last replay) raised ``error``.

        ``max_attempts`` overrides the policy's own (a submit's option).
        """
        limit = self.max_attempts if max_attempts is None else max_attempts
        if tries >= limit:
            return Decision(None, f"attempt {tries} of {limit} failed")
        if isinstance(error, Retry):
            return Decision(error.delay if error.delay is not None else self.delay(tries, draw), "asked to retry")
        if isinstance(error, self.dont_retry_on) or not isinstance(error, self.retry_on):
            return Decision(None, f"{type(error).__name__} is not retried")
        return Decision(self.delay(tries, draw), f"attempt {tries} of {limit} failed")
