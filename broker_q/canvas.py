"""Canvas: task signatures composed into chains, groups, chords and DAGs, submitted as one workflow.

A :class:`Signature` is a task with its arguments and options, not submitted yet
(``add.s(1, 2)``, ``app.signature("add", [1, 2], queue="math")``). Compose them:

- ``a.s(1) | b.s() | c.s()`` (or ``chain(...)``): each step receives the result of the one
  before as its first argument;
- ``group(a.s(i) for i in range(100))`` (or ``group(a.s(1), b.s(2))``): the members run in
  parallel; the group's result is the list of their results, in member order;
- ``chord(group, callback)``, or ``group | callback``: the callback receives that list, once
  every member has succeeded;
- ``dag({"extract": (e.s(), []), "load": (l.s(), ["extract"])})``: named steps and the steps they
  wait for. A step with parents receives the list of its parents' results, in the order the parents
  are named, as its first argument.

What a step receives follows from where it stands; a signature can say otherwise: one made with
``.si()`` (immutable) receives nothing and only waits, and ``.set(receives="result")`` gives a
step with one parent that parent's bare result instead of a list of one. A group in a chain passes
the list of its members' results to what follows; each member of a group that follows a task
receives that task's result. A group member must end in one task (a chord, say): a group whose
member ends in a group is refused, its result would have no single value.

``wf.delay()``, ``await wf.submit()`` or ``app.submit_workflow(wf)`` records the whole workflow in
one transaction and returns a :class:`~broker_q.workflows.WorkflowHandle`. Nothing here performs I/O.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from broker_q.domain.retry import RetryOverride, RetryPolicy
from broker_q.domain.workflow import StepSpec, plan
from broker_q.errors import ValidationError

if TYPE_CHECKING:
    from broker_q.app import App
    from broker_q.workflows import WorkflowHandle

__all__ = ["DAG", "Canvas", "Chain", "Group", "Signature", "StepOptions", "chain", "chord", "compile_workflow",
           "dag", "group"]

R = TypeVar("R")
AUTO = "auto"
"""What a signature receives when it does not say: decided by where it stands."""


@dataclass(frozen=True, slots=True)
class StepOptions:
    """How a step's task is submitted: as ``App.submit`` takes them (a ``countdown`` counts from the
    workflow's submission; a step with parents waits for both them and its time)."""

    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | None = None
    max_attempts: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    retry: RetryPolicy | RetryOverride | None = None


_OPTION_NAMES = frozenset(f.name for f in fields(StepOptions))


class _Output(NamedTuple):
    """The steps whose results a part of a workflow hands on: one result, or (``many``) a list of them."""

    names: tuple[str, ...]
    many: bool


_NOTHING = _Output((), many=False)


class Canvas:
    """A part of a workflow. ``a | b`` is the chain of ``a`` then ``b``."""

    @property
    def app(self) -> App:
        raise NotImplementedError

    def __or__(self, other: Canvas) -> Chain:
        if not isinstance(other, Canvas):
            return NotImplemented
        return chain(self, other)

    def delay(self, *, tenant: str | None = None) -> WorkflowHandle:
        """Record this as a workflow (one transaction) and return its handle."""
        return self.app.submit_workflow(self, tenant=tenant)

    async def submit(self, *, tenant: str | None = None) -> WorkflowHandle:
        """The async form of :meth:`delay`."""
        return await self.app.submit_workflow_async(self, tenant=tenant)

    def _unnamed(self) -> Iterator[Signature[Any]]:
        """The signatures whose steps are named after their tasks (all but a DAG's)."""
        raise NotImplementedError

    def _named(self) -> Iterator[str]:
        """The step names this part gives itself (a DAG's)."""
        return iter(())

    def _compile(self, builder: _Builder, incoming: _Output) -> _Output:
        raise NotImplementedError


class Signature(Canvas, Generic[R]):
    """A task with its arguments and options, to be submitted as a step of a workflow."""

    def __init__(self, app: App, task: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                 receives: str | None = AUTO, options: StepOptions | None = None) -> None:
        if receives not in (AUTO, None, "result", "results"):
            raise ValidationError(f"receives must be 'result', 'results' or None, got {receives!r}")
        self._app = app
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.receives = receives
        self.options = options or StepOptions()

    @property
    def app(self) -> App:
        return self._app

    def set(self, **options: Any) -> Signature[R]:
        """A copy with these options changed (``queue``, ``priority``, ``countdown``, ``eta``,
        ``max_attempts``, ``time_limit``, ``soft_time_limit``, ``retry``; and ``receives``)."""
        receives = options.pop("receives", self.receives)
        unknown = options.keys() - _OPTION_NAMES
        if unknown:
            raise ValidationError(f"unknown option(s) {', '.join(sorted(unknown))}: the options are "
                                  f"{', '.join(sorted(_OPTION_NAMES | {'receives'}))}")
        return Signature(self._app, self.task, self.args, self.kwargs, receives=receives,
                         options=replace(self.options, **options))

    def __repr__(self) -> str:
        arguments = [*(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        return f"{self.task}.{'si' if self.receives is None else 's'}({', '.join(arguments)})"

    def _unnamed(self) -> Iterator[Signature[Any]]:
        yield self

    def _compile(self, builder: _Builder, incoming: _Output) -> _Output:
        return _Output((builder.add(self, incoming.names, self._receives_after(incoming)),), many=False)

    def _receives_after(self, incoming: _Output) -> str | None:
        if self.receives != AUTO:
            return self.receives
        return None if not incoming.names else "results" if incoming.many else "result"


class Chain(Canvas):
    """Each part runs after the one before, and receives what it hands on."""

    def __init__(self, parts: Sequence[Canvas]) -> None:
        if not parts:
            raise ValidationError("a chain needs at least one part")
        self.parts = tuple(parts)

    @property
    def app(self) -> App:
        return _one_app(self.parts)

    def __repr__(self) -> str:
        return " | ".join(repr(part) for part in self.parts)

    def _unnamed(self) -> Iterator[Signature[Any]]:
        for part in self.parts:
            yield from part._unnamed()

    def _named(self) -> Iterator[str]:
        for part in self.parts:
            yield from part._named()

    def _compile(self, builder: _Builder, incoming: _Output) -> _Output:
        for part in self.parts:
            incoming = part._compile(builder, incoming)
        return incoming


class Group(Canvas):
    """The members run in parallel, each receiving what the group receives; its result is the list of theirs."""

    def __init__(self, members: Sequence[Canvas]) -> None:
        if not members:
            raise ValidationError("a group needs at least one member")
        self.members = tuple(members)

    @property
    def app(self) -> App:
        return _one_app(self.members)

    def __repr__(self) -> str:
        return f"group({', '.join(repr(member) for member in self.members)})"

    def _unnamed(self) -> Iterator[Signature[Any]]:
        for member in self.members:
            yield from member._unnamed()

    def _named(self) -> Iterator[str]:
        for member in self.members:
            yield from member._named()

    def _compile(self, builder: _Builder, incoming: _Output) -> _Output:
        names: list[str] = []
        for index, member in enumerate(self.members):
            output = member._compile(builder, incoming)
            if output.many:
                raise ValidationError(f"member {index} of a group ends in a group, so it has no single result: "
                                      "end it with a task (a chord), or make its members members of this group")
            names += output.names
        return _Output(tuple(names), many=True)


@dataclass(frozen=True, slots=True)
class _DagStep:
    signature: Signature[Any]
    parents: tuple[str, ...] = field(default=())


class DAG(Canvas):
    """Named steps, each with the names of the steps it waits for.

    A step with parents receives the list of its parents' results, in the order they are named
    (unless its signature says otherwise: ``.si()``, ``.set(receives="result")``). The DAG's result
    is the result of its one step that no other step waits for, or the list of the results of such
    steps, in the mapping's order. Placed after something in a chain, the steps without parents
    receive what it hands on.
    """

    def __init__(self, steps: Mapping[str, Signature[Any] | tuple[Signature[Any], Sequence[str]]]) -> None:
        if not steps:
            raise ValidationError("a DAG needs at least one step")
        self.steps: dict[str, _DagStep] = {}
        for name, value in steps.items():
            signature, parents = (value, ()) if isinstance(value, Signature) else _pair(name, value)
            if isinstance(parents, str):
                raise ValidationError(f"step {name!r}: its parents must be a list of step names, not a string")
            self.steps[name] = _DagStep(signature, tuple(parents))
        # Checked now, alone, so that an unknown parent or a cycle is named as the DAG names it.
        plan([StepSpec(name, step.signature.task, step.parents) for name, step in self.steps.items()])

    @property
    def app(self) -> App:
        return _one_app([step.signature for step in self.steps.values()])

    def __repr__(self) -> str:
        return f"dag({ {name: (step.signature, list(step.parents)) for name, step in self.steps.items()} !r})"

    def _unnamed(self) -> Iterator[Signature[Any]]:
        return iter(())

    def _named(self) -> Iterator[str]:
        return iter(self.steps)

    def _compile(self, builder: _Builder, incoming: _Output) -> _Output:
        order = plan([StepSpec(name, step.signature.task, step.parents) for name, step in self.steps.items()])
        for spec in order:
            step = self.steps[spec.name]
            if not step.parents:
                builder.add(step.signature, incoming.names, step.signature._receives_after(incoming), name=spec.name)
            else:
                receives = "results" if step.signature.receives == AUTO else step.signature.receives
                builder.add(step.signature, step.parents, receives, name=spec.name)
        waited_for = {parent for step in self.steps.values() for parent in step.parents}
        sinks = tuple(name for name in self.steps if name not in waited_for)
        return _Output(sinks, many=len(sinks) > 1)


def _pair(name: str, value: Any) -> tuple[Signature[Any], Sequence[str]]:
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], Signature):
        return value[0], value[1]
    raise ValidationError(f"step {name!r} must be a signature or (signature, [parent names]), got {value!r:.200}")


def _one_app(parts: Iterable[Canvas]) -> App:
    apps = {id(part.app): part.app for part in parts}
    if len(apps) != 1:
        raise ValidationError("the parts of a workflow belong to different apps")
    return next(iter(apps.values()))


def _parts(items: Sequence[Any], what: str) -> list[Canvas]:
    if len(items) == 1 and not isinstance(items[0], Canvas) and isinstance(items[0], Iterable):
        items = list(items[0])
    for item in items:
        if not isinstance(item, Canvas):
            raise ValidationError(f"a {what} is made of signatures, chains, groups, chords and DAGs, "
                                  f"not {type(item).__name__}")
    return list(items)


def chain(*parts: Canvas | Iterable[Canvas]) -> Chain:
    """Run the parts one after the other, each receiving what the part before hands on."""
    flat: list[Canvas] = []
    for part in _parts(parts, "chain"):
        flat += part.parts if isinstance(part, Chain) else [part]
    return Chain(flat)


def group(*members: Canvas | Iterable[Canvas]) -> Group:
    """Run the members in parallel: ``group(a.s(1), b.s(2))`` or ``group(a.s(i) for i in range(9))``."""
    return Group(_parts(members, "group"))


def chord(header: Group | Iterable[Canvas], body: Canvas) -> Chain:
    """Run ``body`` once every member of ``header`` has succeeded, with the list of their results."""
    return chain(header if isinstance(header, Group) else group(header), body)


def dag(steps: Mapping[str, Signature[Any] | tuple[Signature[Any], Sequence[str]]]) -> DAG:
    """A graph of named steps: ``{"name": (signature, ["parent", ...]), ...}`` (see :class:`DAG`)."""
    return DAG(steps)


# -- compiling ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledWorkflow:
    steps: list[tuple[StepSpec, Signature[Any]]]
    """Parents first."""
    returns: str | list[str]


class _Builder:
    def __init__(self, canvas: Canvas) -> None:
        self.steps: list[tuple[StepSpec, Signature[Any]]] = []
        self._taken = set(canvas._named())
        self._counts = Counter(_short(s.task) for s in canvas._unnamed())
        self._numbers: dict[str, Iterator[int]] = {}

    def add(self, signature: Signature[Any], parents: Sequence[str], receives: str | None,
            name: str | None = None) -> str:
        if name is None:
            name = self._name_for(signature.task)
        self.steps.append((StepSpec(name, signature.task, tuple(parents), receives), signature))
        return name

    def _name_for(self, task: str) -> str:
        """The short task name, numbered when several steps run that task: ``add#1``, ``add#2``..."""
        short = _short(task)
        if self._counts[short] == 1 and short not in self._taken:
            self._taken.add(short)
            return short
        numbers = self._numbers.setdefault(short, itertools.count(1))
        while (name := f"{short}#{next(numbers)}") in self._taken:
            pass
        self._taken.add(name)
        return name


def _short(task: str) -> str:
    return task.rsplit(".", 1)[-1] or task


def compile_workflow(canvas: Canvas) -> CompiledWorkflow:
    """The steps of ``canvas``, checked as a graph (:func:`broker_q.domain.workflow.plan`), and what it returns."""
    if not isinstance(canvas, Canvas):
        raise ValidationError(f"a workflow is a signature, chain, group, chord or DAG, not {type(canvas).__name__}")
    builder = _Builder(canvas)
    output = canvas._compile(builder, _NOTHING)
    signatures = {spec.name: signature for spec, signature in builder.steps}
    ordered = plan([spec for spec, _ in builder.steps])
    returns: str | list[str] = list(output.names) if output.many else output.names[0]
    return CompiledWorkflow([(spec, signatures[spec.name]) for spec in ordered], returns)
