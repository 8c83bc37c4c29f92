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
from collections.abc import Container, Sequence
from typing import Protocol

from broker_q.codec import decode_event, parse_uuid, stored_tenant
from broker_q.domain.events import Event
from broker_q.store.dependencies import Dependencies
from broker_q.store.keys import Keyring
from broker_q.store.timers import Timers

__all__ = ["AppendResult", "EventStore", "Recorded"]


class Recorded:
    """An event with its position in the store's log, and its stored JSON (``broker_q.codec``).

    The event may be decoded lazily, on the first read of :attr:`event`: a reader that forwards
    most events as stored (the relay) decodes only those it routes on, and takes the others'
    ``topic``, ``stream_id``, ``version`` and :attr:`tenant` from what the store keeps.
    Two records are equal when their positions and events are.
    """

    __slots__ = ("_event", "data", "position", "stream_id", "topic", "version")

    def __init__(self, position: int, event: Event | None = None, data: bytes = b"", *,
                 stored: tuple[uuid.UUID | str, int, str] | None = None) -> None:
        """``Recorded(position, event, data)``, or ``Recorded(position, data=..., stored=(stream_id,
        version, topic))`` to decode ``data`` on first use (``stream_id`` as a UUID or its canonical text)."""
        self.position = position
        self.data = data
        """The event's fields as stored, so that a reader that forwards them need not encode them again."""
        self._event = event
        if event is not None:
            self.stream_id: uuid.UUID = event.stream_id
            self.version = event.version
            self.topic = event.TOPIC
        elif stored is not None:
            stream_id, self.version, self.topic = stored
            self.stream_id = stream_id if isinstance(stream_id, uuid.UUID) else parse_uuid(stream_id)
        else:
            raise TypeError("Recorded needs an event or what was stored")

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = decode_event(self.stream_id, self.version, self.topic, self.data)
        return self._event

    @property
    def tenant(self) -> str:
        """The event's tenant, read from the stored JSON without decoding the rest of it."""
        if self._event is None:
            tenant = stored_tenant(self.data)
            if tenant is not None:
                return tenant
        return self.event.tenant

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recorded):
            return NotImplemented
        return self.position == other.position and self.event == other.event

    def __hash__(self) -> int:
        return hash((self.position, self.event))

    def __repr__(self) -> str:
        return f"Recorded(position={self.position!r}, event={self.event!r})"


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

    def read_log(self, after: int, limit: int, *, to_position: int | None = None,
                 decode: Container[str] | None = None) -> list[Recorded]:
        """Up to ``limit`` events with positions greater than ``after`` (and at most ``to_position``).

        Given ``decode`` (topics), only events of those topics are decoded now; the others on first use.
        """
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
