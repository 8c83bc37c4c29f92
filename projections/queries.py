"""Queries on the views: what the CLI shows and the HTTP API will serve.

Queries are given the views' databases (:class:`~projections.database.ViewDatabases`) and read the
database of the view they query. Every query runs in one read transaction that first looks up the
live generation of the view, so a rebuild swapping generations never shows a query half of each.
Pages are keyset-paginated: a page returns ``next``, the cursor to pass as ``after`` for the
following page.
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
from projections.database import Cursor, ViewDatabases, open_view_databases
from projections.runner import REGISTRY
from projections.views import DEAD_STATES, WAITING_STATES, table, task_key

__all__ = [
    "OUTCOME_TYPES",
    "Activity",
    "AuditQuery",
    "Page",
    "QueueSummary",
    "ViewStatus",
    "WaitingTasks",
    "activity",
    "audit",
    "dead_letters",
    "queues",
    "recent",
    "status",
    "status_in",
    "task",
    "tasks",
    "tasks_by_id",
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


def _query(databases: ViewDatabases, view: str, work: Callable[[Cursor, int], T]) -> T:
    """Run ``work(cursor, live generation)`` in one read transaction on the database of ``view``.

    A rebuild may drop the tables of a generation that a query has just looked up (PostgreSQL reads
    the catalog afresh at each statement): the query then runs again on the new generation. On
    PostgreSQL the drop can also deadlock with a query that holds one of the tables and waits for
    another (the server then aborts one of the two): the query runs again too.
    """
    database = databases.of(view)
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


def queues(databases: ViewDatabases, *, tenant: str | None = None, now: float | None = None) -> list[QueueSummary]:
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

    summaries, oldest = _query(databases, "tasks", work)
    return [QueueSummary(t, q, counts, None if (t, q) not in oldest else max(0.0, now - oldest[(t, q)]))
            for (t, q), counts in summaries.items()]


class WaitingTasks:
    """How many tasks of a tenant wait (blocked, ready, or waiting for a retry or a breaker), from
    the queue view: what a tenant's ``max_waiting`` quota is checked against."""

    def __init__(self, store_url: str) -> None:
        self._databases = open_view_databases(store_url, ["tasks"])

    def __call__(self, tenant: str) -> int:
        states = sorted(WAITING_STATES)

        def work(cursor: Cursor, generation: int) -> int:
            cursor.execute(f"SELECT COALESCE(SUM(count), 0) FROM {table('queue_counts', generation)} "
                           f"WHERE tenant = ? AND state IN ({', '.join('?' * len(states))})", [tenant, *states])
            return int(cursor.fetchone()[0])

        return _query(self._databases, "tasks", work)

    def close(self) -> None:
        self._databases.close()


def tasks(
    databases: ViewDatabases,
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
    return _task_page(databases, conditions, params, "ready_at", limit, after)


def dead_letters(databases: ViewDatabases, *, tenant: str | None = None, task: str | None = None,
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
    return _task_page(databases, conditions, params, "finished_at", limit, after, descending=True)


def task(databases: ViewDatabases, task_id: str) -> dict[str, Any] | None:
    """The task view's row of one task."""
    key = _task_key(task_id)

    def work(cursor: Cursor, generation: int) -> Any:
        cursor.execute(f"SELECT {', '.join(_TASK_FIELDS)} FROM {table('tasks', generation)} WHERE task_id = ?", (key,))
        return cursor.fetchone()

    row = _query(databases, "tasks", work)
    return None if row is None else _task_row(row)


def _task_page(databases: ViewDatabases, conditions: list[str], params: list[Any], order: str, limit: int,
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

    rows = _query(databases, "tasks", work)
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


def audit(databases: ViewDatabases, query: AuditQuery, *, limit: int = 100, after: int | None = None) -> list[
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

    rows = _query(databases, "audit", work)
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


def status(databases: ViewDatabases, store: EventStore) -> list[ViewStatus]:
    """Each view's position, its lag behind the store (events and seconds) and its last update."""
    found: list[ViewStatus] = []
    for database in databases:
        try:
            with database.transaction(write=False) as cursor:
                found += status_in(cursor, store, database.views)
        except StoreError as e:
            if REGISTRY in str(e):
                raise ValidationError(_NEVER_BUILT) from None
            raise
    return sorted(found, key=lambda view: view.name)


def status_in(cursor: Cursor, store: EventStore, views: Sequence[str]) -> list[ViewStatus]:
    """:func:`status` of ``views``, read with ``cursor`` (in the caller's transaction on their database)."""
    cursor.execute(f"SELECT name, generation, position, updated_at, event_time, building, building_position "
                   f"FROM {REGISTRY} WHERE name IN ({', '.join('?' * len(views))}) ORDER BY name", list(views))
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


# -- what happened lately (the dashboard's overview) ----------------------------------------------

OUTCOME_TYPES = ("succeeded", "retry_scheduled", "dead_lettered")
"""Event types that end an attempt: a success, or a failure (retried, or for good)."""
_WORKER_TYPES = ("started", *OUTCOME_TYPES)
"""Event types that a worker records as their actor."""


@dataclass(frozen=True)
class Activity:
    """Events per time slot, and the workers that recorded events, since a moment."""

    slots: list[dict[str, Any]]
    """Oldest first: ``start`` (epoch seconds) and the count of each of ``submitted`` and
    :data:`OUTCOME_TYPES` in the ``seconds`` after it (zero for a slot that saw none)."""
    workers: list[dict[str, Any]]
    """Most recently seen first: ``worker`` (its id), ``last_seen`` (ISO 8601), ``events``."""


def activity(databases: ViewDatabases, *, since: float, slot_seconds: int, slots: int,
             tenant: str | None = None) -> Activity:
    """Submissions and attempt outcomes per slot of ``slot_seconds`` from ``since`` (epoch seconds),
    and the workers seen since then, counted in the audit view (indexed by type and time)."""
    if not 1 <= slots <= 10_000 or slot_seconds < 1:
        raise ValidationError("slots must be between 1 and 10000, of at least one second each")
    until = since + slot_seconds * slots
    types = ("submitted", *OUTCOME_TYPES)
    scope, params = ("AND tenant = ?", [tenant]) if tenant else ("", [])

    def work(cursor: Cursor, generation: int) -> tuple[list[Any], list[Any]]:
        audit_table = table("audit", generation)
        cursor.execute(f"SELECT type, CAST((time - ?) / ? AS INTEGER) AS slot, COUNT(*) FROM {audit_table} "
                       f"WHERE type IN ({', '.join('?' * len(types))}) AND time >= ? AND time < ? {scope} "
                       "GROUP BY type, slot", [since, slot_seconds, *types, since, until, *params])
        counted = cursor.fetchall()
        cursor.execute(f"SELECT actor, MAX(time), COUNT(*) FROM {audit_table} "
                       f"WHERE type IN ({', '.join('?' * len(_WORKER_TYPES))}) AND time >= ? {scope} "
                       "GROUP BY actor ORDER BY MAX(time) DESC LIMIT 100", [*_WORKER_TYPES, since, *params])
        return counted, cursor.fetchall()

    counted, seen = _query(databases, "audit", work)
    table_of = [{"start": since + i * slot_seconds, **dict.fromkeys(types, 0)} for i in range(slots)]
    for kind, slot, count in counted:
        if 0 <= int(slot) < slots:
            table_of[int(slot)][kind] += int(count)
    return Activity(table_of, [{"worker": actor, "last_seen": _iso(last), "events": int(count)}
                               for actor, last, count in seen])


def recent(databases: ViewDatabases, *, type: str, tenant: str | None = None, limit: int = 50,
           before: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Audit records of one event type, newest first, and the cursor of the next (older) page
    (``None`` on the last page); each record's ``cursor`` starts a page after it. Read by the index
    on type (or tenant) and time."""
    if not 1 <= limit <= 1000:
        raise ValidationError("limit must be between 1 and 1000")
    conditions: list[str] = ["type = ?"]
    params: list[Any] = [type]
    if tenant:
        conditions.append("tenant = ?")
        params.append(tenant)
    if before:
        mark, _, position = before.partition("/")
        try:
            at, last = float(mark), int(position)
        except ValueError:
            raise ValidationError(f"{before!r} is not a page cursor") from None
        if not 0 <= last < 2**63:
            raise ValidationError(f"{before!r} is not a page cursor")
        conditions.append("(time < ? OR (time = ? AND position < ?))")
        params += [at, at, last]

    def work(cursor: Cursor, generation: int) -> list[Any]:
        cursor.execute(f"SELECT position, time, tenant, actor, stream_id, task_id, type, summary "
                       f"FROM {table('audit', generation)} WHERE {' AND '.join(conditions)} "
                       "ORDER BY time DESC, position DESC LIMIT ?", [*params, limit + 1])
        return cursor.fetchall()

    rows = _query(databases, "audit", work)
    records = [{"position": position, "time": _iso(at), "tenant": tenant_, "actor": actor,
                "stream_id": str(uuid.UUID(stream_id)),
                "task_id": None if task_id is None else str(uuid.UUID(task_id)), "type": kind, "summary": text,
                "cursor": f"{at!r}/{position}"}
               for position, at, tenant_, actor, stream_id, task_id, kind, text in rows[:limit]]
    return records, records[-1]["cursor"] if len(rows) > limit else None


def tasks_by_id(databases: ViewDatabases, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The task view's rows of these tasks (those it holds), by task id."""
    keys = [_task_key(task_id) for task_id in task_ids]

    def work(cursor: Cursor, generation: int) -> list[Any]:
        found: list[Any] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            cursor.execute(f"SELECT {', '.join(_TASK_FIELDS)} FROM {table('tasks', generation)} "
                           f"WHERE task_id IN ({', '.join('?' * len(chunk))})", chunk)
            found += cursor.fetchall()
        return found

    rows = [_task_row(row) for row in _query(databases, "tasks", work)] if keys else []
    return {row["id"]: row for row in rows}
