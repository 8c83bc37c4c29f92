"""Leases: at most one active holder of a role (the relay) per store, however many processes run.

Two relays on one store would publish everything twice. That is safe (consumers dedupe by
version) but wasteful, so a relay first takes the store's ``relay`` lease and the others wait as
standbys; when the holder dies, its lease is released by the operating system or the database and a
standby takes over.

- PostgreSQL: a session advisory lock, held on a connection of its own (released when it closes).
- SQLite: an exclusive ``flock`` on ``<database>.<name>.lock`` beside the file (released when the
  process dies); an embedded SQLite store lives on one host, so a host-wide lock is enough.
- memory://: a lock in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator

from broker_q.store.eventsourcing import store_environment

__all__ = ["Lease", "hold_lease"]

log = logging.getLogger(__name__)

_MEMORY_LEASES: dict[str, str] = {}


class Lease:
    """A lease held; ``lost`` is set if it is lost while held (its database connection died)."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()


@contextlib.asynccontextmanager
async def hold_lease(store_url: str, name: str, *, retry_interval: float = 1.0) -> AsyncIterator[Lease]:
    """Wait until this process holds lease ``name`` on the store at ``store_url``, and hold it.

    The holder must stop acting as the holder when ``lease.lost`` is set: another process may hold
    the lease from then on.
    """
    env = store_environment(store_url)
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.sqlite":
        path = os.path.abspath(env["SQLITE_DBNAME"])  # noqa: ASYNC240 - no I/O, a path computation
        async with _flock(f"{path}.{name}.lock", retry_interval):
            yield Lease()
    elif module == "eventsourcing.postgres":
        async with _advisory_lock(env, name, retry_interval) as lease:
            yield lease
    else:
        key = f"{store_url}#{name}"
        while key in _MEMORY_LEASES:  # noqa: ASYNC110 - one process, tests only: polling is plenty
            await asyncio.sleep(retry_interval)
        _MEMORY_LEASES[key] = name
        try:
            yield Lease()
        finally:
            del _MEMORY_LEASES[key]


@contextlib.asynccontextmanager
async def _flock(path: str, retry_interval: float) -> AsyncIterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("lease %s is held by another process: standing by", path)
                    waiting = True
                await asyncio.sleep(retry_interval)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _advisory_lock(env: dict[str, str], name: str, retry_interval: float) -> AsyncIterator[Lease]:
    import psycopg

    key = int.from_bytes(hashlib.sha256(f"broker_q:{env['POSTGRES_SCHEMA']}:{name}".encode()).digest()[:8], "big",
                         signed=True)
    waiting = False
    while True:
        try:
            connection = await psycopg.AsyncConnection.connect(
                dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
                user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], autocommit=True, connect_timeout=5,
            )
            cursor = await connection.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            row = await cursor.fetchone()
        except psycopg.Error as e:
            log.warning("lease %s: PostgreSQL unavailable (%s); retrying", name, e)
            await asyncio.sleep(retry_interval)
            continue
        if row is not None and row[0]:
            break
        await connection.close()
        if not waiting:
            log.info("lease %s is held by another process: standing by", name)
            waiting = True
        await asyncio.sleep(retry_interval)
    lease = Lease()

    async def keep_alive() -> None:
        # The lock lives as long as its connection: if that dies, so does the lease.
        try:
            while True:
                await asyncio.sleep(retry_interval)
                await connection.execute("SELECT 1")
        except psycopg.Error as e:
            log.warning("lease %s lost: %s", name, e)
            lease.lost.set()

    watch = asyncio.create_task(keep_alive())
    try:
        yield lease
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        with contextlib.suppress(psycopg.Error):
            await connection.close()
