"""Query parameters that several endpoints share, and how their values are read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query

from broker_q.api.models import TENANT_PATTERN

__all__ = ["MAX_POSITION", "Limit", "Tenant", "Time", "aware"]

MAX_POSITION = 2**63 - 1
"""The largest log position: the stores keep positions as signed 64-bit integers."""

Tenant = Annotated[str | None, Query(pattern=TENANT_PATTERN, description="Only this tenant's (a principal bound "
                                                                         "to a tenant sees only its own).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="The most items in the page.")]
Time = Annotated[datetime | None, Query(description="ISO 8601; UTC if it has no offset.")]


def aware(value: datetime | None) -> datetime | None:
    """A time from a query string, aware: one without an offset is UTC (as on the command line)."""
    return value if value is None or value.utcoffset() is not None else value.replace(tzinfo=UTC)
