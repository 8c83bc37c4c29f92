"""Retry policies (``broker_q.domain.retry``): which failures run again, and when."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_q import App, ConfigurationError
from broker_q.domain.retry import Retry, RetryPolicy
from broker_q.errors import DomainError


def test_the_default_retries_nothing() -> None:
    decision = RetryPolicy().decide(ValueError("x"), tries=1, draw=0.5)
    assert decision.delay is None
    assert decision.why == "attempt 1 of 1 failed"


def test_backoff_doubles_up_to_its_cap_without_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, backoff=2.0, factor=2.0, backoff_max=20.0, jitter=False)
    delays = [policy.decide(OSError(), tries=n, draw=0.0).delay for n in range(1, 10)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0, 20.0, 20.0]
    assert policy.decide(OSError(), tries=10, draw=0.0).delay is None  # the tenth attempt was the last


@given(retry=st.integers(1, 200), draw=st.floats(0, 1, exclude_max=True))
def test_jitter_stays_between_half_the_delay_and_the_delay(retry: int, draw: float) -> None:
    policy = RetryPolicy(max_attempts=1000, backoff=1.5, factor=3.0, backoff_max=900.0)
    plain = RetryPolicy(max_attempts=1000, backoff=1.5, factor=3.0, backoff_max=900.0, jitter=False)
    full = plain.delay(retry, 0.0)
    assert full / 2 <= policy.delay(retry, draw) <= full <= 900.0
    assert policy.delay(retry, draw) == pytest.approx(full * (0.5 + draw / 2))  # the draw spreads it ("equal jitter")


def test_jittered_delays_grow_by_the_factor() -> None:
    policy = RetryPolicy(max_attempts=10, backoff=2.0, factor=3.0, backoff_max=100.0)
    assert [policy.decide(OSError(), tries=n, draw=0.0).delay for n in range(1, 6)] == [1.0, 3.0, 9.0, 27.0, 50.0]
    assert [policy.decide(OSError(), tries=n, draw=0.5).delay for n in range(1, 6)] == [1.5, 4.5, 13.5, 40.5, 75.0]


def test_which_exceptions_retry() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(OSError,), dont_retry_on=(FileNotFoundError,))
    assert policy.decide(ConnectionError(), tries=1, draw=0.0).delay is not None  # a subclass of OSError
    assert policy.decide(FileNotFoundError(), tries=1, draw=0.0).why == "FileNotFoundError is not retried"
    assert policy.decide(ValueError(), tries=1, draw=0.0).delay is None


def test_retry_asks_for_its_own_delay_within_the_budget() -> None:
    policy = RetryPolicy(max_attempts=2, retry_on=(OSError,))
    assert policy.decide(Retry(delay=42.0), tries=1, draw=0.9).delay == 42.0  # not an OSError, still retried
    assert policy.decide(Retry(delay=42.0), tries=2, draw=0.9).delay is None


def test_a_submit_can_override_the_budget() -> None:
    policy = RetryPolicy(max_attempts=2)
    assert policy.decide(OSError(), tries=2, draw=0.0).delay is None
    assert policy.decide(OSError(), tries=2, draw=0.0, max_attempts=5).delay is not None


def test_nonsense_is_refused() -> None:
    with pytest.raises(DomainError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(DomainError):
        RetryPolicy(factor=0.5)
    with pytest.raises(ValueError, match="between 0 and a week"):
        Retry(delay=-1)
    app = App(store="memory://")
    with pytest.raises(ConfigurationError, match="not both"):
        app.task(retry=RetryPolicy(), max_attempts=3)
    with pytest.raises(ConfigurationError, match="soft_time_limit"):
        app.task(time_limit=1, soft_time_limit=2)
