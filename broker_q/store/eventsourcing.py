"""The event store on the ``eventsourcing`` library's recorders: in memory, SQLite or PostgreSQL.

broker_q uses the library's persistence layer (its process recorder: one events table with a
notification log, plus a tracking table in the same database) and writes its own events through
:mod:`broker_q.codec`, not through the library's aggregates and mapper; ``docs/decisions/0001``
says why. The library's errors are translated here into broker_q's own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from eventsourcing.persistence import (
    ConnectionUnavailableError,
    InfrastructureFactory,
    IntegrityError,
    InterfaceError,
    OperationalError,
    PersistenceError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
)
from eventsourcing.utils import Environment

from broker_q.codec import decode_event, encode_event
from broker_q.domain.events import Event
from broker_q.errors import BrokerQError, ConcurrencyConflict, ConfigurationError, StoreError, StoreUnavailable
from broker_q.master_key import MasterKey
from broker_q.store.dependencies import Dependencies, MemoryDependencies, SQLDependencies
from broker_q.store.keys import Keyring, KeyTable, MemoryKeyTable, SQLKeyTable
from broker_q.store.port import AppendResult, Recorded
from broker_q.store.setup import SETUP_LOCK
from broker_q.store.timers import MemoryTimers, SQLTimers, Timer, Timers

if TYPE_CHECKING:
    from broker_q.store.notify import CommitSignal

__all__ = ["RecorderEventStore", "open_store", "store_environment"]

log = logging.getLogger(__name__)

APP_NAME = "BrokerQ"
"""Fixes the PostgreSQL table names (``brokerq_events``, ``brokerq_tracking``)."""


def store_environment(url: str) -> dict[str, str]:
    """The ``eventsourcing`` environment for a store URL.

    - ``memory://``: in-process, lost at exit (unit tests and trials);
    - ``sqlite:///relative/path.sqlite`` or ``sqlite:////absolute/path.sqlite``;
    - ``postgresql://user:password@host:port/dbname?schema=name`` (schema defaults to ``public``).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    if scheme == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ConfigurationError(f"store URL {url!r} names no file: use sqlite:///path/to/file.sqlite")
        # Stream ids come back as the stored text (32 hex digits), which parse_uuid reads at a fifth
        # of the cost of the library's uuid.UUID(text): a third of a raw read of the log. The
        # column is TEXT either way, so the file is the same.
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path, "SQLITE_LOCK_TIMEOUT": "30",
                "ORIGINATOR_ID_TYPE": "text"}
    if scheme in ("postgresql", "postgres"):
        query = parse_qs(parts.query)
        dbname = parts.path.lstrip("/")
        if not dbname or not parts.hostname:
            raise ConfigurationError(f"store URL {url!r} needs a host and a database: postgresql://user@host/db")
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(dbname),
            "POSTGRES_HOST": parts.hostname,
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            "POSTGRES_SCHEMA": query.get("schema", ["public"])[0],
            "POSTGRES_LOCK_TIMEOUT": "5",
            "POSTGRES_CONNECT_TIMEOUT": "5",
            "POSTGRES_POOL_SIZE": "5",
            "POSTGRES_MAX_OVERFLOW": "10",
        }
    raise ConfigurationError(f"unsupported store URL {url!r}: use memory://, sqlite:///path or postgresql://...")


def open_store(url: str, *, master_key: MasterKey | None = None) -> RecorderEventStore:
    """Open (and create if needed) the store at ``url``.

    ``master_key`` wraps the tenants' data keys (:attr:`RecorderEventStore.keys`). Without one, a
    ``memory://`` store makes a random one for its lifetime, an SQLite store uses (and on first use
    makes) ``<db>.master.key`` beside its file, and a PostgreSQL store refuses to hand out keys.
    """
    env = store_environment(url)
    postgres = env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    with _setting_up(env) if postgres else contextlib.nullcontext(), _translated():
        factory: InfrastructureFactory[Any] = InfrastructureFactory.construct(Environment(APP_NAME, env))
        recorder = factory.process_recorder()
    signal = None
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        from broker_q.store.notify import CommitSignal

        signal = CommitSignal(env["SQLITE_DBNAME"])
    return RecorderEventStore(factory, recorder, signal, master_key=lambda: _master_key(env, master_key))


def _master_key(env: dict[str, str], given: MasterKey | None) -> MasterKey:
    if given is not None:
        return given
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.popo":
        return MasterKey.generate()
    if module == "eventsourcing.sqlite":
        return MasterKey.at(env["SQLITE_DBNAME"] + ".master.key")
    raise ConfigurationError("a PostgreSQL store needs a master key: set BROKER_Q_MASTER_KEY (base64 of 32 bytes) "
                             "or BROKER_Q_MASTER_KEY_FILE")


@contextmanager
def _setting_up(env: dict[str, str]) -> Iterator[None]:
    """Create the store's schema if needed and hold the set-up lock (see ``SETUP_LOCK``) meanwhile."""
    schema = env["POSTGRES_SCHEMA"]
    try:
        import psycopg
        from psycopg import sql
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigurationError("a postgresql:// store needs: pip install 'broker_q[postgres]'") from e
    try:
        with psycopg.connect(
            dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
            user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], connect_timeout=5, autocommit=True,
        ) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK,))
            if schema != "public":
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            yield  # the lock goes with the connection
    except psycopg.OperationalError as e:
        raise StoreUnavailable(
            f"event store unavailable: cannot reach PostgreSQL at {env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}: "
            + " ".join(str(e).split())  # one line: the driver's message spans several
        ) from e


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except IntegrityError as e:
        raise ConcurrencyConflict(str(e)) from e
    except (OperationalError, InterfaceError, ConnectionUnavailableError) as e:
        raise StoreUnavailable(f"event store unavailable: {e}") from e
    except PersistenceError as e:
        raise StoreError(f"event store error: {e}") from e
    except OSError as e:
        raise StoreUnavailable(f"event store unavailable: {e}") from e


class RecorderEventStore:
    """:class:`~broker_q.store.port.EventStore` on an ``eventsourcing`` process recorder."""

    def __init__(
        self,
        factory: InfrastructureFactory[Any],
        recorder: ProcessRecorder,
        commit_signal: CommitSignal | None = None,
        *,
        master_key: Callable[[], MasterKey] = MasterKey.generate,
    ) -> None:
        self._factory = factory  # keeps the connection pool alive as long as the store
        self._recorder = recorder
        self._commit_signal = commit_signal
        """Tells followers of an SQLite store that a transaction committed (see broker_q.store.notify)."""
        self._timers: Timers | None = None
        self._dependencies: Dependencies | None = None
        self._keys: Keyring | None = None
        self._master_key = master_key
        """Called on the first use of a key only: a store that never seals makes no key file."""
        self._timers_lock = threading.Lock()

    @property
    def timers(self) -> Timers:
        """The scheduler's timers, in the same database as the events (:mod:`broker_q.store.timers`)."""
        with self._timers_lock:
            if self._timers is None:
                datastore = getattr(self._recorder, "datastore", None)
                with _translated():
                    if datastore is None:
                        self._timers = MemoryTimers()
                    elif hasattr(datastore, "schema"):
                        self._timers = _TranslatedTimers(
                            SQLTimers(datastore.transaction, "postgres", f"{datastore.schema}.brokerq_timers"))
                    else:
                        self._timers = _TranslatedTimers(SQLTimers(datastore.transaction, "sqlite", "brokerq_timers"))
            return self._timers

    @property
    def dependencies(self) -> Dependencies:
        """The coordinator's dependency edges, in the same database as the events
        (:mod:`broker_q.store.dependencies`)."""
        with self._timers_lock:
            if self._dependencies is None:
                datastore = getattr(self._recorder, "datastore", None)
                with _translated():
                    if datastore is None:
                        self._dependencies = MemoryDependencies()
                    elif hasattr(datastore, "schema"):
                        self._dependencies = _Translated(SQLDependencies(
                            datastore.transaction, "postgres", f"{datastore.schema}.brokerq_dependencies"))
                    else:
                        self._dependencies = _Translated(
                            SQLDependencies(datastore.transaction, "sqlite", "brokerq_dependencies"))
            return self._dependencies

    @property
    def keys(self) -> Keyring:
        """The tenants' data keys, wrapped under the master key, in the same database as the events
        (:mod:`broker_q.store.keys`)."""
        with self._timers_lock:
            if self._keys is None:
                datastore = getattr(self._recorder, "datastore", None)
                table: KeyTable
                with _translated():
                    if datastore is None:
                        table = MemoryKeyTable()
                    elif hasattr(datastore, "schema"):
                        table = _Translated(SQLKeyTable(datastore, "postgres", f"{datastore.schema}.brokerq_keys"))
                    else:
                        table = _Translated(SQLKeyTable(datastore, "sqlite", "brokerq_keys"))
                self._keys = Keyring(table, self._master_key)
            return self._keys

    def append(self, events: Sequence[Event]) -> list[int]:
        return self._insert([StoredEvent(e.stream_id, e.version, e.TOPIC, encode_event(e)) for e in events])

    def _insert(self, stored: Sequence[StoredEvent]) -> list[int]:
        with _translated():
            positions = self._recorder.insert_events(stored)
        if self._commit_signal is not None:
            self._commit_signal.send()
        return list(positions or ())

    def append_groups(self, groups: Sequence[Sequence[Event]]) -> list[AppendResult]:
        results: list[AppendResult] = [StoreError("not appended")] * len(groups)
        encoded: list[tuple[int, list[StoredEvent]]] = []
        for index, group in enumerate(groups):
            try:  # a group that cannot be encoded is refused alone, before any transaction
                encoded.append((index, [StoredEvent(e.stream_id, e.version, e.TOPIC, encode_event(e)) for e in group]))
            except BrokerQError as e:
                results[index] = e
        if encoded:
            self._insert_bisecting(encoded, results)
        return results

    def _insert_bisecting(self, indexed: list[tuple[int, list[StoredEvent]]], results: list[AppendResult]) -> None:
        # One transaction for all. If it is refused, halve and try each half, so that k refused
        # groups among n cost about k*log2(n) more transactions instead of n. A transaction that
        # could not be made at all (the store is unreachable) marks its groups StoreUnavailable,
        # never raises: groups committed by an earlier half must not be appended again by a retry.
        try:
            positions = self._insert([e for _, group in indexed for e in group])
        except StoreUnavailable as e:
            for index, _ in indexed:
                results[index] = e
            return
        except StoreError as e:
            if len(indexed) == 1:
                results[indexed[0][0]] = e
                return
            middle = len(indexed) // 2
            self._insert_bisecting(indexed[:middle], results)
            self._insert_bisecting(indexed[middle:], results)
            return
        offset = 0
        for index, group in indexed:
            results[index] = positions[offset:offset + len(group)]
            offset += len(group)

    def read_stream(self, stream_id: uuid.UUID, *, to_version: int | None = None,
                    after_version: int | None = None) -> list[Event]:
        with _translated():
            stored = self._recorder.select_events(stream_id, gt=after_version, lte=to_version)
        return [decode_event(s.originator_id, s.originator_version, s.topic, s.state) for s in stored]

    def read_log(self, after: int, limit: int, *, to_position: int | None = None,
                 decode: Container[str] | None = None) -> list[Recorded]:
        if limit <= 0:
            return []
        with _translated():
            notifications = self._recorder.select_notifications(
                start=after, limit=limit, stop=to_position, inclusive_of_start=False
            )
        return [
            Recorded(n.id, decode_event(n.originator_id, n.originator_version, n.topic, n.state), n.state)
            if decode is None or n.topic in decode else
            Recorded(n.id, data=n.state, stored=(n.originator_id, n.originator_version, n.topic))
            for n in notifications
        ]

    def max_position(self) -> int:
        with _translated():
            return self._recorder.max_notification_id() or 0

    def get_position(self, reader: str) -> int:
        with _translated():
            return self._recorder.max_tracking_id(reader) or 0

    def set_position(self, reader: str, position: int) -> None:
        if position <= self.get_position(reader):
            return
        with _translated():
            self._recorder.insert_tracking(Tracking(reader, position))

    def close(self) -> None:
        self._factory.close()
        if self._commit_signal is not None:
            self._commit_signal.close()


class _TranslatedTimers:
    """Timers whose database errors are broker_q's own (``StoreUnavailable`` may be retried)."""

    def __init__(self, timers: Timers) -> None:
        self._timers = timers

    def add(self, timers: Sequence[Timer]) -> None:
        with _translated_sql():
            self._timers.add(timers)

    def due(self, now: float, limit: int) -> list[Timer]:
        with _translated_sql():
            return self._timers.due(now, limit)

    def remove(self, keys: Sequence[str]) -> None:
        with _translated_sql():
            self._timers.remove(keys)

    def next_due(self) -> float | None:
        with _translated_sql():
            return self._timers.next_due()

    def count(self) -> int:
        with _translated_sql():
            return self._timers.count()


class _Translated:
    """An object of SQL of broker_q's whose database errors are broker_q's own."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def translated(*args: Any, **kwargs: Any) -> Any:
            with _translated_sql():
                return method(*args, **kwargs)

        return translated


@contextmanager
def _translated_sql() -> Iterator[None]:
    """The recorder's errors, and the drivers' own raised by SQL of broker_q's through its datastore."""
    import sqlite3

    with _translated():
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"event store error: {e}") from e
        except Exception as e:
            if type(e).__module__.startswith("psycopg"):
                import psycopg

                if isinstance(e, psycopg.OperationalError):
                    raise StoreUnavailable(f"event store unavailable: {e}") from e
                if isinstance(e, psycopg.Error):
                    raise StoreError(f"event store error: {e}") from e
            raise
