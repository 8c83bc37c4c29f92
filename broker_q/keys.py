"""Tenants' payload keys as operators handle them: list, rotate, shred, each rotation and shredding audited.

The keys live in the keyring (:mod:`broker_q.store.keys`), wrapped under the master key, where they
can be erased. What operators do to them is recorded here as events of the tenant's keys stream
(``key_rotated``, ``keys_shredded``: :class:`~broker_q.domain.events.KeysEvent`), so the audit log
says who rotated or shredded which keys, when and why. No key's bytes are ever shown or recorded.

The change comes first and its event after: an event never claims a change that did not happen. If
the event cannot be appended (the store went away in between), the error says so and the command
can be run again: a second rotation makes one more key, a second shredding erases nothing more.

The module also holds the ``broker-q keys`` commands (:func:`add_commands`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from broker_q.domain.events import KeyRotated, KeysEvent, KeysShredded, keys_stream_id
from broker_q.errors import ConcurrencyConflict, StoreError, ValidationError
from broker_q.store.port import EventStore

if TYPE_CHECKING:
    from broker_q.app import App

__all__ = ["KeyInfo", "Keys", "add_commands"]

E = TypeVar("E", bound=KeysEvent)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown of a key: never its bytes."""

    tenant: str
    key_id: str
    generation: int
    created_at: datetime
    state: str
    """``current`` (new payloads are sealed under it), ``retired`` (still opens what it sealed) or ``shredded``."""


class Keys:
    """The payload keys of every tenant of ``store``, as ``actor`` handles them."""

    def __init__(self, store: EventStore, *, actor: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = store
        self._actor = actor
        self._clock = clock

    def info(self, tenant: str) -> list[KeyInfo]:
        """The tenant's keys, oldest first; the last one is current unless they were shredded."""
        rows = self._store.keys.keys_of(tenant)
        newest = rows[-1].generation if rows else 0
        return [KeyInfo(tenant, row.key_id, row.generation, datetime.fromtimestamp(row.created_at, UTC),
                        "shredded" if row.shredded else "current" if row.generation == newest else "retired")
                for row in rows]

    def rotate(self, tenant: str) -> KeyRotated:
        """Make a new key current for ``tenant`` (its first, if it had none); old payloads still open."""
        keys = self._store.keys
        before = keys.keys_of(tenant)
        made = keys.rotate(tenant)
        generation = next((row.generation for row in keys.keys_of(tenant) if row.key_id == made.key_id), 0)
        return self._record(tenant, lambda version, now: KeyRotated(
            stream_id=keys_stream_id(tenant), version=version, timestamp=now, tenant=tenant, actor=self._actor,
            correlation_id=keys_stream_id(tenant), key_id=made.key_id, generation=generation,
            previous_key_id=before[-1].key_id if before else None))

    def shred(self, tenant: str, *, reason: str = "") -> KeysShredded:
        """Erase every key of ``tenant`` for good: its payloads can never be opened again, none are sealed anew."""
        keys = self._store.keys
        live = [row.key_id for row in keys.keys_of(tenant) if not row.shredded]

        def shredded(version: int, now: datetime) -> KeysShredded:
            return KeysShredded(stream_id=keys_stream_id(tenant), version=version, timestamp=now, tenant=tenant,
                                actor=self._actor, correlation_id=keys_stream_id(tenant), key_ids=live,
                                reason=reason)

        try:
            keys.shred(tenant)
        except StoreError:
            # The erasure may have committed and only the emptying of SQLite's log failed: if the
            # keys are gone, that is recorded before the error is reported (shredding again is safe).
            if live and all(row.shredded for row in keys.keys_of(tenant)):
                self._record(tenant, shredded)
            raise
        return self._record(tenant, shredded)

    def history(self, tenant: str) -> list[KeysEvent]:
        """Every rotation and shredding recorded for ``tenant``, in order."""
        return [e for e in self._store.read_stream(keys_stream_id(tenant)) if isinstance(e, KeysEvent)]

    def _record(self, tenant: str, make: Callable[[int, datetime], E]) -> E:
        for _ in range(10):
            version = len(self._store.read_stream(keys_stream_id(tenant))) + 1
            event = make(version, self._clock())
            try:
                self._store.append([event])
            except ConcurrencyConflict:
                continue  # another operator recorded something meanwhile: after it
            return event
        raise ConcurrencyConflict(f"the keys stream of tenant {tenant!r} kept changing: the change was made but not "
                                  "recorded; run the command again")


def add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Sequence[argparse.ArgumentParser] = (),
) -> None:
    """Register ``keys list|rotate|shred --tenant T``."""
    group = subparsers.add_parser("keys", help="list, rotate and shred a tenant's payload keys",
                                  description="list, rotate and shred a tenant's payload keys (never shown)",
                                  parents=list(common))
    actions = group.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, fn: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=text, description=text)
        parser.set_defaults(command=fn)
        parser.add_argument("--tenant", required=True, help="whose keys")
        return parser

    sub = action("list", _list, "the tenant's keys: id, generation, created, current/retired/shredded")
    sub.add_argument("--json", action="store_true")
    action("rotate", _rotate, "make a new key current; payloads sealed before still open (audited)")
    sub = action("shred", _shred, "erase every key of the tenant: its payloads can never be read again (audited)")
    sub.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    sub.add_argument("--reason", default="", help="why (kept in the audit log)")


@contextmanager
def _keys(options: argparse.Namespace) -> Iterator[Keys]:
    from broker_q.cli import _app, actor_of  # here, not at the top: broker_q.cli imports this module

    app: App = _app(options)
    try:
        yield Keys(app.store, actor=actor_of(options))
    finally:
        app.close()


def _list(options: argparse.Namespace) -> int:
    with _keys(options) as keys:
        found = keys.info(options.tenant)
    if options.json:
        print(json.dumps([{"tenant": k.tenant, "key_id": k.key_id, "generation": k.generation,
                           "created_at": k.created_at.isoformat(), "state": k.state} for k in found], indent=2))
        return 0
    if not found:
        print(f"tenant {options.tenant!r} has no key yet: its first is made with its first sealed payload")
    for key in found:
        print(f"{key.key_id:<24} generation {key.generation:<4} created {key.created_at.isoformat()}  {key.state}")
    return 0


def _rotate(options: argparse.Namespace) -> int:
    with _keys(options) as keys:
        event = keys.rotate(options.tenant)
    before = f" (was {event.previous_key_id})" if event.previous_key_id else ""
    print(f"tenant {options.tenant!r}: key {event.key_id} is current{before}; payloads sealed before still open")
    return 0


def _shred(options: argparse.Namespace) -> int:
    if not options.yes:
        raise ValidationError(f"shredding erases every key of tenant {options.tenant!r} for good: its payloads can "
                              "never be read again and it can submit nothing more; add --yes to do it")
    with _keys(options) as keys:
        event = keys.shred(options.tenant, reason=options.reason)
    erased = ", ".join(event.key_ids) or "none left to erase"
    print(f"tenant {options.tenant!r}: keys shredded ({erased})")
    return 0
