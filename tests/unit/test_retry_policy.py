"""Retry policies (``broker_q.domain.retry``): which failures run again, and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_q import App, ConfigurationError, ValidationError
from broker_q.cli import main
from broker_q.domain.events import TaskSubmitted
from broker_q.domain.retry import Retry, RetryOverride, RetryPolicy, matches, qualified_name
from broker_q.domain.task import evolve, retry, start
from broker_q.errors import DomainError
from broker_q.relay import work_message_body, work_message_for
from broker_q.wire import TaskEnvelope, WorkMessage


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


def _charge_app() -> App:
    app = App(store="memory://")

    @app.task(name="charge", retry=RetryPolicy(max_attempts=2, retry_on=(ConnectionError,)))
    def charge() -> None:
        raise ValueError("declined")

    return app


def test_a_submits_override_is_recorded_and_carried_in_every_work_message() -> None:
    app = _charge_app()
    override = RetryOverride(backoff=0.2, jitter=False, retry_on=("builtins.ValueError",))
    handle = app.submit("charge", retry=override, max_attempts=4)
    [submitted] = app.history(handle.id)
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.max_attempts == 4  # max_attempts keeps its own field, whichever way it is given
    assert submitted.retry == {"backoff": 0.2, "jitter": False, "retry_on": ["builtins.ValueError"]}
    state = app.get_task(handle.id)
    assert (state.max_attempts, state.retry) == (4, override)

    first = WorkMessage.model_validate_json(work_message_body(submitted))
    assert (first.max_attempts, first.retry) == (4, override)
    # A retry's message (as a takeover's or a replay's) is made from the replayed state: it carries it too.
    now = datetime.now(UTC)
    running = evolve(state, start(state, worker="w", now=now))
    waiting = evolve(running, retry(running, due_at=now + timedelta(seconds=0.2), error_type="ValueError",
                                    message="declined", traceback=None, now=now))
    second = WorkMessage.model_validate_json(work_message_for(waiting))
    assert (second.attempt, second.max_attempts, second.retry) == (2, 4, override)
    # What a worker decides from the message alone: ValueError is retried, after the submit's backoff.
    policy = app.tasks["charge"].retry
    assert policy.decide(ValueError(), tries=1, draw=0.9, max_attempts=second.max_attempts,
                         override=second.retry).delay == 0.2
    assert policy.decide(ValueError(), tries=1, draw=0.9).delay is None  # the task's own policy would not


def test_a_whole_policy_given_at_submit_is_recorded_field_by_field() -> None:
    app = _charge_app()
    handle = app.submit("charge", retry=RetryPolicy(max_attempts=3, backoff=1, dont_retry_on=(KeyError,)))
    [submitted] = app.history(handle.id)
    assert isinstance(submitted, TaskSubmitted)
    assert submitted.max_attempts == 3
    assert submitted.retry == {"backoff": 1.0, "factor": 2.0, "backoff_max": 600.0, "jitter": True,
                               "retry_on": ["builtins.Exception"], "dont_retry_on": ["builtins.KeyError"]}
    plain = app.submit("charge", max_attempts=3)  # the shorthand records no retry
    assert app.get_task(plain.id).retry is None
    assert b'"retry"' not in work_message_body(app.history(plain.id)[0])  # type: ignore[arg-type]


def test_a_bad_override_is_refused_at_submit_and_nothing_is_recorded() -> None:
    app = _charge_app()
    with pytest.raises(DomainError, match="not both"):
        app.submit("charge", retry=RetryPolicy(max_attempts=3), max_attempts=2)
    with pytest.raises(ValidationError, match="RetryPolicy or a RetryOverride"):
        app.submit("charge", retry={"backoff": 1})  # type: ignore[arg-type]
    with pytest.raises(DomainError, match="factor"):
        app.submit("charge", retry=RetryOverride(factor=0))
    assert app.store.read_log(0, 10) == []


def test_broker_q_submit_records_each_retry_option_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:///{tmp_path}/store.sqlite"
    assert main(["--store", store, "submit", "charge", "--max-attempts", "3", "--retry-backoff", "0.5",
                 "--retry-factor", "3", "--retry-backoff-max", "10", "--no-retry-jitter",
                 "--retry-on", "builtins.OSError", "--retry-on", "myapp.errors.Throttled",
                 "--dont-retry-on", "builtins.FileNotFoundError"]) == 0
    app = App(store=store)
    [record] = app.store.read_log(0, 10)
    assert isinstance(record.event, TaskSubmitted)
    assert str(record.event.stream_id) == capsys.readouterr().out.strip()
    assert record.event.max_attempts == 3
    assert record.event.retry == {"backoff": 0.5, "factor": 3.0, "backoff_max": 10.0, "jitter": False,
                                  "retry_on": ["builtins.OSError", "myapp.errors.Throttled"],
                                  "dont_retry_on": ["builtins.FileNotFoundError"]}
    assert main(["--store", store, "submit", "charge", "--retry-backoff", "1"]) == 0
    assert app.store.read_log(1, 10)[0].event.retry == {"backoff": 1.0}  # type: ignore[attr-defined]
    capsys.readouterr()
    assert main(["--store", store, "submit", "charge", "--retry-on", "ValueError"]) == 1
    assert "qualified class name" in capsys.readouterr().err
    assert len(app.store.read_log(0, 10)) == 2
    app.close()


def test_the_envelope_takes_retry_options_and_refuses_unknown_ones() -> None:
    envelope = TaskEnvelope.model_validate_json(
        b'{"task": "charge", "retry": {"max_attempts": 3, "backoff": 2, "retry_on": ["builtins.ValueError"]}}')
    assert envelope.retry is not None
    assert envelope.retry.override() == RetryOverride(max_attempts=3, backoff=2.0, retry_on=("builtins.ValueError",))
    for bad in ('{"colour": "red"}', '{"retry_on": ["ValueError"]}', '{"factor": 0.5}', '{"jitter": "often"}'):
        with pytest.raises(pydantic.ValidationError):
            TaskEnvelope.model_validate_json(f'{{"task": "charge", "retry": {bad}}}')
