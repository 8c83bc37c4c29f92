"""Tasks and events as JSON-ready dicts: what the CLI prints and the HTTP API will return."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from broker_q.domain.events import Event
from broker_q.domain.task import TaskState
from broker_q.errors import ConfigurationError, DecryptionError
from broker_q.payloads import Payloads, reveal

__all__ = ["history_row", "status_view"]


def status_view(state: TaskState, payloads: Payloads | None = None, *, withheld: str | None = None) -> dict[str, Any]:
    """A task's state as the CLI and the API show it (JSON-ready).

    With ``payloads``, sealed arguments and results are opened (:func:`broker_q.payloads.reveal`);
    without them, or when they cannot be opened, they are shown sealed (``args``, ``kwargs`` and
    ``result`` null, ``sealed_arguments`` and ``sealed_result`` set) and ``sealed_because`` says why
    (``withheld``: why no ``payloads`` were given, e.g. a principal without ``read_payloads``).
    """
    sealed_because = withheld if state.sealed_arguments is not None or state.sealed_result is not None else None
    if payloads is not None:
        try:
            state = reveal(payloads, state)
        except (DecryptionError, ConfigurationError) as e:
            sealed_because = str(e)
    sealed = state.sealed_arguments is not None
    return {
        "id": str(state.task_id), "task": state.task, "state": state.status.value, "queue": state.queue,
        "tenant": state.tenant, "priority": state.priority, "attempts": state.attempts, "version": state.version,
        "args": None if sealed else state.args, "kwargs": None if sealed else state.kwargs, "result": state.result,
        "sealed_arguments": state.sealed_arguments, "sealed_result": state.sealed_result,
        "sealed_because": sealed_because,
        "error": None if state.error_type is None else f"{state.error_type}: {state.error}",
        "traceback": state.traceback, "worker": state.worker,
        "submitted_at": state.submitted_at.isoformat(),
        "started_at": state.started_at.isoformat() if state.started_at else None,
        "finished_at": state.finished_at.isoformat() if state.finished_at else None,
    }


def history_row(event: Event) -> dict[str, Any]:
    common = {"stream_id", "version", "timestamp", "tenant", "actor", "correlation_id", "causation_id"}
    data = {k: v for k, v in asdict(event).items() if k not in common}
    return {
        "version": event.version, "time": event.timestamp.isoformat(), "type": event.TYPE, "actor": event.actor,
        "tenant": event.tenant, "correlation_id": str(event.correlation_id),
        "causation_id": str(event.causation_id) if event.causation_id else None, "data": data,
    }
