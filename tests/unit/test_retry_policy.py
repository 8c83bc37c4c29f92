"""Retry policies (``broker_q.domain.retry``): which failures run again, and when."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_q import App, ConfigurationError
from broker_q.domain.retry import Retry, RetryOverride, RetryPolicy, matches, qualified_name
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


class Throttled(ConnectionError):
    """An application's own error: named ``tests.unit.test_retry_policy.Throttled``."""


def test_a_class_is_named_by_its_module_and_qualified_name() -> None:
    assert qualified_name(ValueError) == "builtins.ValueError"
    assert qualified_name(Throttled) == "tests.unit.test_retry_policy.Throttled"

    class Local(Exception):
        pass

    assert qualified_name(Local).endswith(".<locals>.Local")
    assert matches(Local(), [qualified_name(Local)])
    assert RetryOverride(retry_on=(qualified_name(Local),)).retry_on == (qualified_name(Local),)  # a valid name


def test_a_name_matches_the_class_and_its_subclasses_as_isinstance_does() -> None:
    assert matches(Throttled(), {"tests.unit.test_retry_policy.Throttled"})
    assert matches(Throttled(), {"builtins.OSError"})  # Throttled < ConnectionError < OSError
    assert matches(Throttled(), {"builtins.BaseException"})
    assert not matches(ConnectionError(), {"tests.unit.test_retry_policy.Throttled"})  # not a base's subclass
    assert not matches(ValueError(), {"builtins.OSError"})
    assert not matches(ValueError(), {"ValueError"})  # the bare name is not the qualified name


def test_an_override_retries_by_name_where_the_task_would_not() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(KeyError,))
    assert policy.decide(Throttled(), tries=1, draw=0.0).why == "Throttled is not retried"
    override = RetryOverride(retry_on=("builtins.OSError",))
    assert policy.decide(Throttled(), tries=1, draw=0.0, override=override).delay == 0.5  # a subclass of OSError
    assert policy.decide(KeyError(), tries=1, draw=0.0, override=override).delay is None  # retry_on was replaced


def test_dont_retry_on_wins_whichever_side_gives_it() -> None:
    both = RetryOverride(retry_on=("builtins.Exception",), dont_retry_on=("builtins.ConnectionError",))
    decision = RetryPolicy(max_attempts=3).decide(Throttled(), tries=1, draw=0.0, override=both)
    assert (decision.delay, decision.why) == (None, "Throttled is not retried")
    # the task's own dont_retry_on (classes) still holds against an override that gives only retry_on
    task = RetryPolicy(max_attempts=3, dont_retry_on=(Throttled,))
    assert task.decide(Throttled(), tries=1, draw=0.0,
                       override=RetryOverride(retry_on=("builtins.OSError",))).delay is None
    # ... and an override's dont_retry_on, even empty, replaces it
    assert task.decide(Throttled(), tries=1, draw=0.0, override=RetryOverride(dont_retry_on=())).delay is not None


def test_names_that_no_class_has_match_nothing() -> None:
    policy = RetryPolicy(max_attempts=3)
    unknown = RetryOverride(retry_on=("myapp.errors.NoSuchError",))
    assert policy.decide(ConnectionError(), tries=1, draw=0.0, override=unknown).delay is None
    never = RetryOverride(dont_retry_on=("myapp.errors.NoSuchError",))
    assert policy.decide(ConnectionError(), tries=1, draw=0.0, override=never).delay is not None
    assert policy.decide(Retry(delay=3.0), tries=1, draw=0.0,
                         override=RetryOverride(retry_on=())).delay == 3.0  # Retry asks, whatever retry_on says


def test_each_field_given_replaces_the_tasks_own_and_the_others_stay() -> None:
    policy = RetryPolicy(max_attempts=5, backoff=1.0, factor=2.0, backoff_max=100.0, jitter=False,
                         retry_on=(OSError,))
    faster = RetryOverride(backoff=0.1, factor=3.0)
    assert [policy.decide(OSError(), tries=n, draw=0.0, override=faster).delay for n in (1, 2, 3)] == \
        pytest.approx([0.1, 0.3, 0.9])
    assert policy.decide(ValueError(), tries=1, draw=0.0, override=faster).delay is None  # retry_on kept
    assert policy.decide(OSError(), tries=5, draw=0.0, override=faster).delay is None  # max_attempts kept
    capped = RetryOverride(backoff_max=1.5, jitter=True, max_attempts=10)
    assert policy.decide(OSError(), tries=3, draw=0.0, override=capped).delay == 0.75  # half the capped 1.5
    assert policy.decide(OSError(), tries=9, draw=0.0, override=capped).delay is not None
    assert policy.decide(OSError(), tries=9, draw=0.0, override=capped, max_attempts=9).delay is None


def test_a_whole_policy_becomes_an_override_of_every_field() -> None:
    policy = RetryPolicy(max_attempts=4, backoff=0.5, retry_on=(Throttled,), dont_retry_on=(FileNotFoundError,))
    override = RetryOverride.of(policy)
    assert override.to_json() == {
        "max_attempts": 4, "backoff": 0.5, "factor": 2.0, "backoff_max": 600.0, "jitter": True,
        "retry_on": ["tests.unit.test_retry_policy.Throttled"], "dont_retry_on": ["builtins.FileNotFoundError"]}
    assert RetryOverride.from_json(override.to_json()) == override
    other = RetryPolicy(max_attempts=1, backoff=9.0, factor=5.0, jitter=False, retry_on=(KeyError,))
    for error in (Throttled(), ConnectionError(), FileNotFoundError(), KeyError()):
        assert other.decide(error, tries=1, draw=0.3, override=override) == policy.decide(error, tries=1, draw=0.3)
    assert RetryOverride().to_json() == {}


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"backoff": -1}, "backoff"),
        ({"backoff": float("nan")}, "backoff"),
        ({"backoff_max": float("inf")}, "backoff_max"),
        ({"factor": 0.5}, "factor"),
        ({"factor": 1000}, "factor"),
        ({"backoff": True}, "backoff"),
        ({"jitter": "no"}, "jitter"),
        ({"retry_on": "builtins.ValueError"}, "retry_on"),
        ({"retry_on": [ValueError]}, "retry_on"),
        ({"retry_on": ["ValueError"]}, "qualified class name"),
        ({"dont_retry_on": ["builtins.Value Error"]}, "qualified class name"),
        ({"retry_on": [f"m.E{n}" for n in range(101)]}, "at most 100"),
        ({"colour": "red"}, "no field colour"),
    ],
)
def test_an_override_that_cannot_mean_anything_is_refused(fields: dict[str, object], complaint: str) -> None:
    with pytest.raises(DomainError, match=complaint):
        RetryOverride.from_json(fields)
