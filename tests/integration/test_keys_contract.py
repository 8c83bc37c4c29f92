"""The keyring's contract (``broker_q/store/keys.py``), run against every store.

``store_url`` runs each test on the ``keys`` of a memory:// store (``MemoryKeyTable``), of a real
SQLite file and of a real PostgreSQL schema (``SQLKeyTable``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker_q.errors import ConfigurationError, KeysShredded, PayloadCorrupted, UnknownKey
from broker_q.master_key import MasterKey
from broker_q.store import RecorderEventStore, open_store
from broker_q.store.keys import Keyring

MASTER = MasterKey(bytes(range(32)), "test")
TASK = "ab" * 16
SECRET = b'{"args":["the plaintext nobody may read"]}'


@pytest.fixture
def store(store_url: str) -> Iterator[RecorderEventStore]:
    opened = open_store(store_url, master_key=MASTER)
    yield opened
    opened.close()


@pytest.fixture
def keys(store: RecorderEventStore) -> Keyring:
    return store.keys


def test_the_first_key_is_made_on_demand_and_stays_current(keys: Keyring) -> None:
    first = keys.current("acme")
    assert len(first.key) == 32
    assert keys.current("acme") == first
    assert keys.get("acme", first.key_id) == first.key
    assert keys.current("other").key != first.key
    assert first.key_id not in repr(first.key)
    assert "key=" not in repr(first)


def test_seal_and_open_through_the_keyring(keys: Keyring) -> None:
    sealed = keys.seal("acme", TASK, SECRET)
    assert keys.open("acme", TASK, sealed) == SECRET
    with pytest.raises(PayloadCorrupted):
        keys.open("acme", "cd" * 16, sealed)
    with pytest.raises(UnknownKey):  # the other tenant has no key of that id
        keys.open("other", TASK, sealed)


def test_rotation_makes_a_new_current_key_and_old_values_still_open(keys: Keyring) -> None:
    old = keys.current("acme")
    sealed_before = keys.seal("acme", TASK, SECRET)
    new = keys.rotate("acme")
    assert new.key_id != old.key_id
    assert new.key != old.key
    assert keys.current("acme") == new
    assert keys.get("acme", old.key_id) == old.key
    assert keys.open("acme", TASK, sealed_before) == SECRET
    sealed_after = keys.seal("acme", TASK, SECRET)
    assert sealed_after.split(":")[1] == new.key_id
    assert keys.rotate("acme").key_id not in (old.key_id, new.key_id)


def test_rotating_a_tenant_without_keys_makes_its_first(keys: Keyring) -> None:
    made = keys.rotate("fresh")
    assert keys.current("fresh") == made


def test_an_unknown_key_id_is_named(keys: Keyring) -> None:
    keys.current("acme")
    with pytest.raises(UnknownKey, match=r"'k9\.00000000'") as caught:
        keys.get("acme", "k9.00000000")
    assert caught.value.key_id == "k9.00000000"


def test_shredding_makes_every_payload_of_the_tenant_unreadable(keys: Keyring) -> None:
    sealed = keys.seal("acme", TASK, SECRET)
    keys.rotate("acme")
    sealed_rotated = keys.seal("acme", TASK, SECRET)
    kept = keys.seal("other", TASK, SECRET)
    keys.shred("acme")
    for value in (sealed, sealed_rotated):
        with pytest.raises(KeysShredded, match="keys of tenant 'acme' were shredded") as caught:
            keys.open("acme", TASK, value)
        assert "plaintext" not in str(caught.value)
    with pytest.raises(KeysShredded):
        keys.current("acme")
    with pytest.raises(KeysShredded):
        keys.rotate("acme")
    assert keys.open("other", TASK, kept) == SECRET
    keys.shred("acme")  # twice is fine


def test_the_keys_of_a_tenant_are_listed_oldest_first_and_the_shredding_names_those_it_erased(
        keys: Keyring) -> None:
    assert keys.keys_of("acme") == []
    first = keys.current("acme")
    second = keys.rotate("acme")
    keys.current("other")
    listed = keys.keys_of("acme")
    assert [(row.generation, row.key_id, row.shredded) for row in listed] == [
        (1, first.key_id, False), (2, second.key_id, False)]
    assert all(row.wrapped is not None and first.key not in row.wrapped for row in listed)
    assert listed[0].created_at <= listed[1].created_at
    assert keys.shred("acme") == [first.key_id, second.key_id]
    assert [(row.key_id, row.wrapped, row.shredded) for row in keys.keys_of("acme")] == [
        (first.key_id, None, True), (second.key_id, None, True)]
    assert keys.shred("acme") == []  # erased already
    assert [row.generation for row in keys.keys_of("other")] == [1]


def test_a_keyring_says_when_sealing_or_opening_needs_no_read_of_the_table(store: RecorderEventStore) -> None:
    now = [1000.0]
    keys = Keyring(store.keys._table, lambda: MASTER, clock=lambda: now[0], cache_seconds=60)
    assert not keys.is_cached("acme")
    sealed = keys.seal("acme", TASK, SECRET)
    key_id = sealed.split(":")[1]
    assert keys.is_cached("acme")
    assert keys.is_cached("acme", key_id)
    assert not keys.is_cached("acme", "k9.00000000")
    assert not keys.is_cached("other")
    now[0] += 61
    assert not keys.is_cached("acme")
    assert not keys.is_cached("acme", key_id)


def test_shredding_a_tenant_that_never_had_keys_keeps_it_from_getting_any(keys: Keyring) -> None:
    keys.shred("ghost")
    with pytest.raises(KeysShredded):
        keys.current("ghost")


def test_a_shredding_elsewhere_reaches_a_keyring_when_its_cache_expires(store: RecorderEventStore) -> None:
    now = [1000.0]
    table = store.keys._table  # the same table, seen by a second process's keyring
    elsewhere = Keyring(table, lambda: MASTER, clock=lambda: now[0], cache_seconds=60)
    sealed = elsewhere.seal("acme", TASK, SECRET)
    store.keys.shred("acme")
    assert elsewhere.open("acme", TASK, sealed) == SECRET  # still cached
    now[0] += 61
    with pytest.raises(KeysShredded):
        elsewhere.open("acme", TASK, sealed)


# --- what only a store shared by several processes has


@contextmanager
def opened(url: str) -> Iterator[RecorderEventStore]:
    store = open_store(url, master_key=MASTER)
    try:
        yield store
    finally:
        store.close()


def race(n: int, action: Callable[[RecorderEventStore], str], url: str) -> list[str]:
    stores = [open_store(url, master_key=MASTER) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list[str] = [""] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = action(stores[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for opened in stores:
        opened.close()
    return results


def test_stores_that_make_the_first_key_together_agree_on_it(durable_store_url: str) -> None:
    results = race(4, lambda s: s.keys.current("acme").key_id, durable_store_url)
    assert len(set(results)) == 1


def test_rotations_at_once_leave_one_current_key_that_all_agree_on(durable_store_url: str) -> None:
    with opened(durable_store_url) as first:
        old = first.keys.current("acme").key_id
    results = race(4, lambda s: s.keys.rotate("acme").key_id, durable_store_url)
    assert old not in results
    # Rotations that read the same current key made one new key between them, not one each.
    assert len(set(results)) <= len(results)
    newest = max(results, key=lambda key_id: int(key_id[1:].split(".")[0]))
    with opened(durable_store_url) as later, opened(durable_store_url) as another:
        assert later.keys.current("acme").key_id == newest
        assert another.keys.current("acme").key_id == newest
        for key_id in results:
            later.keys.get("acme", key_id)


def test_keys_outlive_the_store_object_and_need_their_master_key(durable_store_url: str) -> None:
    with opened(durable_store_url) as first:
        key = first.keys.current("acme")
    with opened(durable_store_url) as again:
        assert again.keys.current("acme") == key
    other = open_store(durable_store_url, master_key=MasterKey(bytes(32), "another key"))
    try:
        with pytest.raises(ConfigurationError, match="another key"):
            other.keys.get("acme", key.key_id)
    finally:
        other.close()


def test_a_postgresql_store_without_a_master_key_refuses_to_make_keys(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        with pytest.raises(ConfigurationError, match="BROKER_Q_MASTER_KEY"):
            store.keys.current("acme")
    finally:
        store.close()


# --- SQLite: the embedded default


def _files(url: str) -> bytes:
    path = Path(urlsplit(url).path[1:])
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if not p.name.endswith(".key"))


def test_sqlite_makes_its_master_key_file_on_first_use_of_a_key(sqlite_url: str) -> None:
    path = Path(urlsplit(sqlite_url).path[1:] + ".master.key")
    store = open_store(sqlite_url)
    try:
        assert not path.exists()  # a store that never seals makes no key file
        key = store.keys.current("acme")
    finally:
        store.close()
    assert path.exists()
    reopened = open_store(sqlite_url, master_key=MasterKey.from_file(path))
    try:
        assert reopened.keys.current("acme") == key
    finally:
        reopened.close()


def test_after_shredding_no_key_bytes_are_left_in_the_sqlite_files(sqlite_url: str) -> None:
    store = open_store(sqlite_url, master_key=MASTER)
    try:
        keys = store.keys
        made = [keys.current("acme"), keys.rotate("acme")]
        wrapped = [keys._table.find("acme", k.key_id).wrapped for k in made]  # type: ignore[union-attr]
        kept = keys.current("other")
        contents = _files(sqlite_url)
        assert all(w is not None and w in contents for w in wrapped)  # the check can see them
        assert not any(k.key in contents for k in made)  # never stored unwrapped
        keys.shred("acme")
        contents = _files(sqlite_url)
        # No 12-byte piece either: a freed cell keeps all but its first bytes unless they are zeroed.
        pieces = [w[i:i + 12] for w in wrapped if w is not None for i in range(0, len(w) - 12)]
        assert not any(piece in contents for piece in pieces)
        assert not any(k.key in contents for k in made)
        assert keys.current("other") == kept
    finally:
        store.close()
