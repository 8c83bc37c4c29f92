"""``/v1/audit``: the audit log, filtered, as pages of JSON or as one stream of JSON lines.

Reading it needs the ``audit`` permission; a principal bound to a tenant reads that tenant's records only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from broker_q.access import Permission
from broker_q.api.auth import CallerDep
from broker_q.api.errors import errors
from broker_q.api.models import AuditPage, AuditRecord
from broker_q.api.params import MAX_POSITION, Tenant, Time, aware
from broker_q.errors import ValidationError
from projections.database import ViewDatabases
from projections.queries import AuditQuery, audit

__all__ = ["router"]

router = APIRouter(tags=["audit"])

PAGE = 100
"""Records in a JSON page when no limit is given."""
MAX_PAGE = 1000
_STREAM_PAGE = 1000
_JSON_LINES = "application/x-ndjson"


@router.get(
    "/v1/audit", response_model=AuditPage, summary="The audit log",
    responses={**errors(401, 403, 422, 503), 200: {"content": {_JSON_LINES: {"schema": {"type": "string"}}},
                                "description": "A page of records, or with format=jsonl one record per line"}},
)
def audit_log(
    caller: CallerDep,
    tenant: Tenant = None,
    actor: Annotated[str | None, Query(max_length=500, description="Only what this actor did.")] = None,
    task: Annotated[uuid.UUID | None, Query(description="Only the records of this task.")] = None,
    type: Annotated[list[str] | None, Query(description="Only these event types (repeatable).")] = None,
    since: Time = None,
    until: Time = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_POSITION,
                                       description="The last position already seen (`next`).")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1_000_000, description=f"JSON: records per page (default {PAGE}, "
                                       f"at most {MAX_PAGE}). JSON lines: the most records (default all).")] = None,
    format: Annotated[Literal["json", "jsonl"], Query(description="json: a page; jsonl: every record, one JSON "
                                                                  "object per line, streamed (for export).")] = "json",
) -> AuditPage | StreamingResponse:
    """Audit records in log order: every event, with who caused it, and every refused access."""
    scope = caller.authorize(Permission.AUDIT, tenant, "read the audit log")
    query = AuditQuery(tenant=scope, actor=actor, task=None if task is None else str(task), types=type or (),
                       since=aware(since), until=aware(until))
    views = caller.context.views
    if format == "jsonl":
        return StreamingResponse(_lines(views, query, after, limit), media_type=_JSON_LINES)
    size = PAGE if limit is None else limit
    if size > MAX_PAGE:
        raise ValidationError(f"limit: a JSON page holds at most {MAX_PAGE} records (format=jsonl streams more)")
    records = audit(views, query, limit=size, after=after)
    return AuditPage.model_validate({"items": records,
                                     "next": records[-1]["position"] if len(records) == size else None})


def _lines(database: ViewDatabases, query: AuditQuery, after: int | None, limit: int | None) -> Iterator[bytes]:
    """Each record as a line, read a page at a time: an export of any size never sits in memory."""
    left = limit
    while left is None or left > 0:
        size = _STREAM_PAGE if left is None else min(left, _STREAM_PAGE)
        records = audit(database, query, limit=size, after=after)
        for record in records:
            yield AuditRecord.model_validate(record).model_dump_json().encode() + b"\n"
        if len(records) < size:
            return
        after = records[-1]["position"]
        if left is not None:
            left -= len(records)
