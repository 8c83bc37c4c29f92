"""Timers: the work messages of tasks that wait for a time, kept in the store's own database.

The scheduler (in the relay, see :mod:`broker_q.relay`) owns time. When it reads an event after
which a task waits (``retry_scheduled``, ``deferred``), it stores a timer: the work message to
publish and when. When the time comes it publishes the message, and only after RabbitMQ confirms it
removes the timer. So a waiting task costs a row on disk, not an unacknowledged message held by a
worker, and it survives a restart of every process.

Timers are derived from the log, so they need no transaction with it: adding the same timer twice
(the relay read the same page again after a crash) is a no-op, and publishing one twice (a crash
between the confirm and the removal) is a duplicate that workers refuse by its stream version.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker_q.store.setup import OwnTable, row_values

__all__ = ["MemoryTimers", "SQLTimers", "Timer", "Timers"]


@dataclass(frozen=True, slots=True)
class Timer:
    key: str
    """``<task id>:<version>``: one per waiting of a task, so a timer is stored once however often it is read."""
    due: float
    """When to publish, in seconds since the epoch."""
    queue: str
    """The route to publish to: the task's queue, or ``<queue>:<tenant>`` (``Topology.route``)."""
    priority: int
    body: bytes
    """The work message (``broker_q.wire.WorkMessage`` JSON)."""


class Timers(Protocol):
    def add(self, timers: Sequence[Timer]) -> None:
        """Store ``timers``; a timer whose key is stored already is left as it is."""
        ...

    def due(self, now: float, limit: int) -> list[Timer]:
        """Up to ``limit`` timers due at ``now`` or before, the earliest first."""
        ...

    def remove(self, keys: Sequence[str]) -> None: ...

    def next_due(self) -> float | None:
        """When the earliest timer is due; None when there is none."""
        ...

    def count(self) -> int: ...


class MemoryTimers:
    """Timers of a ``memory://`` store: in this process, lost at exit like the store itself."""

    def __init__(self) -> None:
        self._timers: dict[str, Timer] = {}
        self._lock = threading.Lock()

    def add(self, timers: Sequence[Timer]) -> None:
        with self._lock:
            for timer in timers:
                self._timers.setdefault(timer.key, timer)

    def due(self, now: float, limit: int) -> list[Timer]:
        with self._lock:
            return sorted((t for t in self._timers.values() if t.due <= now), key=lambda t: (t.due, t.key))[:limit]

    def remove(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._timers.pop(key, None)

    def next_due(self) -> float | None:
        with self._lock:
            return min((t.due for t in self._timers.values()), default=None)

    def count(self) -> int:
        with self._lock:
            return len(self._timers)


class SQLTimers(OwnTable):
    """Timers in a table of the store's SQLite file or PostgreSQL schema (``brokerq_timers``).

    ``transaction`` is the store's own (``eventsourcing``'s datastore): the table lives and is
    backed up with the events, and SQLite's single writer is shared, not contended by a second file.
    """

    def __init__(self, transaction: Any, dialect: str, table: str) -> None:
        real, blob = ("DOUBLE PRECISION", "BYTEA") if dialect == "postgres" else ("REAL", "BLOB")
        super().__init__(transaction, dialect, table, [
            f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, due {real} NOT NULL, "
            f"queue TEXT NOT NULL, priority INTEGER NOT NULL, body {blob} NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS brokerq_timers_by_due ON {table} (due, key)",
        ])

    def add(self, timers: Sequence[Timer]) -> None:
        if not timers:
            return
        with self._cursor(commit=True) as cursor:
            cursor.executemany(
                self._sql(f"INSERT INTO {self._table} (key, due, queue, priority, body) VALUES (?, ?, ?, ?, ?) "
                          "ON CONFLICT (key) DO NOTHING"),
                [(t.key, t.due, t.queue, t.priority, t.body) for t in timers],
            )

    def due(self, now: float, limit: int) -> list[Timer]:
        with self._cursor(commit=False) as cursor:
            cursor.execute(self._sql(f"SELECT key, due, queue, priority, body FROM {self._table} WHERE due <= ? "
                                     "ORDER BY due, key LIMIT ?"), (now, limit))
            rows = cursor.fetchall()
        return [Timer(*row_values(row)) for row in rows]

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._cursor(commit=True) as cursor:
            cursor.executemany(self._sql(f"DELETE FROM {self._table} WHERE key = ?"), [(k,) for k in keys])

    def next_due(self) -> float | None:
        with self._cursor(commit=False) as cursor:
            cursor.execute(f"SELECT MIN(due) AS due FROM {self._table}")
            row = cursor.fetchone()
        value = row_values(row)[0] if row is not None else None
        return None if value is None else float(value)

    def count(self) -> int:
        with self._cursor(commit=False) as cursor:
            cursor.execute(f"SELECT COUNT(*) AS n FROM {self._table}")
            row = cursor.fetchone()
        return int(row_values(row)[0])
