"""The views: tables built only from events, a batch at a time.

Each view owns a set of tables whose names carry a *generation* (``bq_tasks_g1``...): a rebuild
fills the next generation beside the live one and swaps them when it has caught up (see
:mod:`projections.runner`). ``apply`` is given one batch of events in log order and a cursor inside
the transaction that also records the view's new position, so a batch is applied entirely or not
at all, and never twice.

- ``tasks``: one row per task (state, attempts, times, result or error), the counts of tasks per
  tenant, queue and state, the outcome counters and the duration histograms that the metrics
  expose. Dead letters are the rows of this table in the dead state, under an index of their own.
- ``audit``: one row per event (time, tenant, actor, task, type, summary), indexed for each filter.
"""

from __future__ import annotations

import bisect
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from broker_q.codec import dumps
from broker_q.domain.events import (
    AccessDenied,
    BreakerClosed,
    BreakerFailureRecorded,
    BreakerOpened,
    BreakerProbeStarted,
    IngressRejected,
    KeyRotated,
    KeysShredded,
    QuotaExceeded,
    TaskCancelled,
    TaskDeadLettered,
    TaskDeferred,
    TaskEvent,
    TaskReleased,
    TaskReplayed,
    TaskRetryScheduled,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
    TenantCreated,
    TenantQuotaSet,
    TokenIssued,
    TokenRevoked,
    WorkflowCancelled,
    WorkflowSubmitted,
)
from broker_q.store.port import Recorded
from projections.database import Cursor

__all__ = ["BUCKETS", "DEAD_STATES", "VIEWS", "WAITING_STATES", "AuditView", "TasksView", "View", "table", "task_key"]

BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                              300.0, 1800.0)
"""Upper bounds (seconds) of the duration histograms; one more bucket holds everything larger."""

DEAD_STATES = ("dead_lettered",)
"""States of tasks that will not run again by themselves and are kept as dead letters."""
WAITING_STATES = frozenset({"ready", "blocked", "retry_scheduled", "deferred"})
_WAITING = WAITING_STATES
"""States whose ``ready_at`` is when the task became ready, or is due: a start after it waited for it."""


def table(base: str, generation: int) -> str:
    return f"bq_{base}_g{generation}"


class View(Protocol):
    name: ClassVar[str]
    tables: ClassVar[tuple[str, ...]]

    def create(self, cursor: Cursor, generation: int, dialect: str) -> None: ...

    def apply(self, cursor: Cursor, generation: int, batch: Sequence[Recorded]) -> None: ...


_TASK_COLUMNS = ("task_id", "tenant", "queue", "task", "state", "priority", "attempts", "version", "worker",
                 "correlation_id", "submitted_at", "ready_at", "started_at", "finished_at", "result", "error_type",
                 "error", "traceback", "position")


class TasksView:
    """Tasks, queue counts, outcome counters and duration histograms."""

    name: ClassVar[str] = "tasks"
    tables: ClassVar[tuple[str, ...]] = ("tasks", "queue_counts", "outcomes", "durations")

    def create(self, cursor: Cursor, generation: int, dialect: str) -> None:
        real = "DOUBLE PRECISION" if dialect == "postgres" else "REAL"
        tasks, counts = table("tasks", generation), table("queue_counts", generation)
        outcomes, durations = table("outcomes", generation), table("durations", generation)
        cursor.execute(f"""CREATE TABLE IF NOT EXISTS {tasks} (
            task_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, queue TEXT NOT NULL, task TEXT NOT NULL,
            state TEXT NOT NULL, priority INTEGER NOT NULL, attempts INTEGER NOT NULL, version INTEGER NOT NULL,
            worker TEXT, correlation_id TEXT NOT NULL, submitted_at {real} NOT NULL, ready_at {real} NOT NULL,
            started_at {real}, finished_at {real}, result TEXT, error_type TEXT, error TEXT, traceback TEXT,
            position BIGINT NOT NULL)""")
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {tasks}_by_state ON {tasks} "
                       "(tenant, queue, state, ready_at, task_id)")
        dead = ", ".join(f"'{s}'" for s in DEAD_STATES)
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {tasks}_dead ON {tasks} (tenant, finished_at) "
                       f"WHERE state IN ({dead})")
        cursor.execute(f"""CREATE TABLE IF NOT EXISTS {counts} (
            tenant TEXT NOT NULL, queue TEXT NOT NULL, state TEXT NOT NULL, count BIGINT NOT NULL,
            PRIMARY KEY (tenant, queue, state))""")
        cursor.execute(f"""CREATE TABLE IF NOT EXISTS {outcomes} (
            tenant TEXT NOT NULL, queue TEXT NOT NULL, task TEXT NOT NULL, outcome TEXT NOT NULL,
            count BIGINT NOT NULL, PRIMARY KEY (tenant, queue, task, outcome))""")
        cursor.execute(f"""CREATE TABLE IF NOT EXISTS {durations} (
            metric TEXT NOT NULL, tenant TEXT NOT NULL, queue TEXT NOT NULL, bucket INTEGER NOT NULL,
            count BIGINT NOT NULL, total {real} NOT NULL, PRIMARY KEY (metric, tenant, queue, bucket))""")

    def apply(self, cursor: Cursor, generation: int, batch: Sequence[Recorded]) -> None:
        # Each task's id formatted once: formatting ids was a tenth of a catch-up.
        items = [(record, event, event.stream_id.hex) for record in batch
                 if isinstance(event := record.event, TaskEvent)]
        rows = self._load(cursor, table("tasks", generation), items)
        counts: Counter[tuple[str, str, str]] = Counter()
        outcomes: Counter[tuple[str, str, str, str]] = Counter()
        durations: dict[tuple[str, str, str, int], list[float]] = {}
        changed: dict[str, dict[str, Any]] = {}
        for record, event, task_id in items:
            ts = event.timestamp.timestamp()
            if isinstance(event, TaskSubmitted):
                if task_id in rows:
                    continue  # cannot happen in a valid log; never count a task twice
                due = event.due_at.timestamp() if event.due_at is not None else ts
                state = "blocked" if event.depends_on or due > ts else "ready"
                row: dict[str, Any] = {
                    "task_id": task_id, "tenant": event.tenant, "queue": event.queue, "task": event.task,
                    "state": state, "priority": event.priority, "attempts": 0, "version": event.version,
                    "worker": None, "correlation_id": str(event.correlation_id), "submitted_at": ts,
                    "ready_at": max(due, ts), "started_at": None, "finished_at": None, "result": None,
                    "error_type": None, "error": None, "traceback": None, "position": record.position,
                }
                rows[task_id] = changed[task_id] = row
                counts[(event.tenant, event.queue, state)] += 1
                continue
            found = rows.get(task_id)
            if found is None or event.version <= found["version"]:
                continue  # an event of a task this view never saw submitted, or already applied
            row = found
            old: str = row["state"]
            key: tuple[str, str] = (row["tenant"], row["queue"])
            if isinstance(event, TaskStarted):
                if old in _WAITING:  # a takeover of a started task waited for no queue
                    _observe(durations, "queue_wait", key, ts - row["ready_at"])
                row.update(state="started", attempts=event.attempt, worker=event.worker, started_at=ts)
            elif isinstance(event, TaskSucceeded):
                # A sealed result is kept sealed (its text, as a JSON string): a view never holds plaintext
                # of a sealed payload, and it is opened only on demand (broker_q.payloads.reveal).
                kept = event.result if event.sealed_result is None else event.sealed_result
                row.update(state="succeeded", finished_at=ts, result=dumps(kept).decode())
                _observe(durations, "run", key, ts - (row["started_at"] or ts))
                outcomes[(*key, row["task"], "succeeded")] += 1
            elif isinstance(event, (TaskRetryScheduled, TaskDeadLettered)):
                row.update(error_type=event.error_type, error=event.message, traceback=event.traceback)
                if isinstance(event, TaskRetryScheduled):
                    row.update(state="retry_scheduled", ready_at=event.due_at.timestamp())
                    outcomes[(*key, row["task"], "retried")] += 1
                else:
                    row.update(state="dead_lettered", finished_at=ts)
                    outcomes[(*key, row["task"], "dead_lettered")] += 1
                _observe(durations, "run", key, ts - (row["started_at"] or ts))
            elif isinstance(event, TaskDeferred):
                row.update(state="deferred", ready_at=event.due_at.timestamp())
                outcomes[(*key, row["task"], "deferred")] += 1
            elif isinstance(event, TaskReleased):
                # Due later (an eta after the submission, and after the release): still blocked, and
                # ready_at is that time already. Otherwise ready, even if the coordinator's clock
                # stamped the release before the submission (ready_at is the submission then).
                if not row["submitted_at"] < row["ready_at"] > ts:
                    row.update(state="ready", ready_at=ts)
                outcomes[(*key, row["task"], "released")] += 1
            elif isinstance(event, TaskReplayed):
                row.update(state="ready", ready_at=ts, finished_at=None)
                outcomes[(*key, row["task"], "replayed")] += 1
            elif isinstance(event, TaskCancelled):
                row.update(state="cancelled", finished_at=ts, error_type="Cancelled", error=event.reason)
                outcomes[(*key, row["task"], "cancelled")] += 1
            row.update(version=event.version, position=record.position)
            changed[task_id] = row
            if row["state"] != old:
                counts[(*key, old)] -= 1
                counts[(*key, row["state"])] += 1
        self._write(cursor, generation, changed, counts, outcomes, durations)

    def _load(self, cursor: Cursor, tasks_table: str,
              items: Sequence[tuple[Recorded, TaskEvent, str]]) -> dict[str, dict[str, Any]]:
        """The rows of the tasks of ``items`` (record, event, task id) that were submitted before them."""
        submitted = {task_id for _, event, task_id in items if isinstance(event, TaskSubmitted)}
        wanted = sorted({task_id for _, _, task_id in items} - submitted)
        rows: dict[str, dict[str, Any]] = {}
        columns = ", ".join(_TASK_COLUMNS)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            cursor.execute(f"SELECT {columns} FROM {tasks_table} WHERE task_id IN ({', '.join('?' * len(chunk))})",
                           chunk)
            for values in cursor.fetchall():
                row = dict(zip(_TASK_COLUMNS, values, strict=True))
                rows[row["task_id"]] = row
        return rows

    def _write(
        self,
        cursor: Cursor,
        generation: int,
        changed: dict[str, dict[str, Any]],
        counts: Counter[tuple[str, str, str]],
        outcomes: Counter[tuple[str, str, str, str]],
        durations: dict[tuple[str, str, str, int], list[float]],
    ) -> None:
        columns = ", ".join(_TASK_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _TASK_COLUMNS[1:])
        cursor.executemany(
            f"INSERT INTO {table('tasks', generation)} ({columns}) VALUES ({', '.join('?' * len(_TASK_COLUMNS))}) "
            f"ON CONFLICT (task_id) DO UPDATE SET {updates}",
            [tuple(row[c] for c in _TASK_COLUMNS) for row in changed.values()],
        )
        counts_table = table("queue_counts", generation)
        cursor.executemany(
            f"INSERT INTO {counts_table} (tenant, queue, state, count) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT (tenant, queue, state) DO UPDATE SET count = {counts_table}.count + excluded.count",
            # Every key the batch touched, zero deltas too: whether a row holds 0 or is missing must
            # not depend on where the batches split (a rebuild would differ from the live view).
            [(*key, delta) for key, delta in sorted(counts.items())],
        )
        outcomes_table = table("outcomes", generation)
        cursor.executemany(
            f"INSERT INTO {outcomes_table} (tenant, queue, task, outcome, count) VALUES (?, ?, ?, ?, ?) "
            f"ON CONFLICT (tenant, queue, task, outcome) DO UPDATE SET count = {outcomes_table}.count + excluded.count",
            [(*key, n) for key, n in sorted(outcomes.items())],
        )
        durations_table = table("durations", generation)
        cursor.executemany(
            f"INSERT INTO {durations_table} (metric, tenant, queue, bucket, count, total) VALUES (?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (metric, tenant, queue, bucket) DO UPDATE SET "
            f"count = {durations_table}.count + excluded.count, total = {durations_table}.total + excluded.total",
            [(*key, int(n), total) for key, (n, total) in sorted(durations.items())],
        )


def _observe(durations: dict[tuple[str, str, str, int], list[float]], metric: str, key: tuple[str, str],
             seconds: float) -> None:
    seconds = max(seconds, 0.0)  # clocks of different hosts may disagree by a little
    cell = durations.setdefault((metric, *key, bisect.bisect_left(BUCKETS, seconds)), [0.0, 0.0])
    cell[0] += 1
    cell[1] += seconds


_AUDIT_COLUMNS = ("position", "time", "tenant", "actor", "stream_id", "task_id", "type", "summary", "task_key")


def task_key(task_id: uuid.UUID) -> int:
    """The audit's index key of a task: its id's first 64 bits, as a signed integer.

    Indexing the 32-character ids themselves made the index four times larger, and since ids are
    random each insert touched a page of it anywhere: at a million events that index alone cost a
    third of the audit view's time. Queries match the full id as well, so a collision of keys can
    only cost a row read, never a wrong answer.
    """
    return (task_id.int >> 64) - (1 << 63)


class AuditView:
    """Every event as an audit record."""

    name: ClassVar[str] = "audit"
    tables: ClassVar[tuple[str, ...]] = ("audit",)

    def create(self, cursor: Cursor, generation: int, dialect: str) -> None:
        real = "DOUBLE PRECISION" if dialect == "postgres" else "REAL"
        # On SQLite only INTEGER PRIMARY KEY names the rowid itself; BIGINT would add an index.
        key = "BIGINT" if dialect == "postgres" else "INTEGER"
        audit = table("audit", generation)
        cursor.execute(f"""CREATE TABLE IF NOT EXISTS {audit} (
            position {key} PRIMARY KEY, time {real} NOT NULL, tenant TEXT NOT NULL, actor TEXT NOT NULL,
            stream_id TEXT NOT NULL, task_id TEXT, type TEXT NOT NULL, summary TEXT NOT NULL, task_key BIGINT)""")
        for name, columns in (("time", "time"), ("tenant", "tenant, time"), ("actor", "actor, time"),
                              ("task", "task_key"), ("type", "type, time")):
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {audit}_by_{name} ON {audit} ({columns})")

    def apply(self, cursor: Cursor, generation: int, batch: Sequence[Recorded]) -> None:
        cursor.executemany(
            f"INSERT INTO {table('audit', generation)} ({', '.join(_AUDIT_COLUMNS)}) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_audit_row(r.position, r.event) for r in batch],
        )


def _audit_row(position: int, event: Any) -> tuple[Any, ...]:
    stream = event.stream_id
    hex_id = stream.hex
    if isinstance(event, TaskEvent):
        return (position, event.timestamp.timestamp(), event.tenant, event.actor, hex_id, hex_id, event.TYPE,
                summary(event), (stream.int >> 64) - (1 << 63))  # task_key(), inline: once per event
    return (position, event.timestamp.timestamp(), event.tenant, event.actor, hex_id, None, event.TYPE,
            summary(event), None)


def summary(event: Any) -> str:
    """One line that says what the event means, for people reading the audit log."""
    match event:
        case TaskSubmitted():
            waits = "".join((f", after {len(event.depends_on)} parent(s)" if event.depends_on else "",
                             f", due {event.due_at.isoformat()}" if event.due_at is not None else ""))
            return f"submitted {event.task} to {event.queue} (priority {event.priority}{waits})"
        case TaskStarted():
            return f"attempt {event.attempt} started on {event.worker}"
        case TaskSucceeded():
            return "succeeded"
        case TaskRetryScheduled():
            late = " (timed out)" if event.timed_out else ""
            return f"retry at {event.due_at.isoformat()} after {event.error_type}{late}: {event.message}"[:500]
        case TaskDeadLettered():
            late = " (timed out)" if event.timed_out else ""
            return f"dead-lettered: {event.error_type}{late}: {event.message}"[:500]
        case TaskDeferred():
            return f"deferred to {event.due_at.isoformat()}: {event.reason}"[:500]
        case TaskReplayed():
            changed = ", ".join(name for name in ("args", "kwargs") if getattr(event, name) is not None)
            changed = "arguments (sealed)" if event.sealed_arguments is not None else changed
            return f"replayed{f' with new {changed}' if changed else ''}: {event.reason}"[:500]
        case TaskCancelled():
            return f"cancelled: {event.reason}"[:500]
        case TaskReleased():
            passed = event.args is not None or event.sealed_arguments is not None
            return f"released: every parent succeeded{' (results passed in)' if passed else ''}"
        case KeyRotated():
            return f"key {event.key_id} (generation {event.generation}) is now current"
        case KeysShredded():
            erased = ", ".join(event.key_ids) or "none left"
            return f"keys shredded ({erased}): payloads of this tenant can no longer be opened"[:500]
        case BreakerFailureRecorded():
            return f"breaker {event.service}: failure of task {event.task_id} ({event.error_type})"
        case BreakerOpened():
            until = event.until.isoformat() if event.until is not None else "closed by hand"
            forced = "forced " if event.forced else ""
            return f"breaker {event.service} {forced}open until {until}: {event.reason}"[:500]
        case BreakerProbeStarted():
            return f"breaker {event.service} half open: task {event.task_id} probes"
        case BreakerClosed():
            return f"breaker {event.service} {'forced ' if event.forced else ''}closed: {event.reason}"[:500]
        case IngressRejected():
            return f"refused a message for queue {event.queue!r}: {event.reason}"[:500]
        case WorkflowSubmitted():
            return f"workflow of {len(event.steps)} step(s) submitted"
        case WorkflowCancelled():
            return f"workflow cancelled: {event.reason}"[:500]
        case TokenIssued():
            expires = f", expires {event.expires_at.isoformat()}" if event.expires_at is not None else ""
            return f"token {event.name!r} ({event.token_id}) issued: {', '.join(event.roles)}{expires}"[:500]
        case TokenRevoked():
            return f"token {event.token_id} revoked: {event.reason}"[:500]
        case AccessDenied():
            return f"denied {event.principal}: {event.action} (needs {event.permission})"[:500]
        case TenantCreated():
            return f"tenant created{f': {event.description}' if event.description else ''}"[:500]
        case TenantQuotaSet():
            quotas = [f"{name}={value:g}" for name, value in (
                ("max_waiting", event.max_waiting), ("submit_rate", event.submit_rate),
                ("submit_burst", event.submit_burst), ("max_payload_bytes", event.max_payload_bytes))
                if value is not None]
            return f"quotas set: {', '.join(quotas) or 'none'}"
        case QuotaExceeded():
            return f"refused {event.task}: {event.message}"[:500]
    return str(event.TYPE)


VIEWS: dict[str, View] = {view.name: view for view in (TasksView(), AuditView())}
"""Every view, by name."""
