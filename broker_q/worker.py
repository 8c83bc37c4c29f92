"""The worker: consumes ready tasks and ingress envelopes, runs handlers, records outcomes.

Delivery guarantees (``docs/guarantees.md`` says the same to users):

- A message is acknowledged only after the event it causes is committed. A worker that dies
  before that leaves its messages unacknowledged; RabbitMQ redelivers them.
- ``started`` is appended, with the version the work message carries, *before* the handler runs.
  The store's unique (task, version) makes that append the arbiter: of two deliveries of one
  task (a duplicate publish, or a redelivery), one wins and the other is acknowledged without
  running. A message delivered twice runs once.
- A redelivered message (RabbitMQ's ``redelivered`` flag) whose task is ``started`` means the
  worker that started it was lost: this worker takes over with attempt n+1, and the history shows
  both attempts. Execution is therefore at least once when workers die; state transitions are
  exactly once.
- The outcome is appended at the version after ``started``; if something else was recorded
  meanwhile (another worker took over, or the task was cancelled), the outcome is dropped and the
  stream keeps the decisive one.
- A failed attempt is retried (``retry_scheduled``, with its due time) or dead-lettered, as the
  task's retry policy says. The worker does not wait for the retry: it acks, and the relay's
  scheduler publishes the task again when it is due.
- A handler is called only with arguments that fit it, as validated against its type hints
  (``broker_q.arguments``). Ingress envelopes whose arguments do not fit are refused; a recorded
  task whose arguments do not fit (its client could not check them) is dead-lettered uncalled.
- Sealed arguments are opened before anything of the app runs; arguments that cannot be opened
  (altered, or under a key that is unknown or shredded) dead-letter the task at once, without a
  retry and without calling the middleware or the handler. With encryption on (or arguments that
  came sealed) the result is sealed before ``succeeded`` is appended, and an ingress envelope's
  arguments are sealed before its ``submitted`` is: no plaintext payload reaches the store.
- A cancellation reaches the workers as an event (each worker's presence queue is bound to the
  events exchange for ``*.task.cancelled``): a running async handler is cancelled at once; a
  running sync handler gets ``AttemptCancelled`` raised in its thread (and ``broker_q.cancelled()``
  turns true in it). A thread cannot be killed: whatever the handler does next is dropped.
- A sync handler that runs on past its hard limit or its cancellation keeps its thread, which the
  worker replaces, so that ``concurrency`` handlers can still run. Past ``max_abandoned_threads``
  such threads the worker stops, as on SIGTERM, and :meth:`Worker.run` raises ``ThreadsExhausted``:
  only a new process gets the threads back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import socket
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import pydantic
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel as AMQPChannel
from aiormq.abc import DeliveredMessage

from broker_q.amqp.connection import connect
from broker_q.amqp.consumer import DirectConsumers
from broker_q.amqp.topology import REASON_HEADER, Topology
from broker_q.breakers import Breakers
from broker_q.codec import check_json
from broker_q.domain.events import (
    IngressRejected,
    TaskCancelled,
    TaskEvent,
    TaskStarted,
    TaskSubmitted,
    TaskSucceeded,
)
from broker_q.domain.retry import RetryPolicy
from broker_q.domain.task import (
    TaskStatus,
    client_task_id,
    dead_lettered_event,
    deferred_event,
    is_startable,
    replay,
    retry_scheduled_event,
    start,
    started_event,
    submit,
    succeeded_event,
)
from broker_q.errors import (
    ConcurrencyConflict,
    DecryptionError,
    DomainError,
    KeysShredded,
    QuotaExceeded,
    SerializationError,
    StoreUnavailable,
    ValidationError,
)
from broker_q.limits import HandlerError, TimeLimitExceeded, run_handler
from broker_q.middleware import Attempt, MiddlewareError, run_hook
from broker_q.store.writer import GroupCommitWriter
from broker_q.threads import HandlerThreads, ThreadsExhausted
from broker_q.wire import ENVELOPE_CONTENT_TYPE, WORK_BATCH_TYPE, TaskEnvelope, WorkMessage

if TYPE_CHECKING:
    from broker_q.app import App, TaskDefinition

__all__ = ["Worker"]

_WORK_BATCH = pydantic.TypeAdapter(list[WorkMessage])
_TENANTS_REFRESH = 2.0
"""Seconds between looks for tenants created since: a new tenant's tasks wait at most this long."""
_CANCEL_TIMEOUT = 2.0
"""Seconds a consumer's cancel may take at shutdown before the worker stops without it."""

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class Worker:
    """A pool of handler slots consuming the given queues. Run it with :meth:`run`."""

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        *,
        concurrency: int | None = None,
        prefetch: int | None = None,
        worker_id: str | None = None,
        shutdown_grace: float | None = None,
        max_abandoned_threads: int | None = None,
    ) -> None:
        settings = app.settings
        self.app = app
        self.queues = list(queues or app.queues)
        self.concurrency = concurrency or settings.worker_concurrency
        self.prefetch = prefetch or settings.worker_prefetch or 2 * self.concurrency
        self.id = worker_id or f"worker:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.shutdown_grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        if max_abandoned_threads is None:
            max_abandoned_threads = settings.worker_max_abandoned_threads
        self.max_abandoned_threads = self.concurrency if max_abandoned_threads is None else max_abandoned_threads
        """Abandoned sync handler threads replaced; one more and the worker stops (:class:`ThreadsExhausted`)."""
        self.topology = Topology(settings.namespace)
        self.ready = asyncio.Event()
        """Set once the worker consumes from all its queues."""
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._pool = HandlerThreads(self.concurrency, spare=self.max_abandoned_threads, name="broker_q-handler")
        self._exhausted = asyncio.Event()
        self._tenants_consumed: set[str] = set()
        """Tenants whose own work queues this worker consumes."""
        """Set when more sync handler threads are abandoned than replaced: the worker stops."""
        self._writer: GroupCommitWriter | None = None
        self._breakers: Breakers | None = None
        self._acks: dict[int, _Acks] = {}
        """Per AMQP channel (delivery tags are numbered per channel, and restart on a new one)."""
        self._publish_channel: AbstractRobustChannel | None = None
        self._connection: AbstractRobustConnection | None = None
        self._running: dict[uuid.UUID, asyncio.Task[Any]] = {}
        """Tasks whose handler runs in this worker now, by task id."""
        self._handlers: dict[uuid.UUID, _CancelScope] = {}
        """The running handlers themselves, by task id: what a cancellation cancels."""
        self._cancelled: collections.OrderedDict[uuid.UUID, None] = collections.OrderedDict()
        """Recently cancelled tasks (bounded): a cancellation that arrives before its handler starts."""
        self._stopping = False

    @property
    def abandoned_threads(self) -> int:
        """Threads of this worker whose sync handlers run on past their hard limit or cancellation."""
        return self._pool.abandoned

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then shut down gracefully (see :meth:`_shutdown`).

        Raises :class:`ThreadsExhausted` after shutting down by itself, when more sync handlers ran on
        past their hard limit or cancellation than it replaces (``max_abandoned_threads``): whoever
        runs the worker should let its process exit, and start a new one.
        """
        for definition in self.app.tasks.values():
            definition.parameters.prepare()  # a type hint that cannot be resolved stops the worker here
        store = await asyncio.to_thread(lambda: self.app.store)
        if self.app.settings.encryption:
            # Now rather than at the first task: a fresh SQLite store makes its master key file here
            # (and says where, to back it up), and a wrong master key stops the worker at once. A
            # tenant whose keys were shredded has its tasks dead-lettered; the worker serves the others.
            with contextlib.suppress(KeysShredded):
                await asyncio.to_thread(store.keys.current, self.app.settings.tenant)
        self._writer = GroupCommitWriter(store)
        self._breakers = Breakers(store, self.app.breaker_policies)
        connection = self._connection = await connect(self.app.settings.amqp_url, name=f"broker_q {self.id}")
        consumers: list[Callable[[], Awaitable[object]]] = []
        """How to cancel each consumer."""
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            # The work queues, where nearly every message comes from, skip aio-pika's per-message
            # objects, on a channel of their own: ``_Acks`` acknowledges runs of a channel's delivery
            # tags in the order they were delivered, which aiormq's callbacks see in tag order but
            # aio-pika's (one task later) do not, so the two kinds of consumer must not share tags.
            work_channel = await connection.channel()
            await work_channel.set_qos(prefetch_count=self.prefetch)
            direct = DirectConsumers(work_channel)
            # Exclusive: it exists exactly while this worker is connected (the robust connection
            # declares it again after a reconnection). Other workers look for it before taking
            # over a task this worker started.
            presence = await channel.declare_queue(self.topology.presence_queue(self.id), exclusive=True,
                                                   auto_delete=True)
            self._publish_channel = await connection.channel(publisher_confirms=True)
            exchanges = await self.topology.declare_exchanges(channel)
            # Cancellations reach every worker through its presence queue (bound again with it
            # after a reconnection): a worker running the task stops it.
            await presence.bind(exchanges["events"], routing_key="*.task.cancelled")
            consumers.append(functools.partial(presence.cancel, await presence.consume(self._on_cancellations,
                                                                                         no_ack=True)))
            for queue in self.queues:
                work_queue = await self.topology.declare_work_queue(work_channel, queue)
                ingress_queue = await self.topology.declare_ingress_queue(channel, queue)
                consumers.append(functools.partial(direct.cancel, await direct.consume(work_queue, self._on_delivery)))
                consumers.append(functools.partial(ingress_queue.cancel, await ingress_queue.consume(
                    self._spawn(functools.partial(self._on_ingress, queue=queue)))))
            unrouted = await channel.declare_queue(self.topology.unrouted, durable=True)
            consumers.append(functools.partial(unrouted.cancel, await unrouted.consume(self._spawn(self._on_unrouted))))
            await self._consume_tenants(work_channel, direct, consumers)
            log.info("%s consuming %s (concurrency %d, prefetch %d, up to %d abandoned threads replaced)", self.id,
                     ",".join(self.queues), self.concurrency, self.prefetch, self.max_abandoned_threads)
            self.ready.set()
            follow = asyncio.ensure_future(self._follow_tenants(work_channel, direct, consumers, stop))
            try:
                await _either(stop, self._exhausted)
            finally:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follow
            await self._shutdown(consumers)
        finally:
            await self._writer.close()
            await connection.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._exhausted.is_set():
            raise ThreadsExhausted(
                f"{self.id} stopped: more than {self.max_abandoned_threads} sync handler threads ran on past their "
                f"hard time limit or cancellation; a new process starts with fresh threads")

    async def _consume_tenants(self, channel: AbstractRobustChannel, direct: DirectConsumers,
                               consumers: list[Callable[[], Awaitable[object]]]) -> None:
        """Consume the work queues of every tenant created since the last look (``Topology.route``).

        Each tenant's queue is a consumer of its own with its own prefetch window, so RabbitMQ hands
        this worker the tasks of every tenant that has some, however long another tenant's backlog is.
        """
        created = await asyncio.to_thread(self.app.tenants.created)
        for tenant in sorted(created - self._tenants_consumed):
            for queue in self.queues:
                work = await self.topology.declare_route(channel, self.topology.route(queue, tenant, created))
                consumers.append(functools.partial(direct.cancel, await direct.consume(work, self._on_delivery)))
            self._tenants_consumed.add(tenant)

    async def _follow_tenants(self, channel: AbstractRobustChannel, direct: DirectConsumers,
                              consumers: list[Callable[[], Awaitable[object]]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(_TENANTS_REFRESH)
            try:
                await self._consume_tenants(channel, direct, consumers)
            except (StoreUnavailable, aiormq.exceptions.AMQPError, ConnectionError) as e:
                log.warning("%s could not look for new tenants' queues (next try in %.0fs): %s", self.id,
                            _TENANTS_REFRESH, e)

    async def _shutdown(self, consumers: list[Callable[[], Awaitable[object]]]) -> None:
        """Stop taking messages, give running tasks ``shutdown_grace`` seconds, then let go of the rest.

        Messages still unacknowledged when the connection closes go back to their queue: those not
        started run elsewhere as usual; those started are taken over as a new attempt.
        """
        self._stopping = True
        for cancel in consumers:
            try:
                # Bounded: while RabbitMQ is unreachable a cancel waits for a connection that may not
                # come back within the grace period; the running tasks must not wait for it.
                async with asyncio.timeout(_CANCEL_TIMEOUT):
                    await cancel()
            except TimeoutError:
                log.warning("%s could not cancel its consumers (RabbitMQ unreachable): stopping without", self.id)
                break
            except Exception as e:  # the channel may be gone already; its messages are requeued anyway
                log.debug("cancelling a consumer: %s", e)
        if self._inflight:
            log.info("%s waiting up to %.0fs for %d task(s)", self.id, self.shutdown_grace, len(self._inflight))
            _, pending = await asyncio.wait(set(self._inflight), timeout=self.shutdown_grace)
            for task in pending:
                task.cancel()  # a sync handler's thread cannot be stopped: it runs on, its outcome dropped
            if pending:
                await asyncio.wait(pending)
                log.warning("%s left %d task(s) unfinished; they will be redelivered", self.id, len(pending))
        if self._pool.abandoned:
            log.warning("%s stops with %d abandoned handler thread(s) still running", self.id, self._pool.abandoned)
        await asyncio.sleep(0)  # let the last completions schedule their acknowledgements
        acks = [ack for channel_acks in self._acks.values() for ack in channel_acks.pending]
        if acks:
            await asyncio.wait(acks, timeout=5)

    def _spawn(self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
               ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            assert message.delivery_tag is not None
            self._acks_of(message.channel).delivered(message.delivery_tag)
            self._track(handler(message))

        return on_message

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        """A work message, as aiormq delivers it (:class:`DirectConsumers`)."""
        tag = message.delivery_tag
        assert tag is not None
        self._acks_of(message.channel).delivered(tag)
        self._track(self._on_work(message))

    def _track(self, handling: Awaitable[None]) -> None:
        # The delivery is handled in a task of the worker's own, not in the consumer task aiormq
        # runs the callback in: aiormq cancels a channel's consumer tasks when the channel closes
        # (a connection blip), which must not cancel a handler that is running. Tracking the tasks
        # is what lets shutdown wait for the work in flight.
        task = asyncio.ensure_future(handling)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _acks_of(self, channel: AMQPChannel) -> _Acks:
        key = id(channel)
        acks = self._acks.get(key)
        if acks is None or acks.channel is not channel:
            # A new channel (after a reconnection): forget the closed ones and their messages.
            for stale in [k for k, a in self._acks.items() if a.channel.is_closed]:
                del self._acks[stale]
            acks = self._acks[key] = _Acks(channel)
        return acks

    # -- work -------------------------------------------------------------------------------

    async def _on_work(self, message: DeliveredMessage) -> None:
        if message.header.properties.message_type == WORK_BATCH_TYPE:
            await self._on_batch(message)
            return
        try:
            work = WorkMessage.model_validate_json(message.body)
        except pydantic.ValidationError as e:
            await self._refuse_delivery(message, f"malformed work message: {_summary(e)}")
            return
        if await self._work(message, work, None):
            self._acks_of(message.channel).done(message.delivery_tag)

    async def _work(self, message: DeliveredMessage, work: WorkMessage, entry: int | None) -> bool:
        """Run one task of a delivery in a handler slot; True when its part of the delivery may be acked.

        ``entry`` is the task's index in a work batch, None for a single work message: what goes to the
        invalid-message queue if running it fails unexpectedly.
        """
        try:
            async with self._slots:
                if self._stopping:
                    return False  # shutting down: left unacknowledged, it goes back to the queue when we close
                return await self._attempt(work)
        except StoreUnavailable as e:
            log.warning("not acknowledging task %s: %s", work.id, e)
        except Exception as e:
            log.exception("task %s: unexpected error", work.id)
            return await self._reject(message, entry, f"internal error while running task {work.id}: "
                                      f"{type(e).__name__}: {e}", source=message.routing_key or "")
        return False

    async def _on_batch(self, message: DeliveredMessage) -> None:
        """A work batch (decision 0014): each entry runs as a single delivery would, in a task of its own
        and a handler slot of its own; the delivery is acknowledged once, after every entry's outcome
        (or refusal) is committed. If one is not, the whole batch comes back, and the entries that
        finished are refused by their version."""
        source = message.routing_key or ""
        runs: list[Awaitable[bool]] = []
        try:
            # The whole array in one pass of pydantic's JSON parser; entry by entry only when one is invalid.
            works = _WORK_BATCH.validate_json(message.body)
            if not works:
                await self._refuse_delivery(message, "malformed work batch: it holds no task")
                return
            runs = [self._work(message, work, index) for index, work in enumerate(works)]
        except pydantic.ValidationError:
            try:
                entries = json.loads(message.body)
                if not isinstance(entries, list):
                    raise ValueError(f"a work batch is a JSON array, not {type(entries).__name__}")
            except (ValueError, RecursionError) as e:  # RecursionError: arrays nested past the parser's depth
                reason = "nested too deep" if isinstance(e, RecursionError) else str(e)
                await self._refuse_delivery(message, f"malformed work batch: {reason}")
                return
            for index, entry in enumerate(entries):
                try:
                    work = WorkMessage.model_validate(entry)
                except pydantic.ValidationError as e:
                    runs.append(self._reject(message, index, f"malformed work message (entry {index} of a work "
                                             f"batch): {_summary(e)}", source=source))
                    continue
                runs.append(self._work(message, work, index))
        # Every entry runs to its end before the batch is judged, whatever another entry raised: none is
        # left running outside the worker's tracked tasks (shutdown waits for this one, and so for all).
        results = await asyncio.gather(*runs, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            log.error("work batch %s: an entry could not be settled (%s: %s); the batch stays unacknowledged and "
                      "is delivered again once this worker's channel closes", message.header.properties.message_id,
                      type(failure).__name__, failure)
        if all(r is True for r in results):
            self._acks_of(message.channel).done(message.delivery_tag)

    async def _attempt(self, work: WorkMessage) -> bool:
        """Record ``started``, run the handler, record the outcome; True when the message may be acked."""
        assert self._writer is not None
        definition = self.app.tasks.get(work.task)
        service = definition.service if definition is not None else None
        if service is not None and await self._deferred(service, work):
            return True
        started = started_event(task_id=work.id, version=work.version + 1, attempt=work.attempt, worker=self.id,
                                tenant=work.tenant, correlation_id=work.correlation_id, now=_now())
        try:
            await self._writer.append([started])
        except ConcurrencyConflict:
            taken = await self._take_over(work, started)
            if taken is None:
                return True
            started = taken
        current = asyncio.current_task()
        assert current is not None
        self._running[work.id] = current
        try:
            if work.id in self._cancelled:
                return True  # cancelled while its ``started`` was being appended: the handler never runs
            # The handler runs in this task, not in one of its own: a task per delivery is what asyncio
            # costs most for, and a cancellation of the task reaches it through the scope alone.
            scope = self._handlers[work.id] = _CancelScope(current)
            try:
                outcome = await self._execute(definition, work, started)
            except asyncio.CancelledError:
                if scope.cancelled:
                    if current.uncancel():
                        raise  # this worker is stopping too: the message goes back to the queue
                    log.info("task %s: cancelled while running", work.id)
                    return True
                if current.cancelling():
                    raise  # this worker is stopping: the message goes back to the queue
                # Nobody cancelled this task: the handler let a CancelledError of its own escape (an
                # inner await that was cancelled). An error of the handler's, decided by its retry
                # policy; left unrecorded it would hold its message unacknowledged for good.
                outcome = self._failed(
                    definition, work, started.version + 1,
                    RuntimeError("the handler raised CancelledError without being cancelled"),
                    traceback.format_exc(), error_type="CancelledError")
            finally:
                del self._handlers[work.id]
            if scope.cancelled:
                current.uncancel()  # the handler swallowed its cancellation and returned: its outcome stands
            if isinstance(outcome, TaskSucceeded):
                outcome = await self._sealed(outcome, arguments_sealed=work.sealed_arguments is not None)
            try:
                await self._writer.append([outcome])
            except ConcurrencyConflict:
                if not await self._is_recorded(outcome):
                    log.info("task %s: outcome dropped, the task was decided elsewhere meanwhile", work.id)
            if service is not None:
                await self._record_for_breaker(service, work, outcome)
            return True
        finally:
            del self._running[work.id]

    async def _deferred(self, service: str, work: WorkMessage) -> bool:
        """Ask ``service``'s circuit breaker; True when it said wait and the task is deferred (ack it).

        A deferral is appended at the version the message carries, like ``started``: if it loses
        that race the delivery goes the usual way (a stale message, or a takeover, which runs even
        while the breaker is open: the attempt was spent already).
        """
        assert self._writer is not None
        assert self._breakers is not None
        try:
            admission = await self._breakers.admit(service, work.id, self.id)
        except (ConcurrencyConflict, StoreUnavailable) as e:
            log.warning("task %s: breaker %s undecided (%s): it runs", work.id, service, e)
            return False
        if admission.action != "defer":
            return False
        assert admission.until is not None
        now = _now()
        deferral = deferred_event(work.id, work.version + 1, work.tenant, self.id, work.correlation_id,
                                  max(admission.until, now), admission.reason, now)
        try:
            await self._writer.append([deferral])
        except ConcurrencyConflict:
            return False
        log.info("task %s deferred to %s: %s", work.id, deferral.due_at.isoformat(), admission.reason)
        return True

    async def _record_for_breaker(self, service: str, work: WorkMessage, outcome: TaskEvent) -> None:
        assert self._breakers is not None
        ok = isinstance(outcome, TaskSucceeded)
        error_type = None if ok else getattr(outcome, "error_type", None)
        try:
            await self._breakers.record(service, work.id, ok, error_type, self.id)
        except (ConcurrencyConflict, StoreUnavailable) as e:
            # The task's outcome is recorded; only the breaker's count misses this attempt.
            log.warning("task %s: outcome not counted by breaker %s: %s", work.id, service, e)

    async def _take_over(self, work: WorkMessage, mine: TaskStarted) -> TaskStarted | None:
        """The slow path after losing the race for ``started``: decide from the task's history.

        Returns the ``started`` event to run under, or None when this delivery must not run (its
        message is then acknowledged): the task is final, runs here or on a live worker, or the
        message is stale.
        """
        assert self._writer is not None
        events = await asyncio.to_thread(self.app.store.read_stream, work.id)
        if len(events) >= mine.version and events[mine.version - 1] == mine:
            return mine  # our own append committed, but its reply was lost and the retry conflicted
        state = replay(e for e in events if isinstance(e, TaskEvent))
        if state is None or state.is_final:
            return None
        running = self._running.get(work.id)
        if running is not None:
            await asyncio.shield(running)  # a redelivery of a task running here: ack once it is recorded
            return None
        if not is_startable(state):
            return None  # blocked on its parents: a message for it will come when it is released
        if state.status is not TaskStatus.STARTED and state.version != work.version:
            return None  # a stale message: a newer one for this task exists (or will, when it is due)
        if state.status is TaskStatus.STARTED and state.worker is not None and await self._is_alive(state.worker):
            return None  # a duplicate: the worker running the task is alive and will record its outcome
        taken = start(state, worker=self.id, now=_now())
        try:
            await self._writer.append([taken])
        except ConcurrencyConflict:
            return None
        if state.status is TaskStatus.STARTED:
            log.warning("task %s: took over from %s, attempt %d", work.id, state.worker, taken.attempt)
        return taken

    async def _is_recorded(self, event: TaskEvent) -> bool:
        events = await asyncio.to_thread(self.app.store.read_stream, event.stream_id)
        return len(events) >= event.version and events[event.version - 1] == event

    async def _is_alive(self, worker: str) -> bool:
        """Whether ``worker`` is connected to RabbitMQ now (its presence queue exists)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(self.topology.presence_queue(worker), passive=True)
            return True
        except aiormq.exceptions.ChannelLockedResource:
            return True  # RESOURCE_LOCKED: it exists, held exclusively by that worker's connection
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False  # NOT_FOUND: the queue, and so the worker's connection, is gone
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _execute(self, definition: TaskDefinition[Any, Any] | None, work: WorkMessage,
                       started: TaskStarted) -> TaskEvent:
        """Run the middleware and the handler; return the attempt's outcome event (not yet appended)."""
        version = started.version + 1
        if work.sealed_arguments is not None:
            try:
                work = await self._opened(work)
            except DecryptionError as e:
                # Every attempt would fail alike, and nothing may run on input that is not what was
                # submitted: a dead letter at once, which a replay with new arguments can revive.
                return dead_lettered_event(
                    work.id, version, work.tenant, self.id, work.correlation_id, type(e).__name__,
                    f"the handler was not called: the arguments of task {work.id} (tenant {work.tenant!r}, key "
                    f"{e.key_id!r}) cannot be opened: {e}", None, _now())
        attempt = Attempt(task_id=work.id, task=work.task, queue=work.queue, tenant=work.tenant,
                          attempt=started.attempt, worker=self.id, args=work.args, kwargs=work.kwargs)
        outcome = await self._outcome(definition, work, version, attempt)
        for middleware in reversed(self.app.middleware):
            try:
                await run_hook(middleware, "after_attempt", attempt, outcome)
            except MiddlewareError as e:
                outcome = self._failed(definition, work, version, e, traceback.format_exc())
        return outcome

    async def _opened(self, work: WorkMessage) -> WorkMessage:
        """``work`` with its sealed arguments opened (in a thread only when the key must be read)."""
        assert work.sealed_arguments is not None
        payloads = self.app.payloads
        open_them = functools.partial(payloads.open_arguments, work.tenant, work.id, work.sealed_arguments)
        if payloads.blocks(work.tenant, work.sealed_arguments):
            args, kwargs = await asyncio.to_thread(open_them)
        else:
            args, kwargs = open_them()
        return work.model_copy(update={"args": args, "kwargs": kwargs, "sealed_arguments": None})

    async def _sealed(self, outcome: TaskSucceeded, *, arguments_sealed: bool) -> TaskSucceeded:
        """``outcome`` with its result sealed when encryption is on or the arguments came sealed."""
        payloads = self.app.payloads
        seal_it = functools.partial(payloads.succeeded, outcome, arguments_sealed=arguments_sealed)
        if (payloads.sealing or arguments_sealed) and payloads.blocks(outcome.tenant):
            return await asyncio.to_thread(seal_it)
        return seal_it()

    async def _outcome(self, definition: TaskDefinition[Any, Any] | None, work: WorkMessage, version: int,
                       attempt: Attempt) -> TaskEvent:
        try:
            if definition is None:
                raise LookupError(f"no handler is registered for task {work.task!r} on {self.id}")
            try:
                args, kwargs = definition.parameters.values(work.args, work.kwargs)
            except ValidationError as e:
                # Recorded by a client that did not check them (one without the handler registered,
                # or before the handler changed): every attempt would fail alike, so none is made.
                return dead_lettered_event(work.id, version, work.tenant, self.id, work.correlation_id,
                                           type(e).__name__, f"the handler was not called: {e}", None, _now())
            for middleware in self.app.middleware:
                await run_hook(middleware, "before_attempt", attempt)
            result = await self._call(definition, work, args, kwargs)
        except TimeLimitExceeded as e:
            return self._failed(definition, work, version, e, traceback.format_exc(), timed_out=True)
        except HandlerError as e:  # raised in an isolated process: its own type and traceback
            return self._failed(definition, work, version, e, e.traceback or "", error_type=e.error_type,
                                message=e.message)
        except Exception as e:
            return self._failed(definition, work, version, e, traceback.format_exc())
        try:
            check_json(result, "the result")
        except SerializationError as e:
            return self._failed(definition, work, version, e, traceback.format_exc(),
                                prefix="the result cannot be recorded: ")
        return succeeded_event(work.id, version, work.tenant, self.id, work.correlation_id, result, _now())

    async def _call(self, definition: TaskDefinition[Any, Any], work: WorkMessage, args: list[Any],
                    kwargs: dict[str, Any]) -> Any:
        """Run the handler with the validated ``args`` and ``kwargs`` under its time limits (the task's
        own, or the handler's). An isolated handler's process is given the JSON arguments, and
        validates them itself the same way."""
        soft = work.soft_time_limit if work.soft_time_limit is not None else definition.soft_time_limit
        hard = work.time_limit if work.time_limit is not None else definition.time_limit
        if definition.isolation == "process":
            args, kwargs = work.args, work.kwargs
        return await run_handler(definition.fn, args, kwargs, is_async=definition.is_async,
                                 soft_time_limit=soft, time_limit=hard, pool=self._pool,
                                 isolation=definition.isolation,
                                 target=(definition.fn.__module__, definition.fn.__qualname__),
                                 on_abandon=functools.partial(self._on_abandon, work.id))

    def _on_abandon(self, task_id: uuid.UUID, reason: str) -> None:
        """A sync handler runs on past its ``reason``: log it, and stop once too many threads are lost."""
        pool = self._pool
        log.warning("task %s: its handler runs on past its %s, its outcome discarded; its thread is abandoned "
                    "(%d abandoned in %s, up to %d replaced)", task_id, reason, pool.abandoned, self.id, pool.spare)
        if pool.exhausted and not self._stopping and not self._exhausted.is_set():
            log.error("%s: %d sync handler threads abandoned, more than the %d it replaces: it stops, for its "
                      "supervisor to start it again", self.id, pool.abandoned, pool.spare)
            self._exhausted.set()

    def _failed(self, definition: TaskDefinition[Any, Any] | None, work: WorkMessage, version: int,
                error: Exception, trace: str, *, prefix: str = "", timed_out: bool = False,
                error_type: str | None = None, message: str | None = None) -> TaskEvent:
        """A retry or a dead letter, as the task's retry policy, changed by its submit's, decides for ``error``."""
        policy = definition.retry if definition is not None else RetryPolicy()
        decision = policy.decide(error, tries=work.attempt - work.first_attempt + 1, draw=random.random(),
                                 max_attempts=work.max_attempts, override=work.retry)
        now = _now()
        error_type = error_type or type(error).__name__
        message = prefix + (str(error) if message is None else message)
        if decision.delay is not None:
            return retry_scheduled_event(work.id, version, work.tenant, self.id, work.correlation_id,
                                         now + timedelta(seconds=decision.delay), error_type, message,
                                         trace, now, timed_out=timed_out)
        return dead_lettered_event(work.id, version, work.tenant, self.id, work.correlation_id, error_type,
                                   message, trace, now, timed_out=timed_out)

    async def _on_cancellations(self, message: AbstractIncomingMessage) -> None:
        """Events of cancelled tasks (a JSON array, as the relay batches them): stop those running here."""
        try:
            records = json.loads(message.body)
            ids = [uuid.UUID(r["stream_id"]) for r in records if r.get("topic") == TaskCancelled.TOPIC]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("ignored a malformed events message on %s: %s", self.topology.presence_queue(self.id), e)
            return
        for task_id in ids:
            self._cancelled[task_id] = None
            while len(self._cancelled) > 10_000:
                self._cancelled.popitem(last=False)
            handler = self._handlers.get(task_id)
            if handler is not None and not handler.cancelled:
                log.info("task %s: cancelled, stopping its handler", task_id)
                handler.cancel()

    # -- ingress ------------------------------------------------------------------------------

    async def _on_ingress(self, message: AbstractIncomingMessage, *, queue: str) -> None:
        assert self._writer is not None
        try:
            event = self._accept(message, queue)
            if not self.app.tenants.unlimited(event.tenant):
                await asyncio.to_thread(self.app._admit, [event])
        except (ValidationError, QuotaExceeded) as e:
            await self._refuse(message, str(e), source=queue)
            return
        except StoreUnavailable as e:  # the quotas could not be read: the message waits for the store
            log.warning("not acknowledging ingress message: %s", e)
            return
        event = await self._sealed_submitted(event)
        try:
            await self._writer.append([event])
        except ConcurrencyConflict:
            pass  # the same idempotency key again: the task exists already
        except StoreUnavailable as e:
            log.warning("not acknowledging ingress message: %s", e)
            return
        self._acks_of(message.channel).done(message.delivery_tag)

    def _accept(self, message: AbstractIncomingMessage, queue: str) -> TaskSubmitted:
        limit = self.app.settings.max_message_bytes
        if len(message.body) > limit:
            raise ValidationError(f"message of {len(message.body)} bytes is over the limit of {limit} bytes")
        media_type = (message.content_type or "").partition(";")[0].strip().lower()
        if media_type not in ("", ENVELOPE_CONTENT_TYPE):
            raise ValidationError(f"content type {message.content_type!r} is not {ENVELOPE_CONTENT_TYPE}")
        try:
            envelope = TaskEnvelope.model_validate_json(message.body)
        except pydantic.ValidationError as e:
            raise ValidationError(f"invalid task envelope: {_summary(e)}") from e
        check_json(envelope.args, "args")  # refuses NaN and Infinity, which the parser lets through
        check_json(envelope.kwargs, "kwargs")
        definition = self.app.tasks.get(envelope.task)
        if definition is None:
            raise ValidationError(f"unknown task {envelope.task!r} for queue {queue!r}")
        definition.check_arguments(envelope.args, envelope.kwargs)
        tenant = envelope.tenant or self.app.settings.tenant
        key = envelope.idempotency_key or message.message_id
        now = _now()
        if envelope.eta is not None and envelope.countdown is not None:
            raise ValidationError("invalid task envelope: give eta or countdown, not both")
        due_at = now + timedelta(seconds=envelope.countdown) if envelope.countdown is not None else envelope.eta
        priority = definition.priority if envelope.priority is None else envelope.priority
        try:
            return submit(
                task_id=client_task_id(tenant, key), task=envelope.task, queue=queue, args=envelope.args,
                kwargs=envelope.kwargs, priority=priority,
                tenant=tenant, actor=f"amqp:{message.app_id or 'ingress'}", now=now,
                correlation_id=envelope.correlation_id, idempotency_key=key,
                due_at=None if due_at is None else due_at.astimezone(UTC), depends_on=envelope.depends_on,
                retry=None if envelope.retry is None else envelope.retry.override(),
            )
        except DomainError as e:
            raise ValidationError(str(e)) from e

    async def _sealed_submitted(self, event: TaskSubmitted) -> TaskSubmitted:
        """An envelope's task with its arguments sealed when encryption is on: AMQP clients send them
        plain (``docs/wire-format.md``), and the plaintext must not reach the store."""
        payloads = self.app.payloads
        if payloads.sealing and payloads.blocks(event.tenant):
            return await asyncio.to_thread(payloads.submitted, event)
        return payloads.submitted(event)

    async def _on_unrouted(self, message: AbstractIncomingMessage) -> None:
        await self._refuse(message, f"no queue serves routing key {message.routing_key!r}",
                           source=message.routing_key or "")

    async def _refuse(self, message: AbstractIncomingMessage, reason: str, *, source: str) -> None:
        """Move ``message`` to the invalid-message queue with ``reason``, record the refusal, then ack it."""
        if await self._invalid(message.body, dict(message.headers or {}), message.content_type, message.message_id,
                               reason, source=source):
            self._acks_of(message.channel).done(message.delivery_tag)

    async def _refuse_delivery(self, message: DeliveredMessage, reason: str) -> None:
        """:meth:`_refuse` for a message as aiormq delivers it (the work queues): the whole message."""
        if await self._reject(message, None, reason, source=message.routing_key or ""):
            self._acks_of(message.channel).done(message.delivery_tag)

    async def _reject(self, message: DeliveredMessage, entry: int | None, reason: str, *, source: str) -> bool:
        """Move the work message ``message``, or its entry number ``entry`` when it is a work batch, to the
        invalid-message queue and record the refusal; True once recorded. The caller acknowledges: a
        batch once, with its other entries."""
        body = message.body
        if entry is not None:
            body = json.dumps(json.loads(body)[entry], separators=(",", ":")).encode()
        properties = message.header.properties
        return await self._invalid(body, dict(properties.headers or {}), properties.content_type,
                                   properties.message_id, reason, source=source)

    async def _invalid(self, body: bytes, headers: dict[str, Any], content_type: str | None,
                       message_id: str | None, reason: str, *, source: str) -> bool:
        """Publish ``body`` to the invalid-message queue with ``reason``; True once the refusal is recorded."""
        assert self._writer is not None
        assert self._publish_channel is not None
        log.warning("refused a message from %s: %s", source, reason)
        headers.update({REASON_HEADER: reason[:1000], "x-broker-q-source": source,
                        "x-broker-q-refused-by": self.id})
        await self._publish_channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, content_type=content_type,
                             message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.topology.invalid_queue,
        )
        stream_id = uuid.uuid4()
        event = IngressRejected(
            stream_id=stream_id, version=1, timestamp=_now(), tenant=self.app.settings.tenant, actor=self.id,
            correlation_id=stream_id, reason=reason, queue=source, message_id=message_id,
            size=len(body), sha256=hashlib.sha256(body).hexdigest(),
        )
        try:
            await self._writer.append([event])
        except StoreUnavailable as e:
            log.warning("refusal of a message not recorded: %s", e)
            return False
        return True


class _CancelScope:
    """A handler running inline in its delivery's task, as a cancellation of its task reaches it.

    :meth:`cancel` cancels the delivery's task and says so, as ``asyncio.timeout`` does: the
    ``CancelledError`` that comes out of the handler is this cancellation's when ``cancelled`` is set
    and ``Task.uncancel()`` leaves no other (the worker stopping cancels the same task, and then the
    delivery must not be acknowledged).
    """

    __slots__ = ("cancelled", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class _Acks:
    """Acknowledges the deliveries of one channel, a run of them with one ``multiple`` ack.

    A group commit completes many messages in the same turn of the event loop; acking the longest
    run of completed messages from the oldest unacked one costs one frame instead of one per
    message. Completed messages behind one still running are acked one by one at once, so a long
    task never holds finished messages (and the prefetch window) unacknowledged.
    """

    def __init__(self, channel: AMQPChannel) -> None:
        self.channel = channel
        self.pending: set[asyncio.Future[None]] = set()
        """Acknowledgements written but not yet sent; shutdown waits for them."""
        self._order: collections.deque[int] = collections.deque()
        self._done: set[int] = set()
        self._acked: set[int] = set()
        self._flush_scheduled = False

    def delivered(self, tag: int) -> None:
        self._order.append(tag)

    def done(self, tag: int | None) -> None:
        """The message ``tag`` may be acknowledged: its outcome is committed."""
        assert tag is not None
        self._done.add(tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        last: int | None = None
        while self._order and (self._order[0] in self._done or self._order[0] in self._acked):
            tag = self._order.popleft()
            if tag in self._acked:
                self._acked.discard(tag)
                continue
            self._done.discard(tag)
            last = tag
        if last is not None:
            self._ack(last, multiple=True)
        for tag in self._done:
            self._ack(tag, multiple=False)
            self._acked.add(tag)
        self._done.clear()

    def _ack(self, tag: int, *, multiple: bool) -> None:
        ack = asyncio.ensure_future(self.channel.basic_ack(tag, multiple=multiple))
        self.pending.add(ack)
        ack.add_done_callback(self.pending.discard)
        ack.add_done_callback(_log_ack_failure)


def _log_ack_failure(ack: asyncio.Future[None]) -> None:
    if not ack.cancelled() and ack.exception() is not None:
        # The channel is gone: its unacked messages are redelivered, and their outcome is in the store.
        log.warning("acknowledgement lost: %s", ack.exception())


async def _either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _summary(error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)

