"""The relay: the only way events reach RabbitMQ, so that appending and publishing cannot disagree.

It follows the store's log from its recorded position, publishes every event to the events
exchange and every task that became ready to the work exchange, waits for the publisher confirms
of the whole page, and only then records the new position. A crash anywhere in between loses
nothing: the page is published again on restart. Consumers must therefore accept duplicates;
workers do, by the stream version carried in each work message (see :mod:`broker_q.worker`).

It reads the log when the store signals a change (:mod:`broker_q.store.notify`) and every
``poll_interval`` seconds in any case.

It also owns time (the scheduler of design flow 4): a task that waits for a time (a retry's
backoff, a deferral while its service's breaker is open) becomes a timer in the store
(:mod:`broker_q.store.timers`), and the relay publishes its work message when it is due. No worker
holds a message for a delay, so any number of waiting tasks cost the workers nothing and survive
restarts.

Sealed arguments (``docs/decisions/0008-payload-encryption.md``) go into work messages as they are
stored: the relay never opens them. Its coordinator does, only to put parents' results in front of a
dependant's arguments, and seals them again for that task.

While RabbitMQ is unreachable the relay retries with a capped backoff; the store keeps every event
meanwhile, so submitting never depends on the broker being up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from broker_q.amqp.connection import connect
from broker_q.amqp.topology import Topology
from broker_q.codec import dumps, encode_event
from broker_q.coordinator import Coordinator
from broker_q.domain.events import (
    TOPICS,
    Event,
    TaskDeferred,
    TaskEvent,
    TaskReleased,
    TaskReplayed,
    TaskRetryScheduled,
    TaskSubmitted,
)
from broker_q.domain.task import TaskState, TaskStatus, replay
from broker_q.store.lease import hold_lease
from broker_q.store.notify import watch_changes
from broker_q.store.port import EventStore, Recorded
from broker_q.store.timers import Timer
from broker_q.tenants import Tenants
from broker_q.wire import WORK_BATCH_TYPE, WORK_MESSAGE_TYPE

__all__ = ["EVENTS_MESSAGE_TYPE", "Relay", "work_message_body"]

log = logging.getLogger(__name__)

EVENTS_MESSAGE_TYPE = "broker_q.events.v1"
_MAX_PAGES_IN_FLIGHT = 8
_RECORD_EVERY = 0.1
"""Seconds between records of the position (a crash republishes at most what was published since)."""
_EVENT_JSON = b'{"position":%d,"stream_id":"%s","version":%d,"topic":"%s","data":%s}'


_MAX_BATCH_BYTES = 1_048_576
"""A work batch is closed before its body would pass this (far below RabbitMQ's message size limit)."""
_TIMERS_PER_TICK = 500
_TENANTS_REFRESH = 2.0
"""Seconds between reads of which tenants have queues of their own."""


def work_message_body(event: TaskSubmitted) -> bytes:
    """The :class:`~broker_q.wire.WorkMessage` JSON for a task that became ready with ``event``."""
    message: dict[str, Any] = {
        "id": event.stream_id, "version": event.version, "attempt": 1, "task": event.task, "queue": event.queue,
        "args": event.args, "kwargs": event.kwargs, "priority": event.priority, "tenant": event.tenant,
        "correlation_id": event.correlation_id,
    }
    for name in ("max_attempts", "time_limit", "soft_time_limit", "retry", "sealed_arguments"):
        if getattr(event, name) is not None:
            message[name] = getattr(event, name)
    return dumps(message)


def work_message_for(state: TaskState) -> bytes:
    """The work message of a task that is ready (or due) in ``state``: its next attempt."""
    message: dict[str, Any] = {
        "id": state.task_id, "version": state.version, "attempt": state.attempts + 1,
        "first_attempt": state.first_attempt, "task": state.task, "queue": state.queue, "args": state.args,
        "kwargs": state.kwargs, "priority": state.priority, "tenant": state.tenant,
        "correlation_id": state.correlation_id,
    }
    for name in ("max_attempts", "time_limit", "soft_time_limit", "sealed_arguments"):
        if getattr(state, name) is not None:
            message[name] = getattr(state, name)
    if state.retry is not None:
        message["retry"] = state.retry.to_json()
    return dumps(message)


def event_routing_key(event: Event) -> str:
    return f"{event.tenant}.{_ROUTING_SUFFIX[event.TOPIC]}"


def _routing_suffix(cls: type[Event]) -> str:
    stream = "task" if cls.TOPIC.startswith("broker_q.task.") else cls.TOPIC.split(".")[1]
    return f"{stream}.{cls.TYPE}"


_ROUTING_SUFFIX = {topic: _routing_suffix(cls) for topic, cls in TOPICS.items()}
"""Each topic's routing key after ``<tenant>.``: ``<stream>.<type>``."""
_ROUTED = frozenset(cls.TOPIC for cls in (TaskSubmitted, TaskRetryScheduled, TaskDeferred, TaskReplayed, TaskReleased))
"""The topics the relay decodes: those that may make a task ready or set a timer. Every other event
is republished from its stored JSON, routed by its stored topic and tenant (``Recorded.tenant``)."""
_TOPIC_JSON = {topic: topic.encode() for topic in TOPICS}


def work_properties(priority: int, message_id: str, message_type: str = WORK_MESSAGE_TYPE) -> Basic.Properties:
    """The AMQP properties of a work message (persistent: it survives a broker restart)."""
    return Basic.Properties(delivery_mode=2, priority=priority, content_type="application/json",
                            message_type=message_type, message_id=message_id)


def _publish_work(raw: aiormq.Channel, exchange: str, route: str, priority: int, message_id: str, body: bytes,
                  message_type: str = WORK_MESSAGE_TYPE) -> Awaitable[Any]:
    """Publish a work message (or batch) mandatory, so that a deleted queue fails its page; await the confirm."""
    return raw.basic_publish(body, exchange=exchange, routing_key=route, mandatory=True, wait=False,
                             properties=work_properties(priority, message_id, message_type))


class _WorkBatch:
    """Work messages of one route and priority, in log order, waiting to go out as one (decision 0014)."""

    __slots__ = ("bodies", "ids", "size")

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.ids: list[str] = []
        self.size = 2

    def add(self, message_id: str, body: bytes) -> None:
        self.bodies.append(body)
        self.ids.append(message_id)
        self.size += len(body) + 1

    def message(self) -> tuple[bytes, str, str]:
        """Body, ``message_id`` and ``type``: a batch of one goes out as the single message it holds."""
        if len(self.bodies) == 1:
            return self.bodies[0], self.ids[0], WORK_MESSAGE_TYPE
        return b"[" + b",".join(self.bodies) + b"]", f"{self.ids[0]}..{self.ids[-1]}", WORK_BATCH_TYPE


class Relay:
    def __init__(
        self,
        store: EventStore,
        amqp_url: str,
        topology: Topology,
        *,
        name: str = "relay",
        page_size: int = 500,
        poll_interval: float = 0.1,
        max_backoff: float = 5.0,
        store_url: str | None = None,
        work_batch: int = 1,
    ) -> None:
        if work_batch < 1:
            raise ValueError(f"work_batch must be at least 1, not {work_batch}")
        self._store = store
        self._amqp_url = amqp_url
        self._topology = topology
        self._name = name
        self._page_size = page_size
        self._poll_interval = poll_interval
        self._max_backoff = max_backoff
        self._store_url = store_url
        self._work_batch = work_batch
        """Ready tasks of one route and priority packed into one work message (decision 0014); 1: one each."""
        self._declared: set[str] = set()
        self._tenants = Tenants(store)
        self._separated: frozenset[str] = frozenset()
        """Tenants whose tasks have work queues of their own (:meth:`Topology.route`), read every 2 s."""
        self._separated_at = -float("inf")
        self.wakeup = asyncio.Event()
        """Set it to make an idle relay look at the store at once (an in-process hint; polling is the guarantee)."""
        self.position = 0
        """The position up to which every event is published and confirmed."""
        self.active = asyncio.Event()
        """Set while this relay holds the store's lease and publishes."""
        self.coordinator = Coordinator(store)
        self._coordinating = asyncio.Lock()
        """Releases and cancels the dependants of the tasks in each page (:mod:`broker_q.coordinator`)."""
        self._timers_changed = asyncio.Event()
        self.timers_published = 0
        """Work messages of due timers published (and confirmed) by this relay."""

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set, reconnecting to RabbitMQ and the store as often as needed.

        Given the ``store_url``, the relay first takes the store's lease (a standby waits) and reads
        whenever the store signals a change; without it, it only polls.
        """
        if self._store_url is None:
            await self._run(stop)
            return
        while not stop.is_set():
            relaying = asyncio.create_task(self._run_leased(stop, self._store_url))
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({relaying, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not relaying.done() and not self.active.is_set():
                    relaying.cancel()  # a standby that never got the lease: nothing to finish
                with contextlib.suppress(asyncio.CancelledError):
                    await relaying
            finally:
                stopping.cancel()

    async def _run_leased(self, stop: asyncio.Event, store_url: str) -> None:
        """Relay while holding the store's lease; return when stopped or when the lease is lost."""
        async with hold_lease(store_url, self._name) as lease:
            self.active.set()
            log.info("relay %s holds the lease", self._name)
            watcher = asyncio.create_task(watch_changes(store_url, self.wakeup))
            relaying = asyncio.create_task(self._run(stop))
            lost = asyncio.create_task(lease.lost.wait())
            try:
                await asyncio.wait({relaying, lost}, return_when=asyncio.FIRST_COMPLETED)
                if not relaying.done():
                    log.warning("relay %s lost its lease: standing by again", self._name)
                    relaying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relaying
            finally:
                for task in (watcher, lost):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self.active.clear()

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                await self._run_connected(stop)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("relay interrupted (%s: %s); retrying in %.1fs", type(e).__name__, e, backoff)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, self._max_backoff)
            else:
                return

    async def _run_connected(self, stop: asyncio.Event) -> None:
        connection = await connect(self._amqp_url, name=f"broker_q relay {self._name}")
        in_flight: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        scheduler: asyncio.Task[None] | None = None
        try:
            # A work message the broker returns (no queue bound: deleted by an operator, say) must
            # fail its page, not count as confirmed: on_return_raises makes the publish raise.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchanges = await self._topology.declare_exchanges(channel)
            names = {kind: exchange.name for kind, exchange in exchanges.items()}
            # Straight to aiormq: aio-pika's Message and Exchange.publish cost ~40 us per work message.
            raw = cast(aiormq.Channel, await channel.get_underlay_channel())
            self._declared.clear()
            self.position = await asyncio.to_thread(self._store.get_position, self._name)
            self.coordinator.take_over()  # another relay may have stored edges since this one last read
            log.info("relay %s publishing from position %d", self._name, self.position)
            scheduler = asyncio.create_task(self._schedule(channel, raw, names["work"], stop))
            read_position = recorded_position = self.position
            recorded_at = time.monotonic()
            while not stop.is_set():
                # Pages are published without waiting for the confirms of the pages before them
                # (RabbitMQ may take a few hundred ms to confirm persistent messages): up to
                # _MAX_PAGES_IN_FLIGHT. ``position`` advances, in order, only past confirmed pages.
                while in_flight and in_flight[0][1].done():
                    confirmed, page = in_flight.popleft()
                    page.result()  # a failed publish ends this connection; the outer loop retries
                    self.position = confirmed
                # The position is recorded at most every _RECORD_EVERY seconds, never at once: a
                # commit here would compete for SQLite's write lock with the worker's ``started``
                # right when the task just published reaches it. A crash republishes the rest.
                if self.position > recorded_position and time.monotonic() - recorded_at > _RECORD_EVERY:
                    await asyncio.to_thread(self._store.set_position, self._name, self.position)
                    recorded_position, recorded_at = self.position, time.monotonic()
                if len(in_flight) >= _MAX_PAGES_IN_FLIGHT:
                    await asyncio.wait([in_flight[0][1]])
                    continue
                self.wakeup.clear()  # before reading: a commit after the read sets it again
                if scheduler.done():
                    scheduler.result()  # the scheduler failed: end this connection, the outer loop retries
                records = await asyncio.to_thread(self._store.read_log, read_position, self._page_size,
                                                  decode=_ROUTED)
                if records:
                    page = asyncio.ensure_future(self._publish(channel, raw, names, records))
                    in_flight.append((records[-1].position, page))
                    read_position = records[-1].position
                    continue
                if in_flight:
                    woken: asyncio.Future[Any] = asyncio.ensure_future(self.wakeup.wait())
                    waiting: list[asyncio.Future[Any]] = [in_flight[0][1], woken]
                    try:
                        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                    continue
                await _wait(stop, self._poll_interval, self.wakeup)
            if in_flight:
                await asyncio.gather(*(page for _, page in in_flight))
                self.position = in_flight[-1][0]
                in_flight.clear()
            if self.position > recorded_position:
                await asyncio.to_thread(self._store.set_position, self._name, self.position)
        finally:
            for _, page in in_flight:
                page.cancel()
            if scheduler is not None:
                scheduler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await scheduler  # its failure, if any, was raised above already
            await connection.close()

    async def _publish(
        self, channel: AbstractChannel, raw: aiormq.Channel, names: dict[str, str],
        records: list[Recorded],
    ) -> None:
        # Events go out as one message per routing key per page, a JSON array in log order: topic
        # routing works as for single events, and the relay publishes a few messages per page
        # instead of one per event (one per event capped the whole system at the broker's
        # publish rate). Ready tasks go out one message each (each is consumed and acked alone), or
        # with ``work_batch`` > 1 packed by route and priority, in log order (decision 0014).
        # Only the events that may make a task ready are decoded (``_ROUTED``): the others are
        # forwarded as stored, and the publishes go straight to aiormq, without aio-pika's objects.
        async with self._coordinating:
            # Pages are published concurrently, but the coordinator must see them one at a time and
            # in log order (the lock is first come, first served, and pages start in order). Before
            # the page counts as published: the position never passes a finished parent whose
            # dependants are not released or cancelled yet.
            if self.coordinator.concerns(records):
                await asyncio.to_thread(self.coordinator.process, records)
        confirms: list[Awaitable[Any]] = []
        batches: dict[str, list[bytes]] = {}
        work_batches: dict[tuple[str, int], _WorkBatch] = {}
        timers: list[Timer] = []
        if time.monotonic() - self._separated_at >= _TENANTS_REFRESH:
            self._separated = await asyncio.to_thread(self._tenants.created)
            self._separated_at = time.monotonic()
        route = functools.partial(self._topology.route, separated=self._separated)
        work_exchange = names["work"]
        for record in records:
            topic = record.topic
            key = f"{record.tenant}.{_ROUTING_SUFFIX[topic]}"
            body = _EVENT_JSON % (record.position, str(record.stream_id).encode(), record.version,
                                  _TOPIC_JSON[topic], record.data or encode_event(record.event))
            batch = batches.get(key)
            if batch is None:
                batches[key] = [body]
            else:
                batch.append(body)
            if topic not in _ROUTED:
                continue
            event = record.event
            if isinstance(event, TaskSubmitted):
                if event.depends_on:
                    continue  # blocked until the coordinator releases it
                where = route(event.queue, event.tenant)
                if event.due_at is not None and event.due_at > event.timestamp:
                    timers.append(Timer(f"{event.stream_id}:{event.version}", event.due_at.timestamp(), where,
                                        event.priority, work_message_body(event)))
                    continue
                await self._declare(channel, where)
                self._work(raw, work_exchange, confirms, work_batches, where, event.priority,
                           f"{event.stream_id}:{event.version}", work_message_body(event))
            elif isinstance(event, (TaskRetryScheduled, TaskDeferred, TaskReplayed, TaskReleased)):
                state = await self._state_at(event)
                if state is None:
                    continue
                where = route(state.queue, state.tenant)
                if state.status is TaskStatus.READY:  # replayed, or released with nothing to wait for
                    await self._declare(channel, where)
                    self._work(raw, work_exchange, confirms, work_batches, where, state.priority,
                               f"{state.task_id}:{state.version}", work_message_for(state))
                elif state.due_at is not None:
                    timers.append(Timer(f"{state.task_id}:{state.version}", state.due_at.timestamp(), where,
                                        state.priority, work_message_for(state)))
        for (where, priority), unfilled in work_batches.items():
            confirms.append(self._publish_batch(raw, work_exchange, where, priority, unfilled))
        if timers:
            # Stored before the page counts as published: the position never passes a waiting task
            # whose timer is not on disk.
            await asyncio.to_thread(self._store.timers.add, timers)
            self._timers_changed.set()
        first = records[0].position
        for routing_key, bodies in batches.items():
            confirms.append(raw.basic_publish(
                b"[" + b",".join(bodies) + b"]", exchange=names["events"], routing_key=routing_key,
                mandatory=False, wait=False,  # nobody has to listen to events
                properties=Basic.Properties(delivery_mode=2, content_type="application/json",
                                            message_type=EVENTS_MESSAGE_TYPE, message_id=f"{first}:{routing_key}"),
            ))
        try:
            await asyncio.gather(*confirms)
        except Exception:
            self._declared.clear()  # the page is published again, after declaring its queues again
            raise

    def _work(self, raw: aiormq.Channel, exchange: str, confirms: list[Awaitable[Any]],
              batches: dict[tuple[str, int], _WorkBatch], route: str, priority: int, message_id: str,
              body: bytes) -> None:
        """Publish a ready task's work message, or put it in its route's batch (published when full,
        or at the end of the page)."""
        if self._work_batch == 1:
            confirms.append(_publish_work(raw, exchange, route, priority, message_id, body))
            return
        key = (route, priority)
        batch = batches.get(key)
        if batch is not None and batch.size + len(body) + 1 > _MAX_BATCH_BYTES:
            confirms.append(self._publish_batch(raw, exchange, route, priority, batch))
            batch = None
        if batch is None:
            batch = batches[key] = _WorkBatch()
        batch.add(message_id, body)
        if len(batch.bodies) >= self._work_batch:
            confirms.append(self._publish_batch(raw, exchange, route, priority, batch))
            del batches[key]

    @staticmethod
    def _publish_batch(raw: aiormq.Channel, exchange: str, route: str, priority: int,
                       batch: _WorkBatch) -> Awaitable[Any]:
        body, message_id, message_type = batch.message()
        return _publish_work(raw, exchange, route, priority, message_id, body, message_type)

    async def _declare(self, channel: AbstractChannel, route: str) -> None:
        if route not in self._declared:
            # Declaring before publishing means a task can never be routed to nowhere.
            await self._topology.declare_route(channel, route)
            self._declared.add(route)

    async def _state_at(self, event: TaskEvent) -> TaskState | None:
        """The task as of ``event`` (not as of now: the relay publishes what the event made of it)."""
        events = await asyncio.to_thread(self._store.read_stream, event.stream_id, to_version=event.version)
        try:
            return replay(e for e in events if isinstance(e, TaskEvent))
        except Exception:
            log.exception("task %s: its history cannot be replayed; its work message is not published",
                          event.stream_id)
            return None

    async def _schedule(self, channel: AbstractChannel, raw: aiormq.Channel, work_exchange: str,
                        stop: asyncio.Event) -> None:
        """Publish the work message of each timer when it is due, then remove the timer.

        Removal comes after the confirm: a crash in between publishes the message again, which the
        workers refuse by its version. Due timers go out in pages of at most _TIMERS_PER_TICK.
        """
        timers = self._store.timers
        while not stop.is_set():
            self._timers_changed.clear()
            due = await asyncio.to_thread(timers.due, time.time(), _TIMERS_PER_TICK)
            if due:
                for timer in due:
                    await self._declare(channel, timer.queue)
                await asyncio.gather(*(_publish_work(raw, work_exchange, t.queue, t.priority, t.key, t.body)
                                       for t in due))
                await asyncio.to_thread(timers.remove, [t.key for t in due])
                self.timers_published += len(due)
                continue
            next_due = await asyncio.to_thread(timers.next_due)
            wait = self._poll_interval * 10 if next_due is None else min(max(next_due - time.time(), 0.0), 1.0)
            await _wait(stop, wait, self._timers_changed)


async def _wait(stop: asyncio.Event, timeout: float, also: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if also is not None:
        waiters.append(asyncio.ensure_future(also.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
