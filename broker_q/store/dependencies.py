"""Dependency edges: which blocked task waits for which parent, kept in the store's own database.

The coordinator (in the relay, see :mod:`broker_q.coordinator`) adds a task's edges when it reads
the task's ``submitted``, marks an edge done when it learns that the parent succeeded, and drops a
task's edges once the task is released or cancelled. So finding the dependants of the tasks that
just finished is one indexed query per page of the log, and a chord's callback with a thousand
parents is released by counting its open edges, not by reading a thousand streams at every
success.

Like timers, edges are derived from the log and need no transaction with it: adding an edge twice
is a no-op, marking one done twice too, and the events the coordinator appends are decided against
the tasks' streams with expected versions, so a page read twice cannot release or cancel twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from broker_q.store.setup import OwnTable, row_values

__all__ = ["Dependencies", "MemoryDependencies", "SQLDependencies"]


class Dependencies(Protocol):
    def add(self, edges: Sequence[tuple[str, str, bool]]) -> None:
        """Store ``(parent, child, done)`` edges; an edge stored already keeps its ``done`` unless this one is."""
        ...

    def children(self, parents: Sequence[str]) -> list[tuple[str, str]]:
        """The ``(parent, child)`` edges of these parents."""
        ...

    def mark_done(self, parents: Sequence[str]) -> None:
        """Record that these parents succeeded."""
        ...

    def open_parents(self, children: Sequence[str]) -> dict[str, int]:
        """For each child, how many of its edges are not done (children with none are left out)."""
        ...

    def with_edges(self, children: Sequence[str]) -> set[str]:
        """The children among these that have any edge stored, done or not: the dependants the
        coordinator has registered and not yet released or cancelled."""
        ...

    def remove_children(self, children: Sequence[str]) -> None: ...

    def any(self) -> bool: ...


class MemoryDependencies:
    """Edges of a ``memory://`` store: in this process, lost at exit like the store itself."""

    def __init__(self) -> None:
        self._edges: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def add(self, edges: Sequence[tuple[str, str, bool]]) -> None:
        with self._lock:
            for parent, child, done in edges:
                self._edges[(parent, child)] = self._edges.get((parent, child), False) or done

    def children(self, parents: Sequence[str]) -> list[tuple[str, str]]:
        wanted = set(parents)
        with self._lock:
            return sorted(edge for edge in self._edges if edge[0] in wanted)

    def mark_done(self, parents: Sequence[str]) -> None:
        wanted = set(parents)
        with self._lock:
            for edge in self._edges:
                if edge[0] in wanted:
                    self._edges[edge] = True

    def open_parents(self, children: Sequence[str]) -> dict[str, int]:
        wanted = set(children)
        counts: dict[str, int] = {}
        with self._lock:
            for (_, child), done in self._edges.items():
                if child in wanted and not done:
                    counts[child] = counts.get(child, 0) + 1
        return counts

    def with_edges(self, children: Sequence[str]) -> set[str]:
        wanted = set(children)
        with self._lock:
            return {child for _, child in self._edges if child in wanted}

    def remove_children(self, children: Sequence[str]) -> None:
        wanted = set(children)
        with self._lock:
            for edge in [e for e in self._edges if e[1] in wanted]:
                del self._edges[edge]

    def any(self) -> bool:
        with self._lock:
            return bool(self._edges)


class SQLDependencies(OwnTable):
    """Edges in a table of the store's SQLite file or PostgreSQL schema (``brokerq_dependencies``)."""

    def __init__(self, transaction: Any, dialect: str, table: str) -> None:
        index = table.rsplit(".", 1)[-1]
        super().__init__(transaction, dialect, table, [
            f"CREATE TABLE IF NOT EXISTS {table} (parent TEXT NOT NULL, child TEXT NOT NULL, "
            "done INTEGER NOT NULL, PRIMARY KEY (parent, child))",
            f"CREATE INDEX IF NOT EXISTS {index}_by_child ON {table} (child, done)",
        ])

    def add(self, edges: Sequence[tuple[str, str, bool]]) -> None:
        if not edges:
            return
        with self._cursor(commit=True) as cursor:
            cursor.executemany(
                self._sql(f"INSERT INTO {self._table} AS edge (parent, child, done) VALUES (?, ?, ?) "
                          "ON CONFLICT (parent, child) DO UPDATE SET done = edge.done | excluded.done"),
                [(parent, child, int(done)) for parent, child, done in edges],
            )

    def children(self, parents: Sequence[str]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        with self._cursor(commit=False) as cursor:
            for chunk in _chunks(parents):
                cursor.execute(self._sql(f"SELECT parent, child FROM {self._table} WHERE parent IN "
                                         f"({', '.join('?' * len(chunk))})"), chunk)
                found += [row_values(row) for row in cursor.fetchall()]
        return sorted(found)

    def mark_done(self, parents: Sequence[str]) -> None:
        if not parents:
            return
        with self._cursor(commit=True) as cursor:
            cursor.executemany(self._sql(f"UPDATE {self._table} SET done = 1 WHERE parent = ?"),
                               [(p,) for p in parents])

    def open_parents(self, children: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._cursor(commit=False) as cursor:
            for chunk in _chunks(children):
                cursor.execute(self._sql(f"SELECT child, COUNT(*) AS n FROM {self._table} WHERE done = 0 AND child IN "
                                         f"({', '.join('?' * len(chunk))}) GROUP BY child"), chunk)
                counts.update(row_values(row) for row in cursor.fetchall())
        return counts

    def with_edges(self, children: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self._cursor(commit=False) as cursor:
            for chunk in _chunks(children):
                cursor.execute(self._sql(f"SELECT DISTINCT child FROM {self._table} WHERE child IN "
                                         f"({', '.join('?' * len(chunk))})"), chunk)
                found.update(row_values(row)[0] for row in cursor.fetchall())
        return found

    def remove_children(self, children: Sequence[str]) -> None:
        if not children:
            return
        with self._cursor(commit=True) as cursor:
            cursor.executemany(self._sql(f"DELETE FROM {self._table} WHERE child = ?"), [(c,) for c in children])

    def any(self) -> bool:
        with self._cursor(commit=False) as cursor:
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {self._table}) AS found")
            row = cursor.fetchone()
        return bool(row_values(row)[0])


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start:start + size])
