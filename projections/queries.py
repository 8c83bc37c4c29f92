"""Queries on the views: what the CLI shows and the HTTP API will serve.

Every query runs in one read transaction that first looks up the live generation of the view, so
a rebuild swapping generations never shows a query half of each. Pages are keyset-paginated: a
page returns ``next``, the cursor to pass as ``after`` for the following page.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from broker_q.errors import StoreError, ValidationError
from broker_q.store.port import EventStore
from projections.database import Cursor, ViewDatabase, open_view_database
from projections.runner import REGISTRY
from projections.views import DEAD_STATES, WAITING_STATES, table, task_key

__all__ = [
    "AuditQuery",
    "Page",
    "QueueSummary",
    "ViewStatus",
    "WaitingTasks",
    "audit",
    "dead_letters",
    "queues",
    "status",
    "status_in",
    "task",
    "tasks",
]

T = TypeVar("T")
Key = tuple[str, str]

_TASK_FIELDS = ("task_id", "tenant", "queue", "task", "state", "priority", "attempts", "version", "worker",
                "correlation_id", "submitted_at", "ready_at", "started_at", "finished_at", "result", "error_type",
                "error", "traceback", "position")


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None
    """Pass as ``after`` to get the next page; ``None`` on the last page."""


@dataclass(frozen=True)
class QueueSummary:
    tenant: str
    queue: str
    counts: dict[str, int]
    oldest_waiting_seconds: float | None


_NEVER_BUILT = "the views do not exist yet: run `broker-q projections run` (or `broker-q run`) once"


def _generation(cursor: Cursor, view: str) -> int:
    cursor.execute(f"SELECT generation FROM {REGISTRY} WHERE name = ?", (view,))
    row = cursor.fetchone()
    if row is None:
        raise ValidationError(_NEVER_BUILT)
    return int(row[0])


def _query(database: ViewDatabase, view: str, work: Callable[[Cursor, int], T]) -> T:
    """Run ``work(cursor, live generation)`` in one read transaction.

    A rebuild may drop the tables of a generation that a query has just looked up (PostgreSQL reads
    the catalog afresh at each statement): the query then runs again on the new generation. On
    PostgreSQL the drop can also deadlock with a query that holds one of the tables and waits for
    another (the server then aborts one of the two): the query runs again too.
    """
    for attempt in range(3):
        try:
            with database.transaction(write=False) as cursor:
                return work(cursor, _generation(cursor, view))
        except StoreError as e:
            text = str(e)
            if REGISTRY in text:
                raise ValidationError(_NEVER_BUILT) from None
            if attempt == 2 or not ("no such table" in text or "does not exist" in text or "deadlock" in text):
                raise
    raise AssertionError("unreachable")


def queues(database: ViewDatabase, *, tenant: str | None = None, now: float | None = None) -> list[QueueSummary]:
    """Per tenant and queue: tasks in each state, and how long the oldest ready task has waited."""
    now = time.time() if now is None else now
    where, params = ("WHERE tenant = ?", [tenant]) if tenant else ("", [])

    def work(cursor: Cursor, generation: int) -> tuple[dict[Key, dict[str, int]], dict[Key, float]]:
        cursor.execute(f"SELECT tenant, queue, state, count FROM {table('queue_counts', generation)} {where} "
                       "ORDER BY tenant, queue, state", params)
        summaries: dict[tuple[str, str], dict[str, int]] = {}
        for row_tenant, queue, state, count in cursor.fetchall():
            if count:
                summaries.setdefault((row_tenant, queue), {})[state] = int(count)
        oldest: dict[tuple[str, str], float] = {}
        for row_tenant, queue in summaries:
            cursor.execute(f"SELECT MIN(ready_at) FROM {table('tasks', generation)} "
                           "WHERE tenant = ? AND queue = ? AND state = 'ready'", (row_tenant, queue))
            value = cursor.fetchone()[0]
            if value is not None:
                oldest[(row_tenant, queue)] = float(value)
        return summaries, oldest

    summaries, oldest = _query(database, "tasks", work)
    return [QueueSummary(t, q, counts, None if (t, q) not in oldest else max(0.0, now - oldest[(t, q)]))
            for (t, q), counts in summaries.items()]


class WaitingTasks:
    """How many tasks of a tenant wait (blocked, ready, or waiting for a retry or a breaker), from
    the queue view: what a tenant's ``max_waiting`` quota is checked against."""

    def __init__(self, store_url: str) -> None:
        self._database = open_view_database(store_url)

    def __call__(self, tenant: str) -> int:
        states = sorted(WAITING_STATES)

        def work(cursor: Cursor, generation: int) -> int:
            cursor.execute(f"SELECT COALESCE(SUM(count), 0) FROM {table('queue_counts', generation)} "
                           f"WHERE tenant = ? AND state IN ({', '.join('?' * len(states))})", [tenant, *states])
            return int(cursor.fetchone()[0])

        return _query(self._database, "tasks", work)

    def close(self) -> None:
        self._database.close()


def tasks(
    database: ViewDatabase,
    *,
    queue: str,
    state: str,
    tenant: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> Page:
    """Tasks of ``queue`` in ``state``, oldest first (by the time they became ready)."""
    conditions, params = ["queue = ?", "state = ?"], [queue, state]
    if tenant:
        conditions.append("tenant = ?")
        params.append(tenant)
    return _task_page(database, conditions, params, "ready_at", limit, after)


def dead_letters(database: ViewDatabase, *, tenant: str | None = None, task: str | None = None,
                 since: datetime | None = None, limit: int = 50, after: str | None = None) -> Page:
    """Tasks that will not run again by themselves, most recent first; ``task`` and ``since`` keep
    those of that task name, and those dead-lettered at ``since`` or later."""
    conditions = [f"state IN ({', '.join('?' * len(DEAD_STATES))})"]
    params: list[Any] = list(DEAD_STATES)
    if tenant:
        conditions.append("tenant = ?")
        params.append(tenant)
    if task is not None:
        conditions.append("task = ?")
        params.append(task)
    if since is not None:
        conditions.append("finished_at >= ?")
        params.append(since.timestamp())
    return _task_page(database, conditions, params, "finished_at", limit, after, descending=True)


def task(database: ViewDatabase, task_id: str) -> dict[str, Any] | None:
    """The task view's row of one task."""
    key = _task_key(task_id)

    def work(cursor: Cursor, generation: int) -> Any:
        cursor.execute(f"SELECT {', '.join(_TASK_FIELDS)} FROM {table('tasks', generation)} WHERE task_id = ?", (key,))
        return cursor.fetchone()

    row = _query(database, "tasks", work)
    return None if row is None else _task_row(row)


def _task_page(database: ViewDatabase, conditions: list[str], params: list[Any], order: str, limit: int,
               after: str | None, *, descending: bool = False) -> Page:
    if not 1 <= limit <= 1000:
        raise ValidationError("limit must be between 1 and 1000")
    comparison, direction = ("<", "DESC") if descending else (">", "ASC")
    if after:
        mark, task_id = _cursor(after)
        conditions.append(f"({order} {comparison} ? OR ({order} = ? AND task_id {comparison} ?))")
        params += [mark, mark, task_id]
    def work(cursor: Cursor, generation: int) -> list[Any]:
        cursor.execute(f"SELECT {', '.join(_TASK_FIELDS)} FROM {table('tasks', generation)} "
                       f"WHERE {' AND '.join(conditions)} ORDER BY {order} {direction}, task_id {direction} "
                       f"LIMIT ?", [*params, limit + 1])
        return cursor.fetchall()

    rows = _query(database, "tasks", work)
    items = [_task_row(row) for row in rows[:limit]]
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = f"{last[_TASK_FIELDS.index(order)]!r}/{last[0]}"
    return Page(items, following)


def _cursor(after: str) -> tuple[float, str]:
    mark, _, task_id = after.partition("/")
    try:
        return float(mark), task_id
    except ValueError:
        raise ValidationError(f"{after!r} is not a page cursor") from None


def _task_key(task_id: str) -> str:
    try:
        return uuid.UUID(task_id).hex
    except ValueError:
        raise ValidationError(f"{task_id!r} is not a task id") from None


def _iso(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()


def _task_row(row: Sequence[Any]) -> dict[str, Any]:
    item = dict(zip(_TASK_FIELDS, row, strict=True))
    item["id"] = str(uuid.UUID(item.pop("task_id")))
    for name in ("submitted_at", "ready_at", "started_at", "finished_at"):
        item[name] = _iso(item[name])
    item["result"] = None if item["result"] is None else json.loads(item["result"])
    return item


@dataclass(frozen=True)
class AuditQuery:
    tenant: str | None = None
    actor: str | None = None
    task: str | None = None
    types: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None


def audit(database: ViewDatabase, query: AuditQuery, *, limit: int = 100, after: int | None = None) -> list[
        dict[str, Any]]:
    """Audit records in log order, filtered; ``after`` is the last position already seen."""
    if not 1 <= limit <= 100_000:
        raise ValidationError("limit must be between 1 and 100000")
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in (("tenant", query.tenant), ("actor", query.actor)):
        if value:
            conditions.append(f"{column} = ?")
            params.append(value)
    if query.task:
        key = _task_key(query.task)
        conditions += ["task_key = ?", "task_id = ?"]
        params += [task_key(uuid.UUID(key)), key]
    if query.types:
        conditions.append(f"type IN ({', '.join('?' * len(query.types))})")
        params += list(query.types)
    if query.since:
        conditions.append("time >= ?")
        params.append(query.since.timestamp())
    if query.until:
        conditions.append("time <= ?")
        params.append(query.until.timestamp())
    if after is not None:
        conditions.append("position > ?")
        params.append(after)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    def work(cursor: Cursor, generation: int) -> list[Any]:
        cursor.execute(f"SELECT position, time, tenant, actor, stream_id, task_id, type, summary "
                       f"FROM {table('audit', generation)} {where} ORDER BY position LIMIT ?", [*params, limit])
        return cursor.fetchall()

    rows = _query(database, "audit", work)
    return [{"position": position, "time": _iso(at), "tenant": tenant, "actor": actor,
             "stream_id": str(uuid.UUID(stream_id)), "task_id": None if task_id is None else str(uuid.UUID(task_id)),
             "type": kind, "summary": text} for position, at, tenant, actor, stream_id, task_id, kind, text in rows]


@dataclass(frozen=True)
class ViewStatus:
    name: str
    generation: int
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    updated_at: str | None
    rebuilding: dict[str, int] | None = field(default=None)


def status(database: ViewDatabase, store: EventStore) -> list[ViewStatus]:
    """Each view's position, its lag behind the store (events and seconds) and its last update."""
    try:
        with database.transaction(write=False) as cursor:
            return status_in(cursor, store)
    except StoreError as e:
        if REGISTRY in str(e):
            raise ValidationError(_NEVER_BUILT) from None
        raise


def status_in(cursor: Cursor, store: EventStore) -> list[ViewStatus]:
    """:func:`status`, read with ``cursor`` (in the caller's transaction)."""
    cursor.execute(f"SELECT name, generation, position, updated_at, event_time, building, building_position "
                   f"FROM {REGISTRY} ORDER BY name")
    rows = cursor.fetchall()
    head = store.max_position()
    newest = None
    if head:
        last = store.read_log(head - 1, 1)
        newest = last[0].event.timestamp.timestamp() if last else None
    result = []
    for name, generation, position, updated_at, event_time, building, building_position in rows:
        behind = max(0, head - int(position)) if head else 0
        seconds = 0.0
        if behind and newest is not None:
            seconds = max(0.0, newest - (event_time or newest))
        result.append(ViewStatus(
            name, int(generation), int(position), head, behind, seconds, _iso(updated_at),
            None if building is None else {"generation": int(building), "position": int(building_position or 0)},
        ))
    return result
