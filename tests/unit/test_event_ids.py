"""Event ids: derived from (stream, version) alone, and the same as they have always been.

Stored events name their cause by its id (``causation_id``), so the derivation may never change:
an id computed today must equal the one computed when the event was stored.
"""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from broker_q.domain.events import event_id

_EVENT_NS = uuid.UUID("6f1d5f3e-6a51-4d1e-9c77-0b7c1f3f2a10")


@given(st.uuids(), st.integers(min_value=0, max_value=2**63))
def test_an_event_id_is_uuid5_of_the_stream_and_version(stream_id: uuid.UUID, version: int) -> None:
    expected = uuid.uuid5(_EVENT_NS, f"{stream_id.hex}:{version}")
    got = event_id(stream_id, version)
    assert got == expected
    assert (got.version, got.variant) == (5, uuid.RFC_4122)


def test_event_ids_of_stored_events_are_pinned() -> None:
    # Computed with uuid.uuid5 before event_id was made faster: the ids of events already stored.
    stream_id = uuid.UUID("00000000-0000-4000-8000-000000000001")
    assert str(event_id(stream_id, 1)) == "6dfeb7df-14e1-5212-8c7c-2f739eb668b6"
    assert str(event_id(stream_id, 2)) == "54c00e68-943f-5370-9dfe-fe78666eedde"
