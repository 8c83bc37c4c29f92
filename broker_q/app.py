"""The application object: the registry of task handlers and the client that submits and reads tasks.

Submitting appends a ``submitted`` event to the event store and nothing else: the relay publishes
it. So a submit succeeds while RabbitMQ is down, and a task recorded is a task that will run.
Creating an :class:`App` performs no I/O; the store is opened on first use.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    NamedTuple,
    ParamSpec,
    TypeAlias,
    TypeVar,
    overload,
)

import pydantic

from broker_q.access import Access
from broker_q.arguments import Parameters
from broker_q.canvas import Canvas, Signature
from broker_q.codec import check_json
from broker_q.domain.breaker import BreakerPolicy
from broker_q.domain.events import Event, TaskEvent, TaskSubmitted
from broker_q.domain.retry import RetryOverride, RetryPolicy
from broker_q.domain.schedule import ScheduleState, define
from broker_q.domain.task import (
    TaskState,
    TaskStatus,
    cancel,
    check_limits,
    client_task_id,
    evolve,
    replay,
    replay_dead_letter,
    submit,
)
from broker_q.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    DomainError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    UnknownTask,
    ValidationError,
)
from broker_q.master_key import MasterKey
from broker_q.middleware import Middleware
from broker_q.payloads import Payloads, arguments_size
from broker_q.schedules import Schedules
from broker_q.settings import Settings
from broker_q.store.eventsourcing import open_store, store_environment
from broker_q.store.port import EventStore
from broker_q.store.writer import GroupCommitWriter
from broker_q.tenants import Tenants

if TYPE_CHECKING:
    from broker_q.domain.workflow import WorkflowStatus
    from broker_q.workflows import WorkflowHandle
    from projections.queries import WaitingTasks

__all__ = ["App", "TaskDefinition", "TaskHandle", "TaskOptions"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


class App:
    """Registers task handlers and submits, reads and waits for tasks.

    Settings come from ``BROKER_Q_*`` environment variables, overridden by keyword arguments
    (``App(store="memory://")``), or from a complete :class:`Settings`. They are read on first use,
    not when the App is made, so a module that defines ``app = App()`` reads nothing at import and
    the command line can still override them (:meth:`configure`).
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self._settings = settings
        self._overrides = overrides
        if settings is not None and overrides:
            self._settings = self._build()
        self.actor = f"client:{socket.gethostname()}:{os.getpid()}"
        self._tasks: dict[str, TaskDefinition[Any, Any]] = {}
        self.middleware: list[Middleware] = []
        """Hooks run around every attempt in this app's workers (:meth:`add_middleware`)."""
        self.breaker_policies: dict[str, BreakerPolicy] = {}
        """Each downstream service's circuit breaker policy (:meth:`breaker`); others get the default."""
        self._store: EventStore | None = None
        self._store_lock = threading.Lock()
        self._access: Access | None = None
        self._tenants: Tenants | None = None
        self._waiting: WaitingTasks | None = None
        self._writers: dict[asyncio.AbstractEventLoop, GroupCommitWriter] = {}

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = self._build()
        return self._settings

    def configure(self, **overrides: Any) -> None:
        """Override settings before the App is used (the command line's ``--store``, ``--amqp-url``)."""
        if self._store is not None:
            raise ConfigurationError("the App is in use already: configure it before its first use")
        self._overrides = {**self._overrides, **overrides}
        self._settings = self._build()

    def _build(self) -> Settings:
        try:
            if self._settings is None:
                return Settings(**self._overrides)
            return Settings(**{**self._settings.model_dump(), **self._overrides})
        except pydantic.ValidationError as e:
            raise ConfigurationError(f"invalid settings: {e}") from e

    # -- registry -----------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> TaskDefinition[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        isolation: Literal["thread", "process"] = "thread",
        service: str | None = None,
    ) -> Callable[[Callable[P, R]], TaskDefinition[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match ParamSpec overloads of a decorator factory
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        isolation: Literal["thread", "process"] = "thread",
        service: str | None = None,
    ) -> TaskDefinition[P, R] | Callable[[Callable[P, R]], TaskDefinition[P, R]]:
        """Register ``fn`` as a task handler; ``name`` defaults to ``module.qualname``.

        ``async def`` handlers run on the worker's event loop, plain functions in its thread pool
        (or, with ``isolation="process"``, each call in a process of its own that the hard time
        limit can kill). ``retry`` says which failures run again and when; ``max_attempts`` is a
        short form of ``RetryPolicy(max_attempts=...)`` with the default backoff. ``time_limit``
        and ``soft_time_limit`` are seconds (``docs/time-limits.md``). Tasks that name a
        ``service`` go through that service's circuit breaker. The arguments of its tasks are checked
        against the handler's signature and type hints when a task is submitted and again before the
        handler runs, which receives them as validated (:mod:`broker_q.arguments`).
        """
        if retry is not None and max_attempts is not None:
            raise ConfigurationError("give either retry=RetryPolicy(...) or max_attempts, not both")
        try:
            policy = retry or RetryPolicy(max_attempts=max_attempts or 1)
            check_limits(max_attempts=None, time_limit=time_limit, soft_time_limit=soft_time_limit)
        except DomainError as e:
            raise ConfigurationError(str(e)) from e
        if isolation not in ("thread", "process"):
            raise ConfigurationError(f"isolation must be 'thread' or 'process', got {isolation!r}")

        def register(fn: Callable[P, R]) -> TaskDefinition[P, R]:
            definition = TaskDefinition(self, fn, name=name or f"{fn.__module__}.{fn.__qualname__}", queue=queue,
                                        priority=priority, retry=policy, time_limit=time_limit,
                                        soft_time_limit=soft_time_limit, isolation=isolation, service=service)
            if isolation == "process" and definition.is_async:
                raise ConfigurationError(f"{definition.name}: isolation='process' is for plain functions; "
                                         "an async handler is cancelled at its limits instead")
            if definition.name in self._tasks:
                raise ConfigurationError(f"a task named {definition.name!r} is registered already")
            self._tasks[definition.name] = definition
            return definition

        return register if fn is None else register(fn)

    def add_middleware(self, middleware: Middleware) -> None:
        """Run ``middleware``'s hooks around every attempt (:mod:`broker_q.middleware`)."""
        if not isinstance(middleware, Middleware):
            raise ConfigurationError(f"{middleware!r} is not a broker_q.middleware.Middleware")
        self.middleware.append(middleware)

    def breaker(self, service: str, policy: BreakerPolicy) -> None:
        """Set the circuit breaker policy of ``service`` (tasks name it: ``@app.task(service=...)``)."""
        self.breaker_policies[service] = policy

    @property
    def tasks(self) -> Mapping[str, TaskDefinition[Any, Any]]:
        return self._tasks

    @property
    def queues(self) -> list[str]:
        """The queues of the registered tasks, in registration order."""
        return list(dict.fromkeys(t.queue for t in self._tasks.values())) or [self.settings.default_queue]

    # -- store --------------------------------------------------------------------------------

    @property
    def store(self) -> EventStore:
        """The event store, opened on first use, with the master key the settings give (see :meth:`master_key`)."""
        with self._store_lock:
            return self._open_store()

    def _open_store(self) -> EventStore:
        if self._store is None:
            self._store = open_store(self.settings.store, master_key=self.master_key())
        return self._store

    @property
    def access(self) -> Access:
        """Tokens, principals and permission checks (:mod:`broker_q.access`)."""
        with self._store_lock:
            if self._access is None:
                self._access = Access(self._open_store())
            return self._access

    @property
    def tenants(self) -> Tenants:
        """Tenants and their quotas, checked at every submit (:mod:`broker_q.tenants`)."""
        with self._store_lock:
            if self._tenants is None:
                self._tenants = Tenants(self._open_store(), waiting=self._waiting_tasks)
            return self._tenants

    def _waiting_tasks(self, tenant: str) -> int:
        if self._waiting is None:
            from projections.queries import WaitingTasks  # the read side, built on this package

            self._waiting = WaitingTasks(self.settings.store)
        return self._waiting(tenant)

    def master_key(self) -> MasterKey | None:
        """The master key of ``master_key`` or ``master_key_file``; None leaves it to the store.

        Without either, an SQLite store makes ``<db>.master.key`` beside its file on first use (and
        says so in a WARNING), while a PostgreSQL store has none: with encryption on, that is a
        :class:`ConfigurationError` here, before anything is recorded.
        """
        settings = self.settings
        if settings.master_key is not None:
            return MasterKey.from_text(settings.master_key.get_secret_value(), "BROKER_Q_MASTER_KEY")
        if settings.master_key_file is not None:
            return MasterKey.from_file(settings.master_key_file)
        if settings.encryption and store_environment(settings.store)["PERSISTENCE_MODULE"] == "eventsourcing.postgres":
            raise ConfigurationError(
                "encryption is on and a PostgreSQL store needs a master key: set BROKER_Q_MASTER_KEY (base64 of "
                "32 bytes, e.g. from `openssl rand -base64 32`) or BROKER_Q_MASTER_KEY_FILE, or switch encryption "
                "off with BROKER_Q_ENCRYPTION=false")
        return None

    @property
    def payloads(self) -> Payloads:
        """Seals the arguments and results of this app's tasks (when ``encryption`` is on) and opens them."""
        return Payloads(lambda: self.store.keys, sealing=self.settings.encryption)

    def close(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            self._access = self._tenants = None
            if self._waiting is not None:
                self._waiting.close()
                self._waiting = None

    # -- submitting ---------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        correlation_id: uuid.UUID | None = None,
        max_attempts: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        depends_on: Sequence[TaskRef] = (),
        retry: RetryPolicy | RetryOverride | None = None,
        actor: str | None = None,
    ) -> TaskHandle[Any]:
        """Record a new task and return its handle. The same ``idempotency_key`` gives the same task.

        ``max_attempts``, ``time_limit`` and ``soft_time_limit`` override the task's own for this task.
        ``retry`` changes the task's retry policy for this task: a :class:`RetryOverride` replaces the
        fields it gives, a :class:`RetryPolicy` all of them (its exception classes are recorded by
        their qualified names). ``max_attempts=n`` is short for ``retry=RetryOverride(max_attempts=n)``.
        ``eta`` (an aware datetime) or ``countdown`` (seconds from now): the task is blocked until
        then, and held by no worker meanwhile. ``depends_on``: tasks (ids or handles) that must all
        succeed first; if one of them fails for good, this task is cancelled (``upstream_failed``).
        ``actor``: who submits, as recorded (default: this client, :attr:`actor`).
        """
        event = self._submitted(task, args, kwargs, queue, priority, idempotency_key, tenant, correlation_id,
                                _Limits(max_attempts, time_limit, soft_time_limit, _override(retry)),
                                _when(eta, countdown), _task_ids(depends_on), actor=actor)
        self._check_parents(event)
        self._admit([event])
        try:
            self.store.append([event])
        except ConcurrencyConflict:
            if idempotency_key is None:
                raise
        return TaskHandle(self, event.stream_id)

    async def submit_async(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        correlation_id: uuid.UUID | None = None,
        max_attempts: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        eta: datetime | None = None,
        countdown: float | None = None,
        depends_on: Sequence[TaskRef] = (),
        retry: RetryPolicy | RetryOverride | None = None,
        actor: str | None = None,
    ) -> TaskHandle[Any]:
        """:meth:`submit` for coroutines; concurrent submits share one transaction (group commit)."""
        build = functools.partial(self._submitted, task, args, kwargs, queue, priority, idempotency_key, tenant,
                                  correlation_id, _Limits(max_attempts, time_limit, soft_time_limit, _override(retry)),
                                  _when(eta, countdown), _task_ids(depends_on), actor=actor)
        event = await asyncio.to_thread(build) if self._sealing_reads_keys(tenant) else build()
        if event.depends_on:
            await asyncio.to_thread(self._check_parents, event)
        if not self.tenants.unlimited(event.tenant):
            await asyncio.to_thread(self._admit, [event])
        try:
            await self._writer().append([event])
        except ConcurrencyConflict:
            if idempotency_key is None:
                raise
        return TaskHandle(self, event.stream_id)

    def _sealing_reads_keys(self, tenant: str | None) -> bool:
        """Whether sealing a submit of ``tenant`` would read the key table now (once a minute at most):
        then a caller on an event loop builds the submit in a thread."""
        payloads = self.payloads
        return payloads.sealing and payloads.blocks(tenant or self.settings.tenant)

    def _writer(self) -> GroupCommitWriter:
        loop = asyncio.get_running_loop()
        writer = self._writers.get(loop)
        if writer is None:
            writer = self._writers[loop] = GroupCommitWriter(self.store, retry_unavailable=False)
        return writer

    def _submitted(
        self,
        task: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        queue: str | None,
        priority: int | None,
        idempotency_key: str | None,
        tenant: str | None,
        correlation_id: uuid.UUID | None,
        limits: _Limits,
        due_at: datetime | None = None,
        depends_on: Sequence[uuid.UUID] = (),
        receives: str | None = None,
        *,
        actor: str | None = None,
    ) -> TaskSubmitted:
        definition = self._tasks.get(task)
        args_list, kwargs_dict = list(args), dict(kwargs or {})
        check_json(args_list, "args")  # refused here, not in the worker later
        check_json(kwargs_dict, "kwargs")
        if definition is not None:
            definition.check_arguments(args_list, kwargs_dict, received=receives is not None)
        tenant = tenant or self.settings.tenant
        task_id = client_task_id(tenant, idempotency_key)
        payloads = self.payloads
        return submit(
            task_id=task_id,
            task=task,
            queue=queue or (definition.queue if definition else self.settings.default_queue),
            args=args_list,
            kwargs=kwargs_dict,
            priority=priority if priority is not None else (
                definition.priority if definition else self.settings.default_priority),
            tenant=tenant,
            actor=actor or self.actor,
            now=utcnow(),
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
            max_attempts=limits.max_attempts,
            time_limit=limits.time_limit,
            soft_time_limit=limits.soft_time_limit,
            retry=limits.retry,
            due_at=due_at,
            depends_on=depends_on,
            receives=receives,
            seal=functools.partial(payloads.seal_arguments, tenant, task_id) if payloads.sealing else None,
        )

    def _admit(self, submitted: Sequence[TaskSubmitted]) -> None:
        """Check tasks of one tenant against its quotas (:meth:`Tenants.admit`), before they are
        recorded: a refusal is recorded and raised as :class:`~broker_q.errors.QuotaExceeded`."""
        first = submitted[0]
        self.tenants.admit(first.tenant, task=first.task, count=len(submitted), actor=first.actor,
                           payload_bytes=lambda: max(arguments_size(e) for e in submitted))

    def _check_parents(self, event: TaskSubmitted) -> None:
        """Refuse parents that do not exist or belong to another tenant.

        A task can only wait for tasks recorded before it, so no dependency cycle can form (a task
        naming itself is refused by the domain).
        """
        for parent in event.depends_on:
            events = self.store.read_stream(parent, to_version=1)
            # Another tenant's task is refused in the very words of a missing one: ids derived from
            # idempotency keys can be computed for any tenant, and must not tell what it submitted.
            if not events or not isinstance(events[0], TaskSubmitted) or events[0].tenant != event.tenant:
                raise ValidationError(f"depends_on: no task with id {parent} in tenant {event.tenant}")

    # -- operating ----------------------------------------------------------------------------

    def cancel(self, task_id: uuid.UUID | str, *, reason: str = "cancelled", actor: str | None = None) -> TaskState:
        """Cancel the task: if it has not started it never will; if it runs, it is asked to stop.

        Raises :class:`~broker_q.errors.DomainError` if the task is final already.
        """
        return self._decide(task_id, lambda state: cancel(state, reason=reason, actor=actor or self.actor,
                                                          now=utcnow()))

    def replay_dead_letter(
        self,
        task_id: uuid.UUID | str,
        *,
        reason: str,
        actor: str | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        version: int | None = None,
    ) -> TaskState:
        """Send a dead letter to run again, recording who, why and what was changed.

        ``version``: the version at which the caller saw the dead letter (a view's row, say). The
        replay is appended right after it or not at all: a task replayed by someone else since, even
        one that failed again, raises :class:`~broker_q.errors.DomainError` instead of running twice.
        """
        def decide(state: TaskState) -> TaskEvent:
            if version is not None and state.version != version:
                raise DomainError(f"task {state.task_id} changed since its dead letter was seen at v{version}: "
                                  f"it is {state.status} at v{state.version}")
            new_args = None if args is None else list(args)
            new_kwargs = None if kwargs is None else dict(kwargs)
            check_json(new_args, "args")
            check_json(new_kwargs, "kwargs")
            if new_args is None and new_kwargs is None:
                return replay_dead_letter(state, reason=reason, actor=actor or self.actor, now=utcnow())
            payloads = self.payloads
            old_args, old_kwargs = payloads.arguments(state)
            whole_args = old_args if new_args is None else new_args
            whole_kwargs = old_kwargs if new_kwargs is None else new_kwargs
            definition = self._tasks.get(state.task)
            if definition is not None:
                definition.check_arguments(whole_args, whole_kwargs)
            if payloads.sealing or state.sealed_arguments is not None:
                sealed = payloads.seal_arguments(state.tenant, state.task_id, whole_args, whole_kwargs)
                return replay_dead_letter(state, reason=reason, actor=actor or self.actor, now=utcnow(),
                                          sealed_arguments=sealed)
            return replay_dead_letter(state, reason=reason, actor=actor or self.actor, now=utcnow(), args=new_args,
                                      kwargs=new_kwargs)

        return self._decide(task_id, decide)

    def _decide(self, task_id: uuid.UUID | str, decide: Callable[[TaskState], TaskEvent]) -> TaskState:
        """Append what ``decide`` makes of the task's current state; decide again if it changed meanwhile."""
        for _ in range(10):
            state = self.get_task(task_id)
            event = decide(state)
            try:
                self.store.append([event])
            except ConcurrencyConflict:
                continue
            return evolve(state, event)
        raise ConcurrencyConflict(f"task {task_id} kept changing while a decision was made; try again")

    # -- reading ------------------------------------------------------------------------------

    def history(self, task_id: uuid.UUID | str) -> list[Event]:
        """Every event of the task, in order."""
        events = self.store.read_stream(_as_uuid(task_id))
        if not events:
            raise TaskNotFound(f"no task with id {task_id}")
        return events

    def get_task(self, task_id: uuid.UUID | str) -> TaskState:
        """The task's current state, replayed from its events."""
        events = self.history(task_id)
        if not all(isinstance(e, TaskEvent) for e in events):
            raise TaskNotFound(f"{task_id} is not a task (it names a {events[0].TYPE} record)")
        state = replay(e for e in events if isinstance(e, TaskEvent))
        assert state is not None
        return state

    def handle(self, task_id: uuid.UUID | str) -> TaskHandle[Any]:
        return TaskHandle(self, _as_uuid(task_id))

    # -- schedules ----------------------------------------------------------------------------

    def schedule(
        self,
        name: str,
        *,
        cron: str,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        timezone: str = "UTC",
        catchup: str = "skip",
        tenant: str | None = None,
        actor: str | None = None,
    ) -> ScheduleState:
        """Create the cron schedule ``name`` or change it to this definition; the same definition
        appends nothing, so it is safe to call at every start.

        ``cron`` has five fields, or six with seconds last; it is read in ``timezone`` (an IANA name).
        ``catchup`` says what happens to ticks missed while no scheduler ran or the schedule was
        paused: ``skip`` them, fire the latest ``once``, or fire ``all`` (at most 1,000). Each fire
        submits ``task`` with these arguments, as a task whose id is derived from the schedule and
        the tick, so that any number of schedulers fire each tick once (``broker-q scheduler``).
        Raises :class:`~broker_q.errors.ValidationError` for a bad definition and
        :class:`~broker_q.errors.UnknownTask` for a task this app does not register (when it
        registers any).
        """
        definition = self._tasks.get(task)
        if definition is None and self._tasks:
            raise UnknownTask(f"no task named {task!r} is registered in this app; it registers "
                              f"{', '.join(sorted(self._tasks))}")
        args_list, kwargs_dict = list(args), dict(kwargs or {})
        if definition is not None:
            definition.check_arguments(args_list, kwargs_dict)
        check_json(args_list, "args")
        check_json(kwargs_dict, "kwargs")
        schedules = self.schedules if tenant is None else Schedules(self.store, tenant=tenant, actor=self.actor)
        checked = define(
            cron=cron, task=task, args=args_list, kwargs=kwargs_dict, timezone=timezone, catchup=catchup,
            queue=queue or (definition.queue if definition else self.settings.default_queue),
            priority=priority if priority is not None else (
                definition.priority if definition else self.settings.default_priority),
            tenant=schedules.tenant, now=utcnow(),
        )
        return schedules.save(name, checked, actor=actor)

    # -- workflows ----------------------------------------------------------------------------

    def signature(self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  **options: Any) -> Signature[Any]:
        """A signature of the task ``name``, registered here or not (``add.s(...)`` for a registered
        one); ``options`` as :meth:`Signature.set <broker_q.canvas.Signature.set>` takes them."""
        return Signature(self, name, args, kwargs).set(**options)

    def submit_workflow(self, workflow: Canvas, *, tenant: str | None = None) -> WorkflowHandle:
        """Record ``workflow`` (a signature, chain, group, chord or DAG) and every step of it, in one
        transaction, and return its handle. A bad graph records nothing (:mod:`broker_q.workflows`)."""
        from broker_q.workflows import Workflows

        return Workflows(self).submit(workflow, tenant=tenant)

    async def submit_workflow_async(self, workflow: Canvas, *, tenant: str | None = None) -> WorkflowHandle:
        """The async form of :meth:`submit_workflow`."""
        from broker_q.workflows import Workflows

        return await Workflows(self).submit_async(workflow, tenant=tenant)

    def workflow(self, workflow_id: uuid.UUID | str) -> WorkflowStatus:
        """Each step's state, what blocks each blocked step, and the workflow's critical path."""
        from broker_q.workflows import Workflows

        return Workflows(self).status(workflow_id)

    def cancel_workflow(self, workflow_id: uuid.UUID | str, *, reason: str = "cancelled",
                        actor: str | None = None) -> WorkflowStatus:
        """Cancel the workflow and every step of it that is not final; running steps are asked to stop."""
        from broker_q.workflows import Workflows

        return Workflows(self).cancel(workflow_id, reason=reason, actor=actor)

    def workflow_handle(self, workflow_id: uuid.UUID | str) -> WorkflowHandle:
        from broker_q.workflows import WorkflowHandle

        return WorkflowHandle(self, _as_uuid(workflow_id))

    @property
    def schedules(self) -> Schedules:
        """This app's tenant's schedules, as the store holds them: ``pause``, ``resume``, ``remove``,
        ``list``, ``next``, ``get``, ``history``."""
        return Schedules(self.store, tenant=self.settings.tenant, actor=self.actor)


TaskRef: TypeAlias = "uuid.UUID | str | TaskHandle[Any]"


def _task_ids(refs: Sequence[Any]) -> list[uuid.UUID]:
    if isinstance(refs, (str, uuid.UUID, TaskHandle)):
        refs = [refs]
    return [ref.id if isinstance(ref, TaskHandle) else _as_uuid(ref) for ref in refs]


def _when(eta: datetime | None, countdown: float | None) -> datetime | None:
    """The due time of ``eta`` or ``countdown`` (not both)."""
    if eta is not None and countdown is not None:
        raise ValidationError("give eta or countdown, not both")
    if countdown is not None:
        if not 0 <= countdown <= 366 * 86400:
            raise ValidationError(f"countdown must be between 0 and a year of seconds, got {countdown}")
        return utcnow() + timedelta(seconds=countdown)
    if eta is None:
        return None
    if eta.utcoffset() is None:
        raise ValidationError(f"eta must be an aware datetime (with a timezone), got {eta.isoformat()}")
    try:
        return eta.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00: past the last time a datetime holds in UTC
        raise ValidationError(f"eta {eta.isoformat()} is out of range") from None


class _Limits(NamedTuple):
    max_attempts: int | None
    time_limit: float | None
    soft_time_limit: float | None
    retry: RetryOverride | None = None


def _override(retry: RetryPolicy | RetryOverride | None) -> RetryOverride | None:
    if retry is None or isinstance(retry, RetryOverride):
        return retry
    if isinstance(retry, RetryPolicy):
        return RetryOverride.of(retry)
    raise ValidationError(f"retry must be a RetryPolicy or a RetryOverride, got {type(retry).__name__}")


class TaskDefinition(Generic[P, R]):
    """A registered handler. Calling it runs the function here; ``delay``/``submit`` record a task."""

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        *,
        name: str,
        queue: str | None,
        priority: int | None,
        retry: RetryPolicy | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        isolation: Literal["thread", "process"] = "thread",
        service: str | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self._queue = queue
        self._priority = priority
        self.retry = retry or RetryPolicy()
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.isolation = isolation
        self.service = service
        self.is_async = inspect.iscoroutinefunction(fn)
        self.parameters = Parameters(fn, name)
        """The handler's parameters: what the arguments are checked against, and validated to."""
        self.signature = self.parameters.signature
        functools.update_wrapper(self, fn)

    @property
    def queue(self) -> str:
        return self._queue or self.app.settings.default_queue

    @property
    def priority(self) -> int:
        return self.app.settings.default_priority if self._priority is None else self._priority

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Record a task that runs this handler with these arguments (blocks until recorded)."""
        return self.app.submit(self.name, args, kwargs)

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """The async form of :meth:`delay`."""
        return await self.app.submit_async(self.name, args, kwargs)

    def options(self, **options: Any) -> TaskOptions[P, R]:
        """This task with submit options: ``add.options(countdown=30, priority=9).delay(1, 2)``.

        The options are :meth:`App.submit`'s: ``queue``, ``priority``, ``eta``, ``countdown``,
        ``depends_on``, ``idempotency_key``, ``tenant``, ``correlation_id``, ``max_attempts``,
        ``time_limit``, ``soft_time_limit``, ``retry``.
        """
        unknown = options.keys() - _SUBMIT_OPTIONS
        if unknown:
            raise ValidationError(f"unknown submit option(s) {', '.join(sorted(unknown))}: the options are "
                                  f"{', '.join(sorted(_SUBMIT_OPTIONS))}")
        return TaskOptions(self, options)

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, received: bool = False) -> None:
        """Refuse arguments that the handler cannot take: their number, names or types
        (:class:`ValidationError` naming the parameter and the type it expects). ``received``: its
        parents' results will come first (:meth:`Parameters.check <broker_q.arguments.Parameters.check>`)."""
        self.parameters.check(args, kwargs, received=received)

    # -- workflows (broker_q.canvas) --

    @overload
    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]: ...

    @overload
    def s(self: TaskDefinition[Concatenate[Any, P2], R], *args: P2.args, **kwargs: P2.kwargs) -> Signature[R]: ...

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this task, a step of a workflow (:mod:`broker_q.canvas`). In a chain or
        after a group it receives the result(s) before it as its first argument: give every argument
        or all but that first one (both are type-checked). Options: ``.s(...).set(queue=...)``."""
        return Signature(self.app, self.name, args, kwargs)

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: the step waits for what comes before it but receives no result."""
        return Signature(self.app, self.name, args, kwargs, receives=None)


_SUBMIT_OPTIONS = frozenset({"queue", "priority", "eta", "countdown", "depends_on", "idempotency_key", "tenant",
                             "correlation_id", "max_attempts", "time_limit", "soft_time_limit", "retry"})


class TaskOptions(Generic[P, R]):
    """A task with submit options (:meth:`TaskDefinition.options`), ready to be submitted."""

    def __init__(self, definition: TaskDefinition[P, R], options: dict[str, Any]) -> None:
        self.definition = definition
        self.options = options

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Record the task with these arguments and the options (blocks until recorded)."""
        return self.definition.app.submit(self.definition.name, args, kwargs, **self.options)

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """The async form of :meth:`delay`."""
        return await self.definition.app.submit_async(self.definition.name, args, kwargs, **self.options)


class TaskHandle(Generic[R]):
    """A submitted task: its id, its state, and a wait for its outcome."""

    def __init__(self, app: App, task_id: uuid.UUID) -> None:
        self.app = app
        self.id = task_id

    def __repr__(self) -> str:
        return f"TaskHandle({self.id})"

    def state(self) -> TaskState:
        return self.app.get_task(self.id)

    def wait(self, timeout: float | None = None) -> R:
        """Block until the task is final; return its result or raise :class:`TaskFailed`.

        Raises ``TimeoutError`` if it is not final after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _poll_delays():
            outcome = self._outcome()
            if outcome is not None:
                return outcome()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"task {self.id} is not finished after {timeout}s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    async def result(self, timeout: float | None = None) -> R:
        """The async form of :meth:`wait`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for delay in _poll_delays():
            outcome = await asyncio.to_thread(self._outcome)
            if outcome is not None:
                return outcome()
            if deadline is not None and loop.time() + delay > deadline:
                raise TimeoutError(f"task {self.id} is not finished after {timeout}s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _outcome(self) -> Callable[[], R] | None:
        try:
            state = self.state()
        except TaskNotFound:
            return None
        if state.status is TaskStatus.SUCCEEDED:
            result: R = self.app.payloads.result(state)
            return lambda: result
        if state.status is TaskStatus.DEAD_LETTERED:
            error = TaskFailed(str(self.id), state.error_type or "Error", state.error or "", state.traceback)
            return functools.partial(_raise, error)
        if state.status is TaskStatus.CANCELLED:
            cancelled = TaskCancelled(str(self.id), "Cancelled", state.cancel_reason or "")
            return functools.partial(_raise, cancelled)
        return None


def _raise(error: Exception) -> Any:
    raise error


def _poll_delays() -> Any:
    delay = 0.002
    while True:
        yield delay
        delay = min(delay * 1.5, 0.1)


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError(f"{value!r} is not a task id") from None

