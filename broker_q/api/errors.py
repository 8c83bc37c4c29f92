"""broker_q's errors as HTTP answers: one table, one handler, one body shape.

Every error answer is ``{"error": {"type": ..., "message": ...}}`` (:class:`~broker_q.api.models.ErrorBody`),
``type`` being the snake-case name of the error (``task_not_found``, ``permission_denied``...).
An error that is not broker_q's is logged with its traceback and answered as a bare 500: its
message may hold anything, so it is never sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker_q.api.models import ErrorBody
from broker_q.errors import (
    BrokerQError,
    BrokerUnavailable,
    ConcurrencyConflict,
    DecryptionError,
    DomainError,
    KeysShredded,
    PermissionDenied,
    QuotaExceeded,
    StoreError,
    StoreUnavailable,
    TaskNotFound,
    Unauthenticated,
    UnknownTask,
    ValidationError,
)

__all__ = ["NotFound", "error_response", "errors", "install_error_handlers", "status_of"]

log = logging.getLogger(__name__)


class NotFound(BrokerQError):
    """No schedule (or other named record) of that name: the API's 404 beside :class:`TaskNotFound`."""


_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    # The first match wins: subclasses before their bases.
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (TaskNotFound, 404),
    (NotFound, 404),
    (QuotaExceeded, 429),  # the message names the quota; the refusal is in the audit log
    (ConcurrencyConflict, 409),  # someone else wrote first: the same request may succeed if sent again
    (StoreUnavailable, 503),
    (BrokerUnavailable, 503),
    (StoreError, 500),
    (ValidationError, 422),
    (UnknownTask, 422),
    (DomainError, 409),  # illegal in the record's current state: cancelling a final task, replaying a live one
    (KeysShredded, 410),
    (DecryptionError, 500),
)


_MEANING = {
    400: "The body cannot be read (not UTF-8 JSON)",
    401: "No valid API token",
    403: "The token's roles or tenant do not allow this (recorded in the audit log)",
    404: "No such record, or one of a tenant the token cannot see",
    409: "The record's current state forbids this",
    429: "Over one of the tenant's quotas, which the message names (recorded in the audit log)",
    422: "Invalid input",
    503: "The event store (or RabbitMQ) does not answer; try again",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of an operation that may answer these error statuses (for its OpenAPI)."""
    return {code: {"model": ErrorBody, "description": _MEANING[code]} for code in codes}


def status_of(error: BrokerQError) -> int:
    """The HTTP status of a broker_q error (500 for one the table does not name)."""
    return next((status for kind, status in _STATUS if isinstance(error, kind)), 500)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_response(status: int, kind: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"type": kind, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _broker_q_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BrokerQError)
    status = status_of(error)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, error, exc_info=error)
    # RFC 6750: a 401 names the scheme it wants.
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, _snake(type(error).__name__), str(error), headers=headers)


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    details = jsonable_encoder([{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in error.errors()])
    first = details[0] if details else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
    return error_response(422, "validation_error", message, details)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed"}
    return error_response(error.status_code, kinds.get(error.status_code, "http_error"), str(error.detail),
                          headers=error.headers)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # Not logged here: Starlette raises the error again after this answer, for the server to log it.
    return error_response(500, "internal_error", "internal server error (logged by the server)")


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(BrokerQError, _broker_q_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
