"""Tenants' data keys, wrapped under the master key, in a table of the store's own database.

Each tenant has a line of keys, one per generation: the highest generation is the current key,
with which new payloads are sealed; every older one still opens what it sealed. A key is stored
only wrapped (AES-GCM under the master key, bound to its tenant and key id), never in an event:
events are immutable and copied everywhere, while a row of this table can be erased, which is
what makes crypto-shredding possible (``docs/decisions/0008-payload-encryption.md``).

Processes agree without talking: the first key of a tenant and each rotation are inserts at the
next generation, and the unique (tenant, generation) decides which of two racing inserts counts.
The loser reads the winner's key, so processes agree on the current key, and two rotations that
start from the same current key make one new key between them, not two.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker_q.crypto import KEY_BYTES, NONCE_BYTES, associated_data, open_sealed, seal
from broker_q.errors import ConfigurationError, KeysShredded, UnknownKey
from broker_q.master_key import MasterKey
from broker_q.store.setup import OwnTable, row_values

__all__ = ["DataKey", "KeyTable", "Keyring", "MemoryKeyTable", "SQLKeyTable", "WrappedKey"]


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A row of the key table."""

    tenant: str
    generation: int
    """1, 2, ...: the highest is current. 0 is the marker a shredding leaves (no key)."""
    key_id: str
    wrapped: bytes | None
    """nonce | AES-GCM(master key, data key); None once shredded."""
    created_at: float
    shredded: bool


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r})"


class KeyTable(Protocol):
    def add(self, key: WrappedKey) -> None:
        """Store ``key``; nothing happens if its (tenant, generation) is taken (someone else won)."""
        ...

    def newest(self, tenant: str) -> WrappedKey | None:
        """The row of the highest generation of ``tenant``; None when it has none."""
        ...

    def find(self, tenant: str, key_id: str) -> WrappedKey | None: ...

    def rows(self, tenant: str) -> list[WrappedKey]:
        """Every row of ``tenant``, by generation (the shredding marker, generation 0, first)."""
        ...

    def shred(self, tenant: str, now: float) -> None:
        """Erase the wrapped bytes of every key of ``tenant`` and leave it marked as shredded."""
        ...


class MemoryKeyTable:
    """The key table of a ``memory://`` store: in this process, lost at exit like the store itself."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, int], WrappedKey] = {}
        self._lock = threading.Lock()

    def add(self, key: WrappedKey) -> None:
        with self._lock:
            self._rows.setdefault((key.tenant, key.generation), key)

    def newest(self, tenant: str) -> WrappedKey | None:
        with self._lock:
            rows = [row for (t, _), row in self._rows.items() if t == tenant]
        return max(rows, key=lambda row: row.generation, default=None)

    def find(self, tenant: str, key_id: str) -> WrappedKey | None:
        with self._lock:
            return next((r for (t, _), r in self._rows.items() if t == tenant and r.key_id == key_id), None)

    def rows(self, tenant: str) -> list[WrappedKey]:
        with self._lock:
            return sorted((r for (t, _), r in self._rows.items() if t == tenant), key=lambda row: row.generation)

    def shred(self, tenant: str, now: float) -> None:
        with self._lock:
            for (t, generation), row in list(self._rows.items()):
                if t == tenant:
                    self._rows[t, generation] = WrappedKey(t, generation, row.key_id, None, row.created_at, True)
            self._rows.setdefault((tenant, 0), WrappedKey(tenant, 0, "-", None, now, True))


class SQLKeyTable(OwnTable):
    """The key table in the store's SQLite file or PostgreSQL schema (``brokerq_keys``).

    On SQLite, shredding overwrites the freed bytes (``PRAGMA secure_delete``) and then checkpoints
    the write-ahead log with TRUNCATE, so the wrapped keys are neither in the file nor in the log
    afterwards. On PostgreSQL an erased value stays in the dead tuple until VACUUM reclaims it, and
    in WAL archives and backups for as long as they are kept: the master key, not the erasure, is
    what protects those copies.
    """

    def __init__(self, datastore: Any, dialect: str, table: str) -> None:
        self._datastore = datastore  # its connections too: shredding checkpoints the SQLite log
        real, blob = ("DOUBLE PRECISION", "BYTEA") if dialect == "postgres" else ("REAL", "BLOB")
        super().__init__(datastore.transaction, dialect, table, [
            f"CREATE TABLE IF NOT EXISTS {table} (tenant TEXT NOT NULL, generation INTEGER NOT NULL, "
            f"key_id TEXT NOT NULL, wrapped {blob}, created_at {real} NOT NULL, "
            "shredded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, generation))",
            f"CREATE UNIQUE INDEX IF NOT EXISTS brokerq_keys_by_id ON {table} (tenant, key_id)",
        ])

    _COLUMNS = "tenant, generation, key_id, wrapped, created_at, shredded"

    def add(self, key: WrappedKey) -> None:
        with self._cursor(commit=True) as cursor:
            cursor.execute(
                self._sql(f"INSERT INTO {self._table} ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT (tenant, generation) DO NOTHING"),
                (key.tenant, key.generation, key.key_id, key.wrapped, key.created_at, int(key.shredded)))

    def newest(self, tenant: str) -> WrappedKey | None:
        return self._one("WHERE tenant = ? ORDER BY generation DESC LIMIT 1", (tenant,))

    def find(self, tenant: str, key_id: str) -> WrappedKey | None:
        return self._one("WHERE tenant = ? AND key_id = ?", (tenant, key_id))

    def rows(self, tenant: str) -> list[WrappedKey]:
        with self._cursor(commit=False) as cursor:
            cursor.execute(self._sql(f"SELECT {self._COLUMNS} FROM {self._table} WHERE tenant = ? "
                                     "ORDER BY generation"), (tenant,))
            found = cursor.fetchall()
        return [_row(values) for values in found]

    def _one(self, where: str, params: tuple[Any, ...]) -> WrappedKey | None:
        with self._cursor(commit=False) as cursor:
            cursor.execute(self._sql(f"SELECT {self._COLUMNS} FROM {self._table} {where}"), params)
            row = cursor.fetchone()
        return None if row is None else _row(row)

    def shred(self, tenant: str, now: float) -> None:
        with self._cursor(commit=True) as cursor:
            if not self._postgres:
                cursor.execute("PRAGMA secure_delete = ON")
            try:
                cursor.execute(self._sql(f"UPDATE {self._table} SET wrapped = NULL, shredded = 1 WHERE tenant = ?"),
                               (tenant,))
                cursor.execute(self._sql(f"INSERT INTO {self._table} ({self._COLUMNS}) VALUES (?, 0, '-', NULL, ?, 1) "
                                         "ON CONFLICT (tenant, generation) DO NOTHING"), (tenant, now))
            finally:
                if not self._postgres:
                    cursor.execute("PRAGMA secure_delete = OFF")
        if not self._postgres:
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Copy the log into the file and empty it: its old frames hold the wrapped keys too."""
        with self._datastore.get_connection(commit=True) as connection:
            cursor = connection.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            busy = row_values(cursor.fetchone())[0]
        if busy:
            raise sqlite3.OperationalError(
                "the keys were shredded, but a reader kept the write-ahead log from being emptied: "
                "shred again when the store is idle to erase them from the log")


def _row(row: Any) -> WrappedKey:
    tenant, generation, key_id, wrapped, created_at, shredded = row_values(row)
    return WrappedKey(tenant, int(generation), key_id, wrapped, float(created_at), bool(shredded))


class Keyring:
    """The data keys of every tenant: the current one for sealing, any past one for opening.

    Unwrapped keys are kept in this process for ``cache_seconds``: a shredding elsewhere takes
    effect here within that time (at once in the process that shreds).
    """

    def __init__(self, table: KeyTable, master: Callable[[], MasterKey], *,
                 clock: Callable[[], float] = time.time, cache_seconds: float = 60.0) -> None:
        self._table = table
        self._master = master
        self._master_key: MasterKey | None = None
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._current: dict[str, tuple[float, DataKey]] = {}
        self._keys: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def current(self, tenant: str) -> DataKey:
        """The key to seal ``tenant``'s new payloads with, made on first use."""
        now = self._clock()
        with self._lock:
            cached = self._current.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        newest = self._table.newest(tenant)
        if newest is None:
            self._table.add(self._new(tenant, 1))
            newest = self._table.newest(tenant)
            assert newest is not None
        return self._as_current(tenant, self._unwrap(newest))

    def rotate(self, tenant: str) -> DataKey:
        """Make a new key current; payloads sealed under the older ones still open."""
        newest = self._table.newest(tenant)
        if newest is not None and newest.shredded:
            raise KeysShredded(tenant)
        self._table.add(self._new(tenant, 1 if newest is None else newest.generation + 1))
        latest = self._table.newest(tenant)
        assert latest is not None
        return self._as_current(tenant, self._unwrap(latest))

    def get(self, tenant: str, key_id: str) -> bytes:
        """The key ``key_id`` of ``tenant``: :class:`UnknownKey` or :class:`KeysShredded` if there is none."""
        now = self._clock()
        with self._lock:
            cached = self._keys.get((tenant, key_id))
        if cached is not None and cached[0] > now:
            return cached[1]
        row = self._table.find(tenant, key_id)
        if row is None:
            newest = self._table.newest(tenant)
            if newest is not None and newest.shredded:
                raise KeysShredded(tenant, key_id)
            raise UnknownKey(f"tenant {tenant!r} has no key {key_id!r}", key_id)
        return self._unwrap(row).key

    def shred(self, tenant: str) -> list[str]:
        """Erase every key of ``tenant``: its payloads can never be opened again, and none are sealed anew.

        Returns the ids of the keys erased now (none when they were shredded already).
        """
        erased = [row.key_id for row in self._table.rows(tenant) if not row.shredded]
        self._table.shred(tenant, self._clock())
        with self._lock:
            self._current.pop(tenant, None)
            for cached in [k for k in self._keys if k[0] == tenant]:
                del self._keys[cached]
        return erased

    def keys_of(self, tenant: str) -> list[WrappedKey]:
        """Every key of ``tenant``, oldest first, as stored (wrapped, or erased); the last one is current."""
        return [row for row in self._table.rows(tenant) if row.generation > 0]

    def is_cached(self, tenant: str, key_id: str | None = None) -> bool:
        """Whether sealing for ``tenant`` (or, given ``key_id``, opening under that key) needs no read of
        the key table now: a caller on an event loop can do it in place rather than in a thread."""
        now = self._clock()
        with self._lock:
            cached = self._current.get(tenant) if key_id is None else self._keys.get((tenant, key_id))
        return cached is not None and cached[0] > now

    def seal(self, tenant: str, task_id: str, plaintext: bytes) -> str:
        """``plaintext`` sealed under ``tenant``'s current key, bound to the task."""
        key = self.current(tenant)
        return seal(key.key_id, key.key, plaintext, associated_data(tenant, task_id))

    def open(self, tenant: str, task_id: str, sealed: str) -> bytes:
        """The plaintext of a value :meth:`seal` made for this tenant and task."""
        return open_sealed(sealed, lambda key_id: self.get(tenant, key_id), associated_data(tenant, task_id))

    def _new(self, tenant: str, generation: int) -> WrappedKey:
        # The random part keeps a key id from ever naming two keys, even after a restore from backup.
        key_id = f"k{generation}.{os.urandom(4).hex()}"
        nonce = os.urandom(NONCE_BYTES)
        wrapped = nonce + AESGCM(self._master_key_bytes()).encrypt(nonce, os.urandom(KEY_BYTES),
                                                                   _wrapping(tenant, key_id))
        return WrappedKey(tenant, generation, key_id, wrapped, self._clock(), False)

    def _unwrap(self, row: WrappedKey) -> DataKey:
        if row.shredded or row.wrapped is None:
            raise KeysShredded(row.tenant, row.key_id)
        master = self._master_key_bytes()
        try:
            key = AESGCM(master).decrypt(row.wrapped[:NONCE_BYTES], row.wrapped[NONCE_BYTES:],
                                         _wrapping(row.tenant, row.key_id))
        except InvalidTag:
            raise ConfigurationError(
                f"key {row.key_id!r} of tenant {row.tenant!r} does not open with the master key from "
                f"{self._master_key_origin()}: is it the master key this store was made with?") from None
        with self._lock:
            self._keys[row.tenant, row.key_id] = (self._clock() + self._cache_seconds, key)
        return DataKey(row.key_id, key)

    def _as_current(self, tenant: str, key: DataKey) -> DataKey:
        with self._lock:
            self._current[tenant] = (self._clock() + self._cache_seconds, key)
        return key

    def _master_key_bytes(self) -> bytes:
        if self._master_key is None:
            self._master_key = self._master()
        return self._master_key.key

    def _master_key_origin(self) -> str:
        return self._master_key.origin if self._master_key is not None else "?"


def _wrapping(tenant: str, key_id: str) -> bytes:
    """Binds a wrapped key to its row: copied to another tenant or key id, it does not unwrap."""
    return json.dumps(["key", tenant, key_id], separators=(",", ":")).encode()
