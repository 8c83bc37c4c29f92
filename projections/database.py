"""The databases the views live in, beside the events: on an SQLite store a file per view beside the
store's file, on PostgreSQL the store's own schema, for a ``memory://`` store an in-memory SQLite
database of the process.

Each database holds the positions of its own views too, so that a view's rows and its position
commit in one transaction. An SQLite file has one writer at a time: with a file per view, each
view's runner applies its batches while the other's apply theirs (docs/decisions/0009).
PostgreSQL takes concurrent writers in one schema, so there the views share one database.

SQL is written once with ``?`` placeholders and the upsert syntax that SQLite (3.24+) and
PostgreSQL share (``INSERT ... ON CONFLICT ... DO UPDATE``); :class:`ViewDatabase` adapts the
placeholders. Driver errors become :class:`~broker_q.errors.StoreUnavailable` (retry later) or
:class:`~broker_q.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

from broker_q.errors import StoreError, StoreUnavailable
from broker_q.store.eventsourcing import store_environment

__all__ = ["Cursor", "ViewDatabase", "ViewDatabases", "open_view_database", "open_view_databases", "views_path"]


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class ViewDatabase:
    """Transactions on the database of some views, one connection, serialised by a lock."""

    def __init__(self, dialect: Literal["sqlite", "postgres"], connect: Any, views: Sequence[str],
                 lock: threading.RLock | None = None) -> None:
        self.dialect = dialect
        self.views = tuple(sorted(views))
        """The names of the views this handle is for (a runner on it applies these by default)."""
        self._connect = connect
        self._connection: Any = None
        self._lock = lock or threading.RLock()
        """Per connection: handles that share a connection (memory://) share its lock."""

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Cursor]:
        """A cursor in a transaction: committed on exit (rolled back if ``write`` is false, or on error).

        A writing transaction on SQLite takes the write lock at once (``BEGIN IMMEDIATE``), so two
        writers serialise at the start instead of failing at their first write.
        """
        with self._lock, _translated():
            connection = self._connection_()
            cursor = connection.cursor()
            try:
                if self.dialect == "sqlite":
                    cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield _Adapted(cursor, self.dialect)
            except BaseException:
                connection.rollback()
                raise
            else:
                if write:
                    connection.commit()
                else:
                    connection.rollback()

    def _connection_(self) -> Any:
        if self._connection is None:
            self._connection = self._connect()
        return self._connection

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


class _Adapted:
    """A DB-API cursor that takes ``?`` placeholders on either database."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._convert = dialect == "postgres"

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql) if self._convert else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cursor.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        if rows:
            return self._cursor.executemany(self._sql(sql), rows)
        return None

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> Any:
        return self._cursor.fetchone()


_PLACEHOLDER = re.compile(r"\?")
_CACHE_KIB = 65536
_CHECKPOINT_PAGES = 20000
_MEMORY_DATABASES: dict[str, tuple[sqlite3.Connection, threading.RLock]] = {}
_MEMORY_LOCK = threading.Lock()


def views_path(events_path: str, view: str) -> str:
    """The SQLite file of view ``view`` of the store in ``events_path``: ``x.sqlite`` -> ``x.views.tasks.sqlite``.

    Beside the events' file, not in it: SQLite has one writer per file, and view batches in the
    events' file would hold up every worker's appends while they commit (docs/decisions/0003). A
    file per view, because two views in one file wait for each other's batches (0009).
    """
    if not _VIEW_NAME.fullmatch(view):
        raise ValueError(f"{view!r} is not a view name")
    stem, dot, suffix = events_path.rpartition(".")
    return f"{stem}.views.{view}.{suffix}" if dot and "/" not in suffix else f"{events_path}.views.{view}"


_VIEW_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _set_wal(connection: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Put the file in WAL mode. Switching a new file needs it alone, and SQLite's busy timeout does
    not cover that: two processes opening a new views file at once saw "database is locked"."""
    deadline, pause = time.monotonic() + timeout, 0.01
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


class ViewDatabases:
    """The databases of some views of one store: :meth:`of` a view, or each database once (iterating).

    On an SQLite store each view has a database of its own; elsewhere the views share one.
    """

    def __init__(self, databases: Sequence[ViewDatabase]) -> None:
        self._databases = list(databases)
        self._of = {view: database for database in self._databases for view in database.views}

    def of(self, view: str) -> ViewDatabase:
        """The database that holds view ``view`` (``KeyError`` if it is none of these)."""
        return self._of[view]

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(sorted(self._of))

    def __iter__(self) -> Iterator[ViewDatabase]:
        return iter(self._databases)

    def __len__(self) -> int:
        return len(self._databases)

    def close(self) -> None:
        for database in self._databases:
            database.close()

    def __enter__(self) -> ViewDatabases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_view_databases(store_url: str, views: Iterable[str]) -> ViewDatabases:
    """The databases of ``views`` (names) of the store at ``store_url``, each opened lazily, on first use."""
    names = sorted(set(views))
    env = store_environment(store_url)
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.sqlite":
        return ViewDatabases([_sqlite_database(views_path(env["SQLITE_DBNAME"], name), name) for name in names])
    if module == "eventsourcing.postgres":
        return ViewDatabases([_postgres_database(env, names)])
    return ViewDatabases([_memory_database(store_url, names)])


def open_view_database(store_url: str, view: str) -> ViewDatabase:
    """The database of view ``view`` of the store at ``store_url`` (opened lazily, on first use)."""
    return open_view_databases(store_url, [view]).of(view)


def _sqlite_database(path: str, view: str) -> ViewDatabase:
    def connect() -> sqlite3.Connection:
        # Autocommit mode: every transaction is begun explicitly (see ViewDatabase.transaction).
        connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        _set_wal(connection)
        # Views can always be rebuilt from the events, and a view's rows and its position commit
        # together: after a power loss the views may be a few batches behind, never wrong. So
        # commits need not wait for the disk (one fsync per batch was a seventh of a catch-up).
        connection.execute("PRAGMA synchronous=NORMAL")
        # Task ids are random, so upserts into a large tasks table touch pages all over it: a
        # page cache of a fixed 64 MiB (not growing with the log) kept a 1M-event catch-up fast.
        connection.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        # A checkpoint copies the pages of the write-ahead log back into the file. The default
        # (every 1,000 pages) made the catch-up's commits write each index page again and again;
        # every 20,000 pages (80 MiB) halved their cost, and the log is cut back after each.
        connection.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
        connection.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_PAGES * 4096}")
        return connection

    return ViewDatabase("sqlite", connect, [view])


def _postgres_database(env: dict[str, str], views: Sequence[str]) -> ViewDatabase:
    def connect() -> Any:
        import psycopg

        return psycopg.connect(
            dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
            user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], connect_timeout=5,
            options=f"-c search_path={env['POSTGRES_SCHEMA']}",
        )

    return ViewDatabase("postgres", connect, views)


def _memory_database(store_url: str, views: Sequence[str]) -> ViewDatabase:
    # One in-memory database per store URL in this process, like the memory:// store itself; every
    # handle on it shares its one connection, and so its lock.
    with _MEMORY_LOCK:
        if store_url not in _MEMORY_DATABASES:
            _MEMORY_DATABASES[store_url] = (
                sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False), threading.RLock())
        connection, lock = _MEMORY_DATABASES[store_url]

    def connect() -> sqlite3.Connection:
        return _Unclosable(connection)  # type: ignore[return-value]

    return ViewDatabase("sqlite", connect, views, lock)


class _Unclosable:
    """An in-memory database lives as long as the process: closing a handle must not drop it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def cursor(self) -> sqlite3.Cursor:
        return self._connection.cursor()

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            raise StoreError(f"view database error: {e}") from e
        raise StoreUnavailable(f"view database unavailable: {e}") from e
    except sqlite3.Error as e:
        raise StoreError(f"view database error: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("psycopg"):
            import psycopg

            if isinstance(e, psycopg.OperationalError):
                raise StoreUnavailable(f"view database unavailable: {e}") from e
            if isinstance(e, psycopg.Error):
                raise StoreError(f"view database error: {e}") from e
        raise
