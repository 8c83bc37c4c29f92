"""The projection runner: applies the event log to the views, a batch per transaction.

For each batch the runner reads the views' positions under the write lock, applies to each view
the events past its position, and records the new positions, all in one transaction. So an event
is applied to a view exactly once, a crash loses at most the batch in flight (rolled back), a
restart resumes at the recorded position, and replaying from position 0 gives the same tables.

A rebuild fills the next generation of a view's tables beside the live one, from position 0, while
the live generation keeps answering queries; when the new generation has caught up, one transaction
makes it the live one and drops the old tables.

A runner applies the views of one database (:class:`~projections.database.ViewDatabase`): on an
SQLite store each view has a file of its own, and so a runner of its own (:func:`runners`), which
``broker-q projections run`` runs in a process of its own (:mod:`projections.supervisor`).

Positions (table ``bq_views``, in each database for the views it holds): ``generation`` and
``position`` of the live tables of each view, ``building`` and ``building_position`` of a rebuild
in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from broker_q.errors import StoreUnavailable
from broker_q.store.notify import watch_changes
from broker_q.store.port import EventStore, Recorded
from projections.database import Cursor, ViewDatabase, ViewDatabases
from projections.views import VIEWS, View, table

__all__ = ["ProjectionRunner", "ViewPosition", "runners"]

log = logging.getLogger(__name__)

REGISTRY = "bq_views"
BATCH_SIZE = 10_000
"""The most events a runner reads and applies in one transaction, unless told (see ProjectionRunner)."""
_SETUP_LOCK = 0x62715F7669657773  # "bq_views": serialises set-ups of views on PostgreSQL


@dataclass(frozen=True)
class ViewPosition:
    name: str
    generation: int
    position: int
    updated_at: float | None
    event_time: float | None
    """Timestamp of the last event applied (for the lag in seconds)."""
    building: int | None = None
    building_position: int | None = None


class ProjectionRunner:
    def __init__(
        self,
        store: EventStore,
        database: ViewDatabase,
        views: Sequence[View] | None = None,
        *,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        """Apply ``views`` (by default, every view ``database`` is for) to ``database``.

        ``batch_size``: the most events read and applied in one transaction. A catch-up of a
        million events on SQLite ran 10% faster at 10,000 than at 2,000 (each commit writes every
        index page its batch touched, and random task ids touch pages all over the indexes), for
        a fixed 12 MiB more at its peak. Following the log live, a batch is what arrived since the last."""
        self.store = store
        self.database = database
        self.views = list(views if views is not None else (VIEWS[name] for name in database.views))
        if elsewhere := sorted(v.name for v in self.views if v.name not in database.views):
            # Tables of a view in another view's file would be a second copy that nothing reads.
            raise ValueError(f"views {elsewhere} do not live in this database (it holds {list(database.views)})")
        self.batch_size = batch_size
        self.wakeup = asyncio.Event()
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, int, Future[list[Recorded]]] | None = None
        """The read of the batch after the last full one, started before that one was applied."""

    def close(self) -> None:
        """Stop the reader thread (a read in flight finishes first, its batch unused)."""
        self._ahead = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    # -- set-up and positions ------------------------------------------------------------------

    def setup(self) -> None:
        """Create the registry and the live tables of every view (idempotent)."""
        real = "DOUBLE PRECISION" if self.database.dialect == "postgres" else "REAL"
        with self.database.transaction() as cursor:
            if self.database.dialect == "postgres":
                # CREATE TABLE IF NOT EXISTS is not safe against itself on PostgreSQL: two processes
                # setting up at once can both try to create a table (a unique violation in its catalog).
                cursor.execute("SELECT pg_advisory_xact_lock(?)", (_SETUP_LOCK,))
            cursor.execute(f"""CREATE TABLE IF NOT EXISTS {REGISTRY} (
                name TEXT PRIMARY KEY, generation INTEGER NOT NULL, position BIGINT NOT NULL,
                updated_at {real}, event_time {real}, building INTEGER, building_position BIGINT)""")
            for view in self.views:
                cursor.execute(f"INSERT INTO {REGISTRY} (name, generation, position) VALUES (?, 1, 0) "
                               "ON CONFLICT (name) DO NOTHING", (view.name,))
                generation = self._positions(cursor)[view.name].generation
                view.create(cursor, generation, self.database.dialect)

    def positions(self) -> dict[str, ViewPosition]:
        with self.database.transaction(write=False) as cursor:
            return self._positions(cursor)

    def _positions(self, cursor: Cursor, *, lock: bool = False) -> dict[str, ViewPosition]:
        suffix = " FOR UPDATE" if lock and self.database.dialect == "postgres" else ""
        cursor.execute(f"SELECT name, generation, position, updated_at, event_time, building, building_position "
                       f"FROM {REGISTRY} ORDER BY name{suffix}")
        return {row[0]: ViewPosition(*row) for row in cursor.fetchall()}

    # -- following the log ----------------------------------------------------------------------

    def step(self) -> int:
        """Apply the next batch to every view that needs it; return how many events were read."""
        positions = self.positions()
        start = min(positions[v.name].position for v in self.views)
        batch = self._read(start)
        if not batch:
            return 0
        with self.database.transaction() as cursor:
            positions = self._positions(cursor, lock=True)
            for view in self.views:
                self._apply(cursor, view, positions[view.name], batch)
        return len(batch)

    def _read(self, start: int) -> list[Recorded]:
        """The batch after ``start``; after a full batch, the next one is read while this one is applied.

        Reading and decoding is Python, applying a batch is mostly SQLite (or the PostgreSQL server),
        which runs without the GIL: on two cores a catch-up overlaps the two. A batch read ahead is
        used only if the views' positions still start where it does (another runner may have moved
        them) and the batch size is the same, and its events pass the same position filter as any other batch.
        """
        ahead, self._ahead = self._ahead, None
        batch = ahead[2].result() if ahead is not None and ahead[:2] == (start, self.batch_size) else []
        if len(batch) < self.batch_size:
            # Short, so read at the log's head of then: read again, or events appended since would
            # wait for the next wake-up, and a catch-up would stop before the head of now.
            batch = self.store.read_log(start, self.batch_size)
        if len(batch) == self.batch_size:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="projections-read-ahead")
            after = batch[-1].position
            self._ahead = (after, self.batch_size, self._reader.submit(self.store.read_log, after, self.batch_size))
        return batch

    def _apply(self, cursor: Cursor, view: View, at: ViewPosition, batch: Sequence[Recorded]) -> None:
        part = [r for r in batch if r.position > at.position]
        if not part:
            return
        view.apply(cursor, at.generation, part)
        cursor.execute(f"UPDATE {REGISTRY} SET position = ?, updated_at = ?, event_time = ? "
                       f"WHERE name = ? AND generation = ?",
                       (part[-1].position, time.time(), part[-1].event.timestamp.timestamp(), view.name,
                        at.generation))

    def catch_up(self, *, progress: Callable[[int], None] | None = None) -> int:
        """Apply everything the log holds now; return how many events were read."""
        total = 0
        while n := self.step():
            total += n
            if progress is not None:
                progress(total)
        return total

    async def run(self, stop: asyncio.Event, *, store_url: str | None = None, poll_interval: float = 0.5) -> None:
        """Catch up, then follow the log until ``stop`` is set (woken by the store's change signal)."""
        await asyncio.to_thread(self.setup)
        watcher = asyncio.create_task(watch_changes(store_url, self.wakeup)) if store_url else None
        try:
            while not stop.is_set():
                self.wakeup.clear()
                if await asyncio.to_thread(self.step):
                    continue
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wakeup.wait())]
                try:
                    await asyncio.wait(waiters, timeout=poll_interval, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await asyncio.to_thread(self.close)

    # -- rebuilding -----------------------------------------------------------------------------

    def rebuild(self, name: str, *, progress: Callable[[int, int], None] | None = None) -> int:
        """Rebuild view ``name`` beside the live one and swap it in; return the events applied.

        ``progress(position, head)`` is called after each batch.
        """
        view = next((v for v in self.views if v.name == name), None)
        if view is None:
            raise KeyError(name)
        with self.database.transaction() as cursor:
            at = self._positions(cursor, lock=True)[name]
            if at.building is not None:
                self._drop(cursor, view, at.building)  # a rebuild that did not finish: start again
            building = at.generation + 1
            self._drop(cursor, view, building)
            view.create(cursor, building, self.database.dialect)
            cursor.execute(f"UPDATE {REGISTRY} SET building = ?, building_position = 0 WHERE name = ?",
                           (building, name))
        position, applied = 0, 0
        while True:
            batch = self._read(position)
            head = self.store.max_position()
            if len(batch) == self.batch_size:
                with self.database.transaction() as cursor:
                    view.apply(cursor, building, batch)
                    position = batch[-1].position
                    cursor.execute(f"UPDATE {REGISTRY} SET building_position = ? WHERE name = ?", (position, name))
                applied += len(batch)
                if progress is not None:
                    progress(position, head)
                continue
            with self.database.transaction() as cursor:
                # The last batches and the swap happen under the views' write lock, so no event can
                # be applied to the old generation after the new one has taken its place.
                while batch:
                    view.apply(cursor, building, batch)
                    applied += len(batch)
                    position = batch[-1].position
                    batch = self._read(position)
                replaced = self._swap(cursor, view, building, position)
            # Dropped in a transaction of its own, after the swap committed: a query that looked up the
            # old generation just before the swap finishes first, and one that finds its tables gone
            # runs again on the new generation (queries._query).
            for attempt in range(5):
                try:
                    with self.database.transaction() as cursor:
                        self._drop(cursor, view, replaced)
                    break
                except StoreUnavailable as e:
                    # PostgreSQL aborts one side of a deadlock with a query holding some of the tables.
                    if attempt == 4 or "deadlock" not in str(e):
                        raise
            if progress is not None:
                progress(position, max(head, position))
            return applied

    def _swap(self, cursor: Cursor, view: View, building: int, position: int) -> int:
        """Make generation ``building`` the live one; return the generation it replaced."""
        at = self._positions(cursor, lock=True)[view.name]
        event_time = None
        if position:
            last = self.store.read_log(position - 1, 1)
            event_time = last[0].event.timestamp.timestamp() if last else None
        cursor.execute(f"UPDATE {REGISTRY} SET generation = ?, position = ?, updated_at = ?, event_time = ?, "
                       f"building = NULL, building_position = NULL WHERE name = ?",
                       (building, position, time.time(), event_time, view.name))
        log.info("view %s: generation %d replaced generation %d at position %d", view.name, building,
                 at.generation, position)
        return at.generation

    def _drop(self, cursor: Cursor, view: View, generation: int) -> None:
        for base in view.tables:
            cursor.execute(f"DROP TABLE IF EXISTS {table(base, generation)}")


def runners(store: EventStore, databases: ViewDatabases, *, batch_size: int = BATCH_SIZE) -> list[ProjectionRunner]:
    """A runner for each database of ``databases``: between them, they apply every view once."""
    return [ProjectionRunner(store, database, batch_size=batch_size) for database in databases]
