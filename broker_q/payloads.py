"""Task payloads in events: arguments and results sealed under the tenant's key, and opened again.

What is sealed (``docs/decisions/0008-payload-encryption.md``):

- a task's arguments, ``args`` and ``kwargs`` together, as one sealed value of the JSON object
  ``{"args": [...], "kwargs": {...}}``, in the ``sealed_arguments`` field of ``submitted``,
  ``released`` and ``replayed`` and of the work message; ``args`` and ``kwargs`` are then empty;
- a task's result, as one sealed value of ``{"result": ...}``, in the ``sealed_result`` field of
  ``succeeded``; ``result`` is then None.

Each value is bound to its tenant and task (:func:`broker_q.crypto.associated_data`), and the object
it holds names what it is, so a result copied into the arguments of its own task does not pass for
arguments. Everything else of an event stays readable: projections, replay and the audit log never
need a key.

A :class:`Payloads` seals new payloads only when ``sealing`` is on (``BROKER_Q_ENCRYPTION``), but
opens whatever it is given sealed, so that switching encryption off never strands a sealed task.
Whoever passes a payload on seals it again if it came sealed: nothing sealed is ever written back in
plain. :func:`reveal` is the one way to a task's plaintext for people (the CLI, the HTTP API): the
place where a permission to read payloads is checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from broker_q.codec import dumps, loads
from broker_q.crypto import plaintext_length, sealed_key_id
from broker_q.domain.events import TaskSubmitted, TaskSucceeded
from broker_q.domain.task import TaskState
from broker_q.errors import PayloadCorrupted, ValidationError
from broker_q.store.keys import Keyring

__all__ = ["Payloads", "arguments_size", "reveal"]


class Payloads:
    """Seals and opens task payloads with the keys of ``keys()`` (the store's keyring, got on first use)."""

    def __init__(self, keys: Callable[[], Keyring], *, sealing: bool) -> None:
        self._keys = keys
        self.sealing = sealing
        """Whether new payloads are sealed (sealed ones are opened either way)."""

    @property
    def keys(self) -> Keyring:
        return self._keys()

    # -- arguments ------------------------------------------------------------------------------

    def seal_arguments(self, tenant: str, task_id: Any, args: list[Any], kwargs: dict[str, Any]) -> str:
        """``args`` and ``kwargs`` sealed together under ``tenant``'s current key, for the task ``task_id``."""
        return self.keys.seal(tenant, str(task_id), dumps({"args": args, "kwargs": kwargs}))

    def open_arguments(self, tenant: str, task_id: Any, sealed: str) -> tuple[list[Any], dict[str, Any]]:
        """The ``args`` and ``kwargs`` of :meth:`seal_arguments`; a :class:`~broker_q.errors.DecryptionError`
        names the key when they cannot be opened."""
        value = self._open(tenant, task_id, sealed)
        if not (isinstance(value, dict) and value.keys() == {"args", "kwargs"} and isinstance(value["args"], list)
                and isinstance(value["kwargs"], dict)):
            raise PayloadCorrupted(f"the sealed value under key {sealed_key_id(sealed)!r} of tenant {tenant!r} "
                                   f"does not hold the arguments of task {task_id}", sealed_key_id(sealed))
        return value["args"], value["kwargs"]

    def submitted(self, event: TaskSubmitted) -> TaskSubmitted:
        """``event`` with its arguments sealed, when sealing is on; as it is otherwise."""
        if not self.sealing or event.sealed_arguments is not None:
            return event
        sealed = self.seal_arguments(event.tenant, event.stream_id, event.args, event.kwargs)
        return dataclasses.replace(event, args=[], kwargs={}, sealed_arguments=sealed)

    # -- results --------------------------------------------------------------------------------

    def seal_result(self, tenant: str, task_id: Any, result: Any) -> str:
        return self.keys.seal(tenant, str(task_id), dumps({"result": result}))

    def open_result(self, tenant: str, task_id: Any, sealed: str) -> Any:
        value = self._open(tenant, task_id, sealed)
        if not (isinstance(value, dict) and value.keys() == {"result"}):
            raise PayloadCorrupted(f"the sealed value under key {sealed_key_id(sealed)!r} of tenant {tenant!r} "
                                   f"does not hold the result of task {task_id}", sealed_key_id(sealed))
        return value["result"]

    def succeeded(self, event: TaskSucceeded, *, arguments_sealed: bool) -> TaskSucceeded:
        """``event`` with its result sealed, when sealing is on or the task's arguments came sealed."""
        if not (self.sealing or arguments_sealed) or event.sealed_result is not None:
            return event
        sealed = self.seal_result(event.tenant, event.stream_id, event.result)
        return dataclasses.replace(event, result=None, sealed_result=sealed)

    def result(self, state: TaskState) -> Any:
        """The result of a task that succeeded, opened if sealed."""
        if state.sealed_result is None:
            return state.result
        return self.open_result(state.tenant, state.task_id, state.sealed_result)

    def arguments(self, state: TaskState) -> tuple[list[Any], dict[str, Any]]:
        """The task's ``args`` and ``kwargs``, opened if sealed."""
        if state.sealed_arguments is None:
            return state.args, state.kwargs
        return self.open_arguments(state.tenant, state.task_id, state.sealed_arguments)

    # -- for callers on an event loop -------------------------------------------------------------

    def blocks(self, tenant: str, sealed: str | None = None) -> bool:
        """Whether sealing for ``tenant`` (or opening ``sealed``) would read the key table now, so that a
        caller on an event loop does it in a thread; without a read it costs microseconds, done in place."""
        key_id = None
        if sealed is not None:
            # The key id alone (opening checks the rest): parsing the whole value here cost as much
            # as the opening itself for a large payload.
            parts = sealed.split(":", 2)
            if len(parts) != 3 or not parts[1]:
                return False  # refused without a read
            key_id = parts[1]
        return not self.keys.is_cached(tenant, key_id)

    def _open(self, tenant: str, task_id: Any, sealed: str) -> Any:
        plaintext = self.keys.open(tenant, str(task_id), sealed)
        try:
            return loads(plaintext)
        except ValidationError:  # authenticated but not JSON: sealed by something that is not broker_q
            raise PayloadCorrupted(f"the sealed value under key {sealed_key_id(sealed)!r} of tenant {tenant!r} "
                                   "does not hold JSON", sealed_key_id(sealed)) from None


_WRAPPING = len(dumps({"args": [], "kwargs": {}})) - len(dumps([[], {}]))
"""What the sealed object adds to the JSON of ``[args, kwargs]``: its two keys."""


def arguments_size(event: TaskSubmitted) -> int:
    """The bytes of the JSON of ``[args, kwargs]`` of the task, sealed or not: what a payload quota counts.

    For sealed arguments it is read from the sealed value's length, without opening it.
    """
    if event.sealed_arguments is None:
        return len(dumps([event.args, event.kwargs]))
    return plaintext_length(event.sealed_arguments) - _WRAPPING


def reveal(payloads: Payloads, state: TaskState) -> TaskState:
    """``state`` with its arguments and result opened: what a person may be shown of a task.

    Every way to a task's plaintext for people (the CLI's ``status``, ``replay``, ``state``; the HTTP
    API) goes through here, so that this is where a principal's permission to read payloads is
    checked. Raises a :class:`~broker_q.errors.DecryptionError` (or ``ConfigurationError`` without
    the master key) when they cannot be opened.
    """
    if state.sealed_arguments is None and state.sealed_result is None:
        return state
    args, kwargs = payloads.arguments(state)
    return dataclasses.replace(state, args=args, kwargs=kwargs, sealed_arguments=None,
                               result=payloads.result(state), sealed_result=None)
