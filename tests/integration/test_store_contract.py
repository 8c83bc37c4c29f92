"""The event store contract (``broker_q/store/port.py``), run against every adapter.

``store_url`` runs each test on memory://, a real SQLite file and a real PostgreSQL schema. Then the
group-commit writer on each adapter, the translation of an unreachable database, and the parsing
of store URLs.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from broker_q.domain.events import Event, TaskStarted, TaskSubmitted
from broker_q.errors import ConcurrencyConflict, ConfigurationError, StoreUnavailable
from broker_q.store import AppendResult, EventStore, GroupCommitWriter, Recorded, open_store, store_environment

T0 = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


def event(stream: uuid.UUID, version: int, *, tag: str = "") -> Event:
    """An event at ``version`` of ``stream``; ``tag`` tells apart two events at the same place."""
    timestamp = T0 + timedelta(seconds=version)
    if version == 1:
        return TaskSubmitted(stream_id=stream, version=1, timestamp=timestamp, tenant="acme", actor="client:test",
                             correlation_id=stream, task="t.add", queue="default", args=[1, tag], kwargs={"k": tag})
    return TaskStarted(stream_id=stream, version=version, timestamp=timestamp, tenant="acme", actor=f"worker:{tag}",
                       correlation_id=stream, attempt=version - 1, worker=tag or "w")


def stream_of(*versions: int, stream: uuid.UUID | None = None) -> list[Event]:
    stream = stream or uuid.uuid4()
    return [event(stream, v) for v in versions]


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def everything(store: EventStore) -> list[Recorded]:
    return store.read_log(0, 100_000)


def strictly_increasing(values: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


# -- append -------------------------------------------------------------------------------------


def test_an_empty_store(store: EventStore) -> None:
    assert store.max_position() == 0
    assert store.read_log(0, 10) == []
    assert store.read_stream(uuid.uuid4()) == []


def test_append_returns_increasing_positions(store: EventStore) -> None:
    first = store.append(stream_of(1, 2, 3))
    second = store.append([*stream_of(1), *stream_of(1, 2)])
    assert len(first) == 3
    assert len(second) == 3
    assert strictly_increasing([*first, *second])
    assert first[0] >= 1
    assert store.max_position() == second[-1]


def test_positions_name_the_appended_events(store: EventStore) -> None:
    events = [*stream_of(1, 2), *stream_of(1)]
    positions = store.append(events)
    assert [(r.position, r.event) for r in everything(store)] == list(zip(positions, events, strict=True))


def test_a_taken_version_is_a_conflict(store: EventStore) -> None:
    stream = uuid.uuid4()
    store.append([event(stream, 1, tag="first")])
    with pytest.raises(ConcurrencyConflict):
        store.append([event(stream, 1, tag="second")])
    assert store.read_stream(stream) == [event(stream, 1, tag="first")]


def test_a_batch_with_one_conflicting_event_stores_none_of_its_events(store: EventStore) -> None:
    taken = stream_of(1, 2)
    store.append(taken)
    before = everything(store)
    bystander, other = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(ConcurrencyConflict):
        store.append([event(bystander, 1), event(taken[0].stream_id, 3), event(taken[0].stream_id, 2, tag="x"),
                      event(other, 1)])
    assert store.read_stream(bystander) == []
    assert store.read_stream(other) == []
    assert store.read_stream(taken[0].stream_id) == taken
    assert everything(store) == before
    assert store.max_position() == before[-1].position


def test_a_batch_that_conflicts_with_itself_stores_nothing(store: EventStore) -> None:
    stream, bystander = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(ConcurrencyConflict):
        store.append([event(bystander, 1), event(stream, 1, tag="a"), event(stream, 1, tag="b")])
    assert everything(store) == []


# -- append_groups ------------------------------------------------------------------------------

GROUPS = 7


@pytest.mark.parametrize(
    "conflicting",
    [set(), {0}, {3}, {GROUPS - 1}, {0, GROUPS - 1}, {1, 2}, {0, 3, 6}, {1, 3, 5}, set(range(GROUPS))],
    ids=["none", "start", "middle", "end", "both-ends", "adjacent", "three", "alternate", "all"],
)
def test_append_groups_isolates_each_conflicting_group(store: EventStore, conflicting: set[int]) -> None:
    taken = [event(uuid.uuid4(), 1, tag="taken") for _ in range(GROUPS)]
    store.append([taken[i] for i in conflicting])
    before = everything(store)
    groups: list[list[Event]] = []
    for i in range(GROUPS):
        fresh = event(uuid.uuid4(), 1, tag=f"g{i}")
        # The conflicting event comes last, so a group that is not atomic would leave ``fresh`` behind.
        groups.append([fresh, event(taken[i].stream_id, 1, tag=f"g{i}")])

    results: list[AppendResult] = store.append_groups(groups)

    assert len(results) == GROUPS
    committed: dict[int, Event] = {}
    for i, (group, result) in enumerate(zip(groups, results, strict=True)):
        if i in conflicting:
            assert isinstance(result, ConcurrencyConflict), f"group {i}: {result!r}"
            assert store.read_stream(group[0].stream_id) == [], f"group {i} was half stored"
            assert store.read_stream(taken[i].stream_id) == [taken[i]]
        else:
            assert isinstance(result, list), f"group {i}: {result!r}"
            assert len(result) == len(group)
            assert strictly_increasing(result)
            committed.update(zip(result, group, strict=True))
            assert store.read_stream(group[0].stream_id) == [group[0]]
            assert store.read_stream(group[1].stream_id) == [group[1]]
    after = {r.position: r.event for r in everything(store)}
    assert after == {**{r.position: r.event for r in before}, **committed}


def test_append_groups_keeps_each_group_atomic_when_groups_conflict_with_each_other(store: EventStore) -> None:
    shared = uuid.uuid4()
    groups = [[event(uuid.uuid4(), 1), event(shared, 1, tag=str(i))] for i in range(4)]
    results = store.append_groups(groups)
    winners = [i for i, r in enumerate(results) if isinstance(r, list)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ConcurrencyConflict) for i, r in enumerate(results) if i not in winners)
    assert store.read_stream(shared) == [groups[winners[0]][1]]
    for i, group in enumerate(groups):
        assert store.read_stream(group[0].stream_id) == ([group[0]] if i in winners else [])


def test_append_groups_of_nothing(store: EventStore) -> None:
    assert store.append_groups([]) == []
    assert store.max_position() == 0


# -- reading ------------------------------------------------------------------------------------


def test_read_stream_is_in_version_order_up_to_to_version(store: EventStore) -> None:
    stream = uuid.uuid4()
    mine = [event(stream, v) for v in range(1, 6)]
    store.append([mine[0], *stream_of(1, 2)])
    store.append(mine[1:3])
    store.append([*stream_of(1), mine[3], mine[4]])
    assert store.read_stream(stream) == mine
    assert store.read_stream(stream, to_version=3) == mine[:3]
    assert store.read_stream(stream, to_version=1) == mine[:1]
    assert store.read_stream(stream, to_version=5) == mine
    assert store.read_stream(stream, to_version=99) == mine


def test_read_stream_after_version_reads_only_what_follows(store: EventStore) -> None:
    stream = uuid.uuid4()
    mine = [event(stream, v) for v in range(1, 6)]
    store.append([mine[0], *stream_of(1, 2)])
    store.append(mine[1:5])
    assert store.read_stream(stream, after_version=0) == mine
    assert store.read_stream(stream, after_version=2) == mine[2:]
    assert store.read_stream(stream, after_version=5) == []
    assert store.read_stream(stream, after_version=2, to_version=4) == mine[2:4]
    assert store.read_stream(uuid.uuid4(), after_version=3) == []


def _fill(store: EventStore, batches: int = 6) -> list[int]:
    positions: list[int] = []
    for i in range(batches):
        positions += store.append(stream_of(*range(1, 1 + i % 3 + 1)))
    return positions


def test_read_log_pages_in_position_order_and_never_repeats(store: EventStore) -> None:
    positions = _fill(store)
    seen: list[int] = []
    after = 0
    while page := store.read_log(after, 4):
        assert len(page) <= 4
        seen += [r.position for r in page]
        after = page[-1].position
    assert seen == positions
    assert strictly_increasing(seen)
    assert store.read_log(after, 4) == []


def test_read_log_after_a_position_excludes_it(store: EventStore) -> None:
    positions = _fill(store)
    assert [r.position for r in store.read_log(positions[2], 100)] == positions[3:]
    assert [r.position for r in store.read_log(positions[-1], 100)] == []


def test_read_log_stops_at_to_position_inclusive(store: EventStore) -> None:
    positions = _fill(store)
    assert [r.position for r in store.read_log(0, 100, to_position=positions[4])] == positions[:5]
    assert [r.position for r in store.read_log(positions[1], 100, to_position=positions[5])] == positions[2:6]
    assert [r.position for r in store.read_log(positions[1], 2, to_position=positions[5])] == positions[2:4]
    assert store.read_log(positions[3], 100, to_position=positions[3]) == []


def test_read_log_with_limit_zero_reads_nothing(store_url: str, store: EventStore,
                                                 request: pytest.FixtureRequest) -> None:
    _fill(store)
    assert store.read_log(0, 0) == []


def test_max_position_is_the_last_position(store: EventStore) -> None:
    positions = _fill(store)
    assert store.max_position() == positions[-1] == everything(store)[-1].position
    with pytest.raises(ConcurrencyConflict):
        store.append(stream_of(1, 1))
    assert store.max_position() == positions[-1]


# -- reader positions ---------------------------------------------------------------------------


def test_reader_positions_are_per_name_start_at_zero_and_never_go_back(store: EventStore) -> None:
    assert store.get_position("relay") == 0
    store.set_position("relay", 5)
    assert store.get_position("relay") == 5
    assert store.get_position("projection:queues") == 0
    store.set_position("relay", 3)
    assert store.get_position("relay") == 5
    store.set_position("relay", 5)
    assert store.get_position("relay") == 5
    store.set_position("projection:queues", 2)
    store.set_position("relay", 9)
    assert (store.get_position("relay"), store.get_position("projection:queues")) == (9, 2)


# -- durability ---------------------------------------------------------------------------------


def test_a_reopened_store_sees_everything(durable_store_url: str) -> None:
    """For the stores that keep anything once closed (memory:// by design does not)."""
    store_url = durable_store_url
    store = open_store(store_url)
    stream = uuid.uuid4()
    mine = [event(stream, 1), event(stream, 2)]
    positions = [*store.append(mine), *store.append(stream_of(1))]
    store.set_position("relay", positions[-1])
    log = everything(store)
    store.close()

    reopened = open_store(store_url)
    try:
        assert everything(reopened) == log
        assert reopened.read_stream(stream) == mine
        assert reopened.max_position() == positions[-1]
        assert reopened.get_position("relay") == positions[-1]
        with pytest.raises(ConcurrencyConflict):
            reopened.append([event(stream, 2, tag="again")])
        later = reopened.append([event(stream, 3)])
        assert later[0] > positions[-1]
    finally:
        reopened.close()


# -- group commit -------------------------------------------------------------------------------


async def test_group_commit_shares_transactions_and_gives_each_caller_its_positions(store: EventStore) -> None:
    writer = GroupCommitWriter(store)
    requests = [stream_of(*range(1, 1 + i % 3 + 1)) for i in range(200)]
    try:
        results = await asyncio.gather(*(writer.append(r) for r in requests))
    finally:
        await writer.close()
    assert writer.transactions < 50
    logged = {r.position: r.event for r in everything(store)}
    assert len(logged) == sum(len(r) for r in requests)
    for request, positions in zip(requests, results, strict=True):
        assert [logged[p] for p in positions] == request
    all_positions = [p for positions in results for p in positions]
    assert len(set(all_positions)) == len(all_positions)


async def test_group_commit_raises_a_conflict_to_its_caller_only(store: EventStore) -> None:
    taken = event(uuid.uuid4(), 1, tag="first")
    store.append([taken])
    writer = GroupCommitWriter(store)
    requests = [stream_of(1, 2) for _ in range(30)]
    loser = [event(uuid.uuid4(), 1), event(taken.stream_id, 1, tag="second")]
    requests.insert(17, loser)
    try:
        results = await asyncio.gather(*(writer.append(r) for r in requests), return_exceptions=True)
    finally:
        await writer.close()
    assert isinstance(results[17], ConcurrencyConflict)
    assert store.read_stream(loser[0].stream_id) == []
    assert store.read_stream(taken.stream_id) == [taken]
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        if i != 17:
            assert isinstance(result, list), f"request {i}: {result!r}"
            assert store.read_stream(request[0].stream_id) == request


class FlakyStore:
    """A store that is unreachable for its first ``failures`` calls of ``append_groups``."""

    def __init__(self, store: EventStore, failures: int) -> None:
        self.store = store
        self.failures = failures
        self.calls = 0

    def append_groups(self, groups: Sequence[Sequence[Event]]) -> list[AppendResult]:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreUnavailable("the database is down")
        return self.store.append_groups(groups)


async def test_a_writer_without_retries_raises_store_unavailable_to_every_waiting_caller() -> None:
    flaky = FlakyStore(open_store("memory://"), failures=1)
    writer = GroupCommitWriter(flaky, retry_unavailable=False)  # type: ignore[arg-type]
    requests = [stream_of(1) for _ in range(5)]
    results = await asyncio.gather(*(writer.append(r) for r in requests), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert flaky.calls == 1
    assert flaky.store.max_position() == 0
    assert await writer.append(requests[0]) == [1]  # the store is back; the writer still works
    await writer.close()
    with pytest.raises(StoreUnavailable):
        await writer.append(stream_of(1))


async def test_a_writer_with_retries_commits_once_the_store_is_back() -> None:
    flaky = FlakyStore(open_store("memory://"), failures=2)
    writer = GroupCommitWriter(flaky, max_backoff=0.05)  # type: ignore[arg-type]
    requests = [stream_of(1) for _ in range(5)]
    try:
        results = await asyncio.gather(*(writer.append(r) for r in requests))
    finally:
        await writer.close()
    assert flaky.calls == 3
    assert sorted(p for r in results for p in r) == [1, 2, 3, 4, 5]


# -- unreachable database, URLs -----------------------------------------------------------------


def test_an_unreachable_postgresql_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        open_store("postgresql://postgres@127.0.0.1:1/test")


def test_an_unreachable_postgresql_with_a_schema_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1"):
        open_store("postgresql://postgres@127.0.0.1:1/test?schema=s1")


@pytest.mark.parametrize(
    "url",
    ["mysql://root@localhost/db", "redis://localhost", "", "/tmp/store.sqlite", "file:///tmp/store.sqlite"],
)
def test_an_unsupported_scheme_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        store_environment(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host-not-path"])
def test_a_sqlite_url_without_a_path_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="sqlite"):
        store_environment(url)


@pytest.mark.parametrize("url", ["postgresql://postgres@localhost", "postgresql:///test", "postgres://u@h/"])
def test_a_postgresql_url_without_host_or_database_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        store_environment(url)


def test_store_urls_are_parsed() -> None:
    assert store_environment("memory://") == {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    assert store_environment("sqlite:///data/q.sqlite")["SQLITE_DBNAME"] == "data/q.sqlite"
    assert store_environment("sqlite:////var/lib/q.sqlite")["SQLITE_DBNAME"] == "/var/lib/q.sqlite"
    assert store_environment("SQLite:///my%20q.sqlite")["SQLITE_DBNAME"] == "my q.sqlite"
    env = store_environment("postgresql://bq:p%40ss@db.example:6543/queue?schema=tenant_a")
    assert {k: env[k] for k in ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER",
                                "POSTGRES_PASSWORD", "POSTGRES_SCHEMA")} == {
        "POSTGRES_DBNAME": "queue", "POSTGRES_HOST": "db.example", "POSTGRES_PORT": "6543",
        "POSTGRES_USER": "bq", "POSTGRES_PASSWORD": "p@ss", "POSTGRES_SCHEMA": "tenant_a",
    }
    defaults = store_environment("postgres://db.example/queue")
    assert (defaults["POSTGRES_PORT"], defaults["POSTGRES_USER"], defaults["POSTGRES_SCHEMA"]) == (
        "5432", "postgres", "public")
    assert int(defaults["POSTGRES_LOCK_TIMEOUT"]) > 0  # 0 would wait forever (DESIGN.md)
    assert "POSTGRES_ENABLE_DB_FUNCTIONS" not in defaults


def test_read_log_decodes_only_the_topics_asked_for_and_the_rest_on_use(store: EventStore) -> None:
    _fill(store)
    eager = store.read_log(0, 100)
    lazy = store.read_log(0, 100, decode={TaskSubmitted.TOPIC})
    assert [(r.position, r.topic, str(r.stream_id), r.version, r.tenant) for r in lazy] == [
        (r.position, r.event.TOPIC, str(r.event.stream_id), r.event.version, r.event.tenant) for r in eager]
    assert lazy == eager  # each event decoded when first read
