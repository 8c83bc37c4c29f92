"""How the relay packs work messages into batches (decision 0014), without a broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker_q import App
from broker_q.amqp.topology import Topology
from broker_q.relay import _MAX_BATCH_BYTES, Relay, _WorkBatch
from broker_q.wire import WORK_BATCH_TYPE, WORK_MESSAGE_TYPE


class _Channel:
    def __init__(self) -> None:
        self.published: list[tuple[bytes, str, Any]] = []

    def basic_publish(self, body: bytes, *, routing_key: str, properties: Any, **_: Any) -> None:
        self.published.append((body, routing_key, properties))


def _relay(work_batch: int) -> Relay:
    return Relay(App(store="memory://").store, "amqp://unused", Topology("t"), work_batch=work_batch)


def _pack(relay: Relay, messages: list[tuple[str, int, bytes]]) -> list[tuple[bytes, str, Any]]:
    channel, confirms, batches = _Channel(), [], {}  # type: ignore[var-annotated]
    for n, (route, priority, body) in enumerate(messages):
        relay._work(channel, "work", confirms, batches, route, priority, f"task{n}:1", body)  # type: ignore[arg-type]
    for (route, priority), batch in batches.items():
        relay._publish_batch(channel, "work", route, priority, batch)  # type: ignore[arg-type]
    return channel.published


def test_tasks_are_packed_by_route_and_priority_in_log_order_up_to_the_batch_size() -> None:
    messages = [("a", 5, b'{"n":%d}' % n) for n in range(5)] + [("b", 5, b'{"n":5}'), ("a", 9, b'{"n":6}')]
    published = _pack(_relay(2), messages)
    shapes = [(route, p.message_type, [m["n"] for m in json.loads(body)] if p.message_type == WORK_BATCH_TYPE
               else json.loads(body)["n"], p.message_id) for body, route, p in published]
    assert shapes == [
        ("a", WORK_BATCH_TYPE, [0, 1], "task0:1..task1:1"),
        ("a", WORK_BATCH_TYPE, [2, 3], "task2:1..task3:1"),
        ("a", WORK_MESSAGE_TYPE, 4, "task4:1"),  # a batch of one is the single message
        ("b", WORK_MESSAGE_TYPE, 5, "task5:1"),
        ("a", WORK_MESSAGE_TYPE, 6, "task6:1"),
    ]
    assert [p.priority for _, _, p in published] == [5, 5, 5, 5, 9]


def test_a_batch_is_closed_before_its_body_passes_the_size_cap() -> None:
    big = b'"' + b"x" * (_MAX_BATCH_BYTES // 2) + b'"'
    published = _pack(_relay(32), [("a", 5, big)] * 3)
    assert [p.message_type for _, _, p in published] == [WORK_MESSAGE_TYPE, WORK_MESSAGE_TYPE, WORK_MESSAGE_TYPE]
    assert all(len(body) <= _MAX_BATCH_BYTES for body, _, _ in published)


def test_with_work_batch_1_each_task_is_published_alone_at_once() -> None:
    published = _pack(_relay(1), [("a", 5, b"{}"), ("a", 5, b"{}")])
    assert [(body, p.message_type, p.message_id) for body, _, p in published] == [
        (b"{}", WORK_MESSAGE_TYPE, "task0:1"), (b"{}", WORK_MESSAGE_TYPE, "task1:1")]


def test_an_empty_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="work_batch"):
        _relay(0)
    assert _WorkBatch().size == 2  # the brackets
