"""How events are written as bytes, and read back.

An event is stored as its topic plus a JSON object of its fields, without ``stream_id`` and
``version`` (they are columns of the store). Timestamps are ISO 8601 strings in UTC, ids are
canonical UUID strings. The JSON of every field besides the common metadata must be JSON-native,
which ``tests/unit/test_codec.py`` pins for every event class.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any

import pydantic_core

from broker_q.domain.events import TOPICS, Event
from broker_q.errors import SerializationError, ValidationError

__all__ = ["check_json", "decode_event", "dumps", "encode_event", "loads", "parse_uuid", "stored_tenant"]

_SKIP = frozenset({"stream_id", "version"})
_FIELDS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name not in _SKIP) for cls in TOPICS.values()
}
_COMMON = frozenset({"timestamp", "correlation_id", "causation_id"})
_TIMES: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name not in _COMMON and "datetime" in str(f.type))
    for cls in TOPICS.values()
}
"""Per class, the fields besides ``timestamp`` that JSON holds as ISO 8601 text (``due_at``...)."""
_IDS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in _COMMON and f.name not in _SKIP and str(f.type).startswith(("uuid.UUID", "UUID")))
    for cls in TOPICS.values()
}
"""Per class, the fields besides the common ids that JSON holds as UUID text (``task_id``...)."""
_ID_LISTS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if str(f.type).startswith("list[uuid.UUID"))
    for cls in TOPICS.values()
}
"""Per class, the fields that JSON holds as lists of UUID text (``depends_on``)."""


def check_json(value: Any, where: str = "value") -> None:
    """Refuse anything that would not come back from JSON as it went in.

    Arguments and results travel and are stored as JSON, so a ``datetime``, a ``set``, bytes, a
    non-finite float or a dict with non-string keys must be refused where it is given, not turned
    silently into something else that the handler then receives. (Tuples are accepted and arrive
    as lists, as in every JSON task queue.)
    """
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SerializationError(f"{where} is a string that is not valid Unicode (a lone surrogate)") from None
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SerializationError(f"{where} is {value}, which JSON cannot hold")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SerializationError(f"{where} has the key {key!r}; JSON keys are strings")
            check_json(key, f"{where} key {key!r}")
            check_json(item, f"{where}[{key!r}]")
        return
    raise SerializationError(f"{where} is a {type(value).__name__}, which is not JSON: {value!r:.80}")


def dumps(value: Any) -> bytes:
    """JSON bytes of ``value``; :class:`SerializationError` if it is not JSON-serialisable."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError as e:
        raise SerializationError(f"not JSON-serialisable: {e}") from e


def loads(data: bytes | str) -> Any:
    """The value of JSON ``data``; :class:`ValidationError` if it is not JSON."""
    try:
        return pydantic_core.from_json(data)
    except ValueError as e:
        raise ValidationError(f"not valid JSON: {e}") from e


def encode_event(event: Event) -> bytes:
    cls = type(event)
    return dumps({name: getattr(event, name) for name in _FIELDS[cls]})


_new = object.__new__
_set = object.__setattr__
_SAFE_UNKNOWN = uuid.SafeUUID.unknown


def parse_uuid(text: str) -> uuid.UUID:
    """``uuid.UUID(text)`` for the canonical form the codec writes, at half the cost.

    Reading the log decodes two ids per event; ``UUID.__init__``'s general parsing was a third of
    the time of a projection's catch-up. The result equals, hashes and prints as ``uuid.UUID(text)``.
    """
    value = int(text.replace("-", ""), 16)
    if value >> 128:
        raise ValueError(f"not a UUID: {text!r}")
    parsed = _new(uuid.UUID)
    _set(parsed, "int", value)
    _set(parsed, "is_safe", _SAFE_UNKNOWN)
    return parsed


_TIMESTAMP_KEY = b'{"timestamp":"'
_TENANT_KEY = b'","tenant":"'


def stored_tenant(state: bytes) -> str | None:
    """The ``tenant`` of an event stored as ``state`` by :func:`encode_event`, without parsing the rest.

    The encoder writes ``timestamp`` then ``tenant`` first (the fields of :class:`Event` come first),
    so the tenant is read only right behind the timestamp's value: no payload field can be taken for
    it. None when ``state`` does not start that way or the value holds an escape (tenant names never do).
    """
    if not state.startswith(_TIMESTAMP_KEY):
        return None
    start = state.find(b'"', len(_TIMESTAMP_KEY))
    if start < 0 or not state.startswith(_TENANT_KEY, start):
        return None
    start += len(_TENANT_KEY)
    end = state.find(b'"', start)
    if end < 0 or b"\\" in state[start:end]:
        return None
    return state[start:end].decode()


def decode_event(stream_id: uuid.UUID | str, version: int, topic: str, state: bytes) -> Event:
    """The event stored as ``state`` under ``topic``; ``stream_id`` as a UUID or in its canonical text
    (as SQLite stores it, which spares formatting the id again to compare it with the correlation id)."""
    if isinstance(stream_id, str):
        text, stream_id = stream_id, parse_uuid(stream_id)
    else:
        text = str(stream_id)
    cls = TOPICS.get(topic)
    if cls is None:
        raise ValidationError(f"unknown event topic {topic!r}")
    data = loads(state)
    try:
        data["timestamp"] = datetime.fromisoformat(data["timestamp"])
        correlation = data["correlation_id"]
        # A task's own id is its correlation id unless a caller passed one through: reuse the object.
        data["correlation_id"] = stream_id if correlation == text else parse_uuid(correlation)
        causation = data.get("causation_id")
        if causation is not None:
            data["causation_id"] = parse_uuid(causation)
        for name in _TIMES[cls]:
            if data.get(name) is not None:
                data[name] = datetime.fromisoformat(data[name])
        for name in _IDS[cls]:
            if data.get(name) is not None:
                data[name] = parse_uuid(data[name])
        for name in _ID_LISTS[cls]:
            if data.get(name):
                data[name] = [parse_uuid(item) for item in data[name]]
        return cls(stream_id=stream_id, version=version, **data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValidationError(f"stored event {stream_id} v{version} ({topic}) cannot be read: {e}") from e
