"""Wake-ups when the store may hold new events, so that followers need not poll fast.

A follower (the relay, later the projections) reads the log after a wake-up and also every
``poll_interval`` regardless: the wake-up is for latency, the poll is the guarantee. Polling alone
would cost either latency or CPU: at 2 ms it burnt 15% of a core on an idle machine.

- PostgreSQL: ``LISTEN`` on the channel that ``eventsourcing`` notifies on every insert.
- SQLite (Linux): every broker_q process that commits to the file then writes one byte to the
  signal file beside it (``<database>-commits``, see :class:`CommitSignal`), and followers watch
  that file with inotify. (Watching the ``-wal`` file itself wakes followers before the commit is
  visible: SQLite writes the WAL, then syncs, then publishes the commit in shared memory.) This
  covers every process on the host, which is where an embedded SQLite store lives.
- Anything else: no wake-up; the follower polls.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
import sys
from pathlib import Path

from broker_q.store.eventsourcing import APP_NAME, store_environment

__all__ = ["CommitSignal", "signal_path", "watch_changes"]

log = logging.getLogger(__name__)

_IN_MODIFY = 0x00000002
_IN_CREATE = 0x00000100
_EVENT_HEADER = struct.Struct("iIII")


def signal_path(database: str) -> str:
    return f"{os.path.abspath(database)}-commits"


class CommitSignal:
    """Tells the followers of an SQLite store that a transaction has just committed."""

    def __init__(self, database: str) -> None:
        self._path = signal_path(database)
        self._fd: int | None = None

    def send(self) -> None:
        # Best effort: the followers also poll, so a lost signal costs latency, never an event.
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.pwrite(self._fd, b"\0", 0)
        except OSError as e:
            log.debug("commit signal not sent: %s", e)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def watch_changes(store_url: str, wakeup: asyncio.Event) -> None:
    """Set ``wakeup`` whenever the store at ``store_url`` may have changed, until cancelled.

    Returns at once when the store offers no way to be watched.
    """
    env = store_environment(store_url)
    module = env["PERSISTENCE_MODULE"]
    if module == "eventsourcing.sqlite" and sys.platform.startswith("linux"):
        await _watch_sqlite(Path(env["SQLITE_DBNAME"]), wakeup)
    elif module == "eventsourcing.postgres":
        await _listen_postgres(env, wakeup)


async def _watch_sqlite(path: Path, wakeup: asyncio.Event) -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        log.info("no inotify (errno %d): the relay will poll", ctypes.get_errno())
        return
    signal = Path(signal_path(str(path)))
    directory, names = signal.parent, {signal.name.encode()}
    try:
        mask = _IN_MODIFY | _IN_CREATE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            log.info("cannot watch %s (errno %d): the relay will poll", directory, ctypes.get_errno())
            return

        def on_readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                _, _, _, length = _EVENT_HEADER.unpack_from(data, offset)
                name = data[offset + _EVENT_HEADER.size:offset + _EVENT_HEADER.size + length].rstrip(b"\0")
                offset += _EVENT_HEADER.size + length
                if name in names:
                    wakeup.set()
                    return

        loop = asyncio.get_running_loop()
        loop.add_reader(fd, on_readable)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


async def _listen_postgres(env: dict[str, str], wakeup: asyncio.Event) -> None:
    import psycopg
    from psycopg import sql

    channel = f"{APP_NAME.lower()}_events"
    backoff = 0.5
    while True:
        try:
            connection = await psycopg.AsyncConnection.connect(
                dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
                user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], autocommit=True, connect_timeout=5,
            )
            async with connection:
                await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                backoff = 0.5
                wakeup.set()  # anything committed before LISTEN took effect is read now
                async for _ in connection.notifies():
                    wakeup.set()
        except psycopg.Error as e:
            log.warning("LISTEN on PostgreSQL interrupted (%s); polling until it is back", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
