"""What every table of broker_q's own beside the events shares (timers, dependency edges, keys)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["SETUP_LOCK", "OwnTable", "row_values"]

SETUP_LOCK = 0x62726F6B65727121
"""PostgreSQL advisory lock held while tables are created: ``CREATE ... IF NOT EXISTS`` is not safe
against itself, and two processes opening a new store at once failed on the catalog's unique keys."""


class OwnTable:
    """A table in the store's SQLite file or PostgreSQL schema, used through the store's own
    transactions (``eventsourcing``'s datastore): it lives and is backed up with the events, and
    SQLite's single writer is shared, not contended by a second file."""

    def __init__(self, transaction: Any, dialect: str, table: str, create: Sequence[str]) -> None:
        """``create``: the statements that create the table and its indexes if they do not exist."""
        self._transaction = transaction
        self._postgres = dialect == "postgres"
        self._table = table
        with self._cursor(commit=True) as cursor:
            if self._postgres:  # CREATE ... IF NOT EXISTS is not safe against itself on PostgreSQL
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
            for statement in create:
                cursor.execute(statement)

    @contextmanager
    def _cursor(self, *, commit: bool) -> Iterator[Any]:
        with self._transaction(commit=commit) as cursor:
            yield cursor

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql


def row_values(row: Any) -> tuple[Any, ...]:
    """A row as a tuple: psycopg's rows here are dicts, sqlite3's are tuples; BYTEA comes back as memoryview."""
    values = tuple(row.values()) if isinstance(row, dict) else tuple(row)
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in values)
