"""Group commit: the appends of every in-flight task share one transaction.

``eventsourcing`` has no async API and commits one transaction per call; a transaction costs about
the same for 1 event as for 100 (6x on SQLite, 14x on PostgreSQL, measured). The writer therefore
queues the appends that coroutines ask for while a commit is running, and commits them all in the
next transaction, in one dedicated thread. Each request stays all-or-nothing on its own: a conflict
in one is isolated (see :meth:`EventStore.append_groups`) and raised to that caller alone.

While the store is unreachable the writer retries with a capped backoff and keeps the requests
waiting, so a worker never acknowledges a message whose events are not committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from broker_q.domain.events import Event
from broker_q.errors import StoreUnavailable
from broker_q.store.port import AppendResult, EventStore

__all__ = ["GroupCommitWriter"]

log = logging.getLogger(__name__)


class GroupCommitWriter:
    def __init__(self, store: EventStore, *, retry_unavailable: bool = True, max_backoff: float = 5.0) -> None:
        self._store = store
        self._retry_unavailable = retry_unavailable
        self._max_backoff = max_backoff
        self._pending: list[tuple[Sequence[Event], asyncio.Future[list[int]]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker_q-writer")
        self._closed = False
        self._closing = False
        self.transactions = 0
        """How many commits the writer made (for tests and benchmarks)."""

    async def append(self, events: Sequence[Event]) -> list[int]:
        """Append ``events`` atomically with whatever else is pending; return their positions.

        Raises :class:`~broker_q.errors.ConcurrencyConflict` if any of them lost its version race.
        """
        if self._closed:
            raise StoreUnavailable("the writer is closed")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[Sequence[Event], asyncio.Future[list[int]]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                backoff = 0.05
                while batch:
                    try:
                        results: list[AppendResult] = await loop.run_in_executor(
                            self._executor, self._store.append_groups, [events for events, _ in batch])
                    except StoreUnavailable as e:  # nothing was appended
                        results = [e] * len(batch)
                    self.transactions += 1
                    retry: list[tuple[Sequence[Event], asyncio.Future[list[int]]]] = []
                    for (events, future), result in zip(batch, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, StoreUnavailable) and self._retry_unavailable and not self._closing:
                            retry.append((events, future))  # only these: the others are decided
                        elif isinstance(result, Exception):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
                    batch = retry
                    if batch:
                        log.warning("event store unavailable, retrying %d append(s) in %.2fs", len(batch), backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, self._max_backoff)
        except BaseException as e:
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(e)
            self._pending = []
            raise
        finally:
            self._flushing = None

    async def close(self) -> None:
        """Commit what is pending (what the store refuses as unavailable fails), then stop the thread."""
        self._closing = True
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
        self._closed = True
        self._executor.shutdown(wait=True)
