"""How the store and the group-commit writer behave when part of a batch cannot be appended."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from broker_q.domain import task as domain
from broker_q.domain.events import Event
from broker_q.errors import SerializationError, StoreUnavailable
from broker_q.store import GroupCommitWriter, RecorderEventStore, open_store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def submitted(args: list[Any] | None = None) -> Event:
    return domain.submit(task_id=uuid.uuid4(), task="t", queue="default", args=args or [], kwargs={}, priority=5,
                         tenant="default", actor="test", now=NOW)


class FailsOnce:
    """Makes the store's n-th transaction fail as if the database were unreachable."""

    def __init__(self, store: RecorderEventStore, failing_call: int) -> None:
        self.calls = 0
        self._insert = store._insert
        self._failing_call = failing_call

    def __call__(self, stored: Any) -> list[int]:
        self.calls += 1
        if self.calls == self._failing_call:
            raise StoreUnavailable("the database went away")
        return self._insert(stored)


def test_a_half_that_committed_is_not_reported_unavailable_with_the_other(durable_store_url: str) -> None:
    store = open_store(durable_store_url)
    try:
        existing = submitted()
        store.append([existing])
        fresh_a, fresh_b = submitted(), submitted()
        # Call 1 (all groups) conflicts on `existing`; call 2 (first half) commits; call 3 (second half) fails.
        store._insert = FailsOnce(store, failing_call=3)  # type: ignore[method-assign]
        results = store.append_groups([[fresh_a], [existing], [fresh_b]])
        assert isinstance(results[0], list)
        assert isinstance(results[1], Exception)
        assert isinstance(results[2], StoreUnavailable)
        assert [e.stream_id for e in store.read_stream(fresh_a.stream_id)] == [fresh_a.stream_id]
        assert store.read_stream(fresh_b.stream_id) == []
    finally:
        store.close()


async def test_the_writer_retries_only_what_was_not_appended(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    existing = submitted()
    store.append([existing])
    store._insert = FailsOnce(store, failing_call=3)  # type: ignore[method-assign]
    writer = GroupCommitWriter(store, max_backoff=0.01)
    first, second = submitted(), submitted()
    results = await asyncio.gather(writer.append([first]), writer.append([existing]), writer.append([second]),
                                   return_exceptions=True)
    await writer.close()
    assert isinstance(results[0], list)
    assert isinstance(results[2], list)  # retried after the failure, and committed once
    assert len(store.read_stream(first.stream_id)) == 1
    assert len(store.read_stream(second.stream_id)) == 1
    store.close()


def test_a_group_that_cannot_be_encoded_is_refused_alone(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    good = submitted()
    bad = submitted(args=["\udcff"])  # a lone surrogate: not encodable as UTF-8
    results = store.append_groups([[good], [bad]])
    assert isinstance(results[0], list)
    assert isinstance(results[1], SerializationError)
    assert store.read_stream(bad.stream_id) == []
    store.close()


async def test_closing_a_writer_while_the_store_is_down_returns(sqlite_url: str) -> None:
    class Down:
        def append_groups(self, groups: Any) -> list[Any]:
            return [StoreUnavailable("down")] * len(groups)

    writer = GroupCommitWriter(Down(), max_backoff=0.05)  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(writer.append([submitted()]))
    await asyncio.sleep(0)
    await asyncio.wait_for(writer.close(), 5)
    with pytest.raises(StoreUnavailable):
        await waiting
