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

__all__ = ["hold_lease"]

log = logging.getLogger(__name__)

_MEMORY_LEASES: dict[str, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def hold_lease(store_url: str, name: str, *, retry_interval: float = 1.0) -> AsyncIterator[None]:
    """Wait until this process holds lease ``name`` on the store at ``store_url``, and hold it."""
    env = store_environment(store_url)
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.sqlite":
        path = os.path.abspath(env["SQLITE_DBNAME"])  # noqa: ASYNC240 - no I/O, a path computation
        async with _flock(f"{path}.{name}.lock", retry_interval):
            yield
    elif module == "eventsourcing.postgres":
        async with _advisory_lock(env, name, retry_interval):
            yield
    else:
        lock = _MEMORY_LEASES.setdefault(f"{store_url}#{name}", asyncio.Lock())
        async with lock:
            yield


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
async def _advisory_lock(env: dict[str, str], name: str, retry_interval: float) -> AsyncIterator[None]:
    import psycopg

    key = int.from_bytes(hashlib.sha256(f"broker_q:{env['POSTGRES_SCHEMA']}:{name}".encode()).digest()[:8], "big",
                         signed=True)
    connection = await psycopg.AsyncConnection.connect(
        dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], autocommit=True, connect_timeout=5,
    )
    async with connection:
        waiting = False
        while True:
            cursor = await connection.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            row = await cursor.fetchone()
            if row is not None and row[0]:
                break
            if not waiting:
                log.info("lease %s is held by another process: standing by", name)
                waiting = True
            await asyncio.sleep(retry_interval)
        yield
