"""A handler's parameters: whether the JSON arguments of a task fit them, and the values it is called with.

Arguments travel and are stored as JSON. They are checked where a task is recorded (``App.submit``,
an ingress envelope, a dead letter replayed with new arguments) and again where its handler is
called, in the same way: bound to the handler's signature (number and names), then validated
against its type hints by pydantic, with the rules of JSON input in pydantic's default (lax) mode.
Arguments that do not fit are refused with a :class:`~broker_q.errors.ValidationError` that names
the parameter and the type it expects, never the value (it may be a secret).

The handler receives the values as validated: an ISO 8601 string for a ``datetime`` parameter
arrives as a ``datetime``, an object for a pydantic model as the model, ``"7"`` for an ``int`` as 7,
a list for a ``tuple`` as a tuple. The stored event keeps the JSON as it was sent. A parameter
without an annotation (or annotated ``Any`` or ``object``) takes any JSON value unchanged; a handler
with no annotated parameter costs a ``Signature.bind`` per call and nothing more.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, get_origin

import pydantic
import pydantic_core
import typing_extensions

from broker_q.errors import ConfigurationError, SerializationError, ValidationError

__all__ = ["Parameters"]

_ANYTHING = (inspect.Parameter.empty, Any, object)
_RECEIVED = object()
"""Stands for the parents' results that a task receives in front of its arguments (``check(received=True)``)."""
_VARIADIC = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
_POSITIONAL = {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD}
# typing_extensions' TypedDict: pydantic refuses typing's before Python 3.12. Any: its fields are made at run time.
_TypedDict: Any = typing_extensions.TypedDict


class Parameters:
    """The parameters of the handler ``fn`` of task ``task``, and a validator of their annotations.

    The validator is built once, here; if an annotation names something not defined yet (a forward
    reference to a class further down the module), on first use instead. :meth:`prepare` builds it
    now, so that a worker finds an annotation it can never resolve when it starts, not per message.
    """

    def __init__(self, fn: Callable[..., Any], task: str) -> None:
        self.task = task
        self.signature = inspect.signature(fn)
        self._fn = fn
        self._adapter: pydantic.TypeAdapter[dict[str, Any]] | None = None
        self._types: dict[str, Any] = {}
        kinds = {parameter.kind for parameter in self.signature.parameters.values()}
        self._positional: tuple[str, ...] | None = None if kinds & _VARIADIC else tuple(
            name for name, parameter in self.signature.parameters.items() if parameter.kind in _POSITIONAL)
        """The names of the positional parameters in order, when there are no ``*args`` or ``**kwargs``."""
        self._built = False
        with contextlib.suppress(NameError):  # built on first use (prepare), when the name may be defined
            self._build()

    def prepare(self) -> None:
        """Build the validator now; :class:`ConfigurationError` if an annotation cannot be resolved."""
        if not self._built:
            try:
                self._build()
            except NameError as e:
                raise ConfigurationError(f"task {self.task}: a type hint of its handler cannot be resolved: {e}; "
                                         "define the type at the top level of the handler's module") from e

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, received: bool = False) -> None:
        """Refuse arguments that the handler cannot take (:class:`ValidationError`).

        ``received``: the task receives its parents' results in front of ``args`` when it is
        released (a step of a workflow). They are not known yet: the arguments must leave room for
        them, and only the arguments given are validated.
        """
        if not received:
            self.values(args, kwargs)
            return
        try:
            bound = self.signature.bind(_RECEIVED, *args, **kwargs)
        except TypeError as e:
            raise ValidationError(f"arguments do not fit {self.task}{self.signature} after the parents' results "
                                  f"that come first: {e}") from e
        given: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if value is _RECEIVED:
                continue
            if isinstance(value, tuple) and value and value[0] is _RECEIVED:  # *args, whose first is received
                value = value[1:]
            given[name] = value
        if not self._built:
            self.prepare()
        typed = {name: value for name, value in given.items() if name in self._types}
        if self._adapter is not None and typed:
            self._validated(typed)

    def values(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments to call the handler with, validated; or :class:`ValidationError`."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ValidationError(f"arguments do not fit {self.task}{self.signature}: {e}") from e
        if not self._built:
            self.prepare()
        if self._adapter is None:
            return list(args), dict(kwargs)
        given = {name: value for name, value in bound.arguments.items() if name in self._types}
        if not given:
            return list(args), dict(kwargs)
        valid = self._validated(given)
        if self._positional is not None:  # the arguments are where they were: spare BoundArguments' rebuild
            return ([valid.get(name, value) for name, value in zip(self._positional, args, strict=False)],
                    {name: valid.get(name, value) for name, value in kwargs.items()})
        bound.arguments.update(valid)
        return list(bound.args), bound.kwargs

    def _validated(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` (bound arguments of annotated parameters, by name) validated against their type hints."""
        assert self._adapter is not None
        try:
            return self._adapter.validate_json(pydantic_core.to_json(given))
        except pydantic_core.PydanticSerializationError as e:
            raise SerializationError(f"arguments of {self.task} are not JSON: {e}") from e
        except pydantic.ValidationError as e:
            raise ValidationError(f"arguments do not fit {self.task}{self.signature}: {self._reason(e)}") from None

    def _build(self) -> None:
        fields: dict[str, Any] = {}
        for name, parameter in inspect.signature(self._fn, eval_str=True).parameters.items():
            hint = parameter.annotation
            if any(hint is anything for anything in _ANYTHING):
                continue
            self._types[name] = hint
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                fields[name] = tuple.__class_getitem__((hint, ...))  # tuple[hint, ...] of a hint known at run time
            elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
                fields[name] = dict.__class_getitem__((str, hint))
            else:
                fields[name] = hint
        if fields:
            try:
                self._adapter = pydantic.TypeAdapter(_TypedDict("Arguments", fields, total=False))
            except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as e:
                raise ConfigurationError(f"task {self.task}: pydantic cannot validate the type hints of its "
                                         f"handler's parameters ({e}); arguments are JSON: annotate them with "
                                         "types JSON can hold, or Any") from e
        self._built = True

    def _reason(self, error: pydantic.ValidationError) -> str:
        """Which arguments are wrong and what they should be, without their values."""
        problems = error.errors(include_url=False, include_input=False, include_context=False)
        parts = []
        for problem in problems[:3]:
            name, *path = problem["loc"]
            hint = self._types[str(name)]
            if get_origin(hint) is Annotated:
                hint = hint.__origin__
            where = "".join(f"[{step!r}]" for step in path)
            expected = inspect.formatannotation(hint, base_module=getattr(self._fn, "__module__", None))
            parts.append(f"argument {name!r}{' at ' + str(name) + where if where else ''} must be "
                         f"{expected}: {problem['msg']}")
        if len(problems) > 3:
            parts.append(f"and {len(problems) - 3} more")
        return "; ".join(parts)
