"""The codec: every event class survives encode/decode, and its payload fields are plain JSON."""

from __future__ import annotations

import dataclasses
import decimal
import json
import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_q.codec import check_json, decode_event, dumps, encode_event, loads, parse_uuid, stored_tenant
from broker_q.domain.events import TOPICS, Event
from broker_q.errors import SerializationError, ValidationError

CONVERTED = frozenset({"timestamp", "correlation_id", "causation_id", "due_at", "until", "task_id", "fire_time",
                       "schedule_id", "depends_on", "token_id", "expires_at"})
"""The only fields the codec converts from JSON (see ``broker_q/codec.py``)."""
COLUMNS = frozenset({"stream_id", "version"})
"""Stored as columns of the store, not in the JSON."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
optional_text = st.none() | st.text()

FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "stream_id": st.uuids(),
    "version": st.integers(1, 2**31),
    "timestamp": st.datetimes(timezones=st.just(UTC)),
    "tenant": st.text(),
    "actor": st.text(),
    "correlation_id": st.uuids(),
    "causation_id": st.none() | st.uuids(),
    "task": st.text(),
    "queue": st.text(),
    "args": st.lists(json_values, max_size=4),
    "kwargs": st.dictionaries(st.text(), json_values, max_size=4),
    "priority": st.integers(0, 9),
    "idempotency_key": optional_text,
    "attempt": st.integers(1, 1000),
    "worker": st.text(),
    "result": json_values,
    "error_type": st.text(),
    "message": st.text(),
    "traceback": optional_text,
    "reason": st.text(),
    "message_id": optional_text,
    "size": st.integers(0, 2**40),
    "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "max_attempts": st.none() | st.integers(1, 1000),
    "time_limit": st.none() | st.floats(0.001, 1e6),
    "soft_time_limit": st.none() | st.floats(0.001, 1e6),
    "retry": st.none() | st.fixed_dictionaries({}, optional={
        "backoff": st.floats(0, 604800), "factor": st.floats(1, 100), "backoff_max": st.floats(0, 604800),
        "jitter": st.booleans(),
        "retry_on": st.lists(st.sampled_from(["builtins.OSError", "myapp.errors.Throttled"]), unique=True),
        "dont_retry_on": st.lists(st.sampled_from(["builtins.KeyError", "myapp.errors.Fatal"]), unique=True)}),
    "due_at": st.none() | st.datetimes(timezones=st.just(UTC)),
    "depends_on": st.lists(st.uuids(), max_size=3),
    "receives": st.sampled_from([None, "result", "results"]),
    "until": st.none() | st.datetimes(timezones=st.just(UTC)),
    "timed_out": st.booleans(),
    "forced": st.booleans(),
    "service": st.text(),
    "task_id": st.uuids(),
    "name": st.text(),
    "cron": st.text(),
    "timezone": st.text(),
    "catchup": st.sampled_from(["skip", "once", "all"]),
    "fire_time": st.datetimes(timezones=st.just(UTC)),
    "schedule_id": st.uuids(),
    "schedule_tenant": st.text(),
    "schedule_version": st.integers(1, 2**31),
    "change": st.text(),
    "steps": st.lists(st.fixed_dictionaries({
        "name": st.text(), "task_id": st.uuids().map(str), "task": st.text(),
        "parents": st.lists(st.text(), max_size=3)}), max_size=4),
    "returns": st.text() | st.lists(st.text(), max_size=4),
    "sealed_arguments": st.none() | st.text(),
    "sealed_result": st.none() | st.text(),
    "key_id": st.text(),
    "generation": st.integers(1, 2**31),
    "previous_key_id": optional_text,
    "key_ids": st.lists(st.text(), max_size=4),
    "token_id": st.none() | st.uuids(),
    "roles": st.lists(st.text(), max_size=5),
    "secret_sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "expires_at": st.none() | st.datetimes(timezones=st.just(UTC)),
    "principal": st.text(),
    "permission": st.text(),
    "action": st.text(),
    "description": st.text(),
    "max_waiting": st.none() | st.integers(1, 2**31),
    "submit_rate": st.none() | st.floats(0.001, 1e6),
    "submit_burst": st.none() | st.integers(1, 2**31),
    "max_payload_bytes": st.none() | st.integers(1, 2**31),
    "quota": st.text(),
    "limit": st.floats(0.001, 1e9),
}


def events_of(cls: type[Event]) -> st.SearchStrategy[Event]:
    return st.builds(cls, **{f.name: FIELD_STRATEGIES[f.name] for f in dataclasses.fields(cls)})


any_event = st.sampled_from(sorted(TOPICS.values(), key=lambda c: c.TOPIC)).flatmap(events_of)


def test_every_field_of_every_event_class_has_a_strategy() -> None:
    """A new event field must be added to FIELD_STRATEGIES (and so to the round-trip below)."""
    for cls in TOPICS.values():
        missing = {f.name for f in dataclasses.fields(cls)} - FIELD_STRATEGIES.keys()
        assert not missing, f"{cls.__name__} has fields with no strategy: {missing}"


def test_every_topic_names_its_own_class() -> None:
    assert len(TOPICS) == 31
    for topic, cls in TOPICS.items():
        assert topic == cls.TOPIC
    assert len({cls.TYPE for cls in TOPICS.values()}) == len(TOPICS)


@pytest.mark.parametrize("cls", sorted(TOPICS.values(), key=lambda c: c.TOPIC), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_event_class_survives_encode_and_decode(cls: type[Event], data: st.DataObject) -> None:
    event = data.draw(events_of(cls))
    stored = encode_event(event)
    decoded = decode_event(event.stream_id, event.version, event.TOPIC, stored)
    assert type(decoded) is cls
    assert decoded == event


@settings(max_examples=100, deadline=None)
@given(event=any_event)
def test_the_stored_json_holds_no_column_and_every_other_field(event: Event) -> None:
    document = json.loads(encode_event(event))
    expected = {f.name for f in dataclasses.fields(event)} - COLUMNS
    assert set(document) == expected
    assert datetime.fromisoformat(document["timestamp"]) == event.timestamp
    assert document["correlation_id"] == str(event.correlation_id)


@settings(max_examples=100, deadline=None)
@given(event=any_event)
def test_every_unconverted_field_is_stored_as_is(event: Event) -> None:
    """Read with the standard library's json, every field but the converted ones is the event's value."""
    document = json.loads(encode_event(event))
    for name in set(document) - CONVERTED:
        assert document[name] == getattr(event, name), name
        assert type(document[name]) is type(getattr(event, name)), name


_JSON_LEAVES: frozenset[Any] = frozenset({str, int, float, bool, type(None), Any})


def _is_json_native(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is None:
        return hint in _JSON_LEAVES
    arguments = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return all(_is_json_native(a) for a in arguments)
    if origin is list:
        return all(_is_json_native(a) for a in arguments)
    if origin is dict:
        return arguments[0] is str and _is_json_native(arguments[1])
    return False


@pytest.mark.parametrize("cls", sorted(TOPICS.values(), key=lambda c: c.TOPIC), ids=lambda c: c.__name__)
def test_every_field_but_the_converted_metadata_is_json_native(cls: type[Event]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in CONVERTED | COLUMNS:
            continue
        assert _is_json_native(hints[f.name]), f"{cls.__name__}.{f.name}: {hints[f.name]} is not JSON-native"


def test_the_json_native_check_refuses_what_the_codec_would_not_convert() -> None:
    assert _is_json_native(str | None)
    assert _is_json_native(dict[str, list[Any]])
    for hint in (datetime, uuid.UUID, bytes, set[str], dict[int, str], tuple[int, int], decimal.Decimal):
        assert not _is_json_native(hint), hint


def test_an_unknown_topic_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"no\.such\.topic"):
        decode_event(uuid.uuid4(), 1, "no.such.topic", b"{}")


def test_stored_bytes_that_are_not_json_are_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        decode_event(uuid.uuid4(), 1, "broker_q.task.cancelled", b"{not json")
    with pytest.raises(ValidationError):
        loads(b"\xff")


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_dumps_and_loads_round_trip_json_values(value: Any) -> None:
    assert loads(dumps(value)) == value
    assert json.loads(dumps(value)) == value


class _Opaque:
    pass


@pytest.mark.parametrize("value", [object(), _Opaque(), [1, object()], {"k": _Opaque()}, print],
                         ids=["object", "instance", "nested-in-list", "nested-in-dict", "function"])
def test_dumps_refuses_a_value_that_is_not_json(value: Any) -> None:
    with pytest.raises(SerializationError):
        dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({1, 2}, id="set"),
        pytest.param(b"bytes", id="bytes"),
        pytest.param(datetime(2024, 1, 1, tzinfo=UTC), id="datetime"),
        pytest.param(uuid.UUID(int=7), id="uuid"),
        pytest.param(decimal.Decimal("1.5"), id="decimal"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param({1: "a"}, id="non-string-key"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="infinity"),
        pytest.param([{"deep": [datetime(2024, 1, 1, tzinfo=UTC)]}], id="nested"),
    ],
)
def test_check_json_refuses_a_value_that_json_would_change(value: Any) -> None:
    """Arguments and results are checked with this before they are recorded (dumps also encodes event
    metadata such as datetimes, so it is the check, not dumps, that guards user values)."""
    with pytest.raises(SerializationError):
        check_json(value)


@pytest.mark.parametrize("value", [None, True, 1, 1.5, "s", [1, [2]], (1, 2), {"a": {"b": [None]}}])
def test_check_json_accepts_json_values(value: Any) -> None:
    check_json(value)


@given(st.uuids())
def test_parse_uuid_is_uuid(value: uuid.UUID) -> None:
    parsed = parse_uuid(str(value))
    assert parsed == value
    assert hash(parsed) == hash(value)
    assert str(parsed) == str(value)
    assert parsed.version == value.version


def test_parse_uuid_refuses_what_is_not_a_uuid() -> None:
    for text in ("not-a-uuid", "f" * 33):
        with pytest.raises(ValueError):  # noqa: PT011 - int() and our own check both raise ValueError
            parse_uuid(text)


tenant_names = st.from_regex(r"[a-z0-9][a-z0-9_\-]{0,62}", fullmatch=True)


@given(event=any_event, tenant=tenant_names)
def test_the_stored_tenant_is_read_without_decoding_even_when_a_payload_names_one(event: Event, tenant: str) -> None:
    # The relay routes most events by this alone (``Recorded.tenant``): a payload key "tenant"
    # further on, in args, kwargs or a result, must never be taken for the event's own.
    event = dataclasses.replace(event, tenant=tenant)
    for name in ("args", "kwargs", "result"):
        if hasattr(event, name):
            intruder: Any = [{"tenant": "x"}] if name == "args" else {"tenant": "intruder"}
            event = dataclasses.replace(event, **{name: intruder})
    assert stored_tenant(encode_event(event)) == tenant


def test_a_stored_tenant_that_is_not_where_expected_is_left_to_the_decoder() -> None:
    assert stored_tenant(b'{"args":[{"tenant":"x"}]}' + b" " * 100 + b',"tenant":"acme"}') is None
    assert stored_tenant(b'{"timestamp":"2026-01-01T00:00:00Z","tenant":"a\\"b"}') is None
