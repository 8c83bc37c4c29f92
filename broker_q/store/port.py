"""The event store port: what broker_q needs from a store, and nothing more.

Guarantees every adapter keeps (``tests/integration/test_store_contract.py`` proves them for each):

- ``append`` is all-or-nothing, and refuses an event whose (stream, version) exists already with
  :class:`~broker_q.errors.ConcurrencyConflict`: the unique key is the concurrency control.
- Every appended event gets a position in one log shared by all streams; positions increase in
  commit order (they may have gaps), so a reader that follows the log from a position it has seen
  never misses an event that commits later.
- ``set_position``/``get_position`` keep a named reader's position (the relay's, a projection's).
- ``timers`` keeps the scheduler's timers beside the events (:mod:`broker_q.store.timers`), and
  ``dependencies`` the coordinator's edges (:mod:`broker_q.store.dependencies`), and ``keys`` the
  tenants' wrapped data keys (:mod:`broker_q.store.keys`).
- An unreachable database raises :class:`~broker_q.errors.StoreUnavailable`, which may be retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker_q.domain.events import Event
from broker_q.store.dependencies import Dependencies
from broker_q.store.keys import Keyring
from broker_q.store.timers import Timers

__all__ = ["AppendResult", "EventStore", "Recorded"]


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event with its position in the store's log, and its stored JSON (``broker_q.codec``)."""

    position: int
    event: Event
    data: bytes = field(default=b"", compare=False, repr=False)
    """The event's fields as stored, so that a reader that forwards them need not encode them again."""


AppendResult = list[int] | Exception
"""Per group of :meth:`EventStore.append_groups`: the positions of its events, or the error that refused it."""


class EventStore(Protocol):
    def append(self, events: Sequence[Event]) -> list[int]:
        """Append ``events`` in one transaction; return their positions in the log."""
        ...

    def append_groups(self, groups: Sequence[Sequence[Event]]) -> list[AppendResult]:
        """Append independent groups, each all-or-nothing, in as few transactions as possible.

        Never raises for a group: each result is the group's positions or the error that refused it
        (:class:`~broker_q.errors.ConcurrencyConflict`, :class:`~broker_q.errors.SerializationError`...),
        isolated from the other groups. A group whose result is
        :class:`~broker_q.errors.StoreUnavailable` was not appended and may be tried again.
        """
        ...

    def read_stream(self, stream_id: uuid.UUID, *, to_version: int | None = None,
                    after_version: int | None = None) -> list[Event]:
        """The events of one stream in version order (after ``after_version`` and up to ``to_version`` if given).

        ``after_version`` lets a reader that holds a stream's state read only what was appended since.
        """
        ...

    def read_log(self, after: int, limit: int, *, to_position: int | None = None) -> list[Recorded]:
        """Up to ``limit`` events with positions greater than ``after`` (and at most ``to_position``)."""
        ...

    def max_position(self) -> int:
        """The position of the last event, 0 if the log is empty."""
        ...

    def get_position(self, reader: str) -> int:
        """The last position ``reader`` recorded, 0 if none."""
        ...

    def set_position(self, reader: str, position: int) -> None:
        """Record that ``reader`` has handled everything up to ``position``. Positions only grow."""
        ...

    @property
    def timers(self) -> Timers:
        """The scheduler's timers, kept in the same database as the events."""
        ...

    @property
    def dependencies(self) -> Dependencies:
        """The coordinator's dependency edges, kept in the same database as the events."""
        ...

    @property
    def keys(self) -> Keyring:
        """The tenants' data keys, wrapped under the master key, in the same database as the events."""
        ...

    def close(self) -> None: ...
