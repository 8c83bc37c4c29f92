"""Consumers that get aiormq's delivered messages as they are, restored with their robust channel.

aio-pika wraps every delivery in an ``IncomingMessage`` (with a guarded ``__setattr__``) and runs
its consumer callback in a task of its own, inside the task aiormq already runs per delivery: for a
queue of many small messages (the work queues) that is a large share of the worker's CPU
(``bench/peers/PROFILE.md``). :class:`DirectConsumers` consumes with aiormq's ``basic_consume``,
so that the callback gets the ``DeliveredMessage`` in aiormq's own task.

What aio-pika's robust queue does for its consumers, this does for these:

- after a reconnection (or a channel that closed and reopened) each consumer consumes again, with
  the same tag, once the robust channel has declared its queues and bindings again;
- a consumer the broker cancels (its queue was deleted, a node went down) has its queue declared
  and bound again and consumes again, retrying with a capped backoff until it does or is cancelled.

Prefetch is the channel's (``set_qos``), as for any consumer on it. Acknowledging is the caller's:
``message.channel.basic_ack(...)``, on the channel the message came from (delivery tags are numbered
per channel and restart on a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustQueue
from aiormq.abc import DeliveredMessage

__all__ = ["DeliveryCallback", "DirectConsumers"]

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]

_MAX_BACKOFF = 5.0


class DirectConsumers:
    """The consumers of one robust channel that bypass aio-pika's per-message objects."""

    def __init__(self, channel: AbstractRobustChannel) -> None:
        self._channel = channel
        self._consumers: dict[str, tuple[AbstractQueue, DeliveryCallback]] = {}
        self._recovering: dict[str, asyncio.Task[None]] = {}
        channel.reopen_callbacks.add(self._on_reopen)

    async def consume(self, queue: AbstractQueue, callback: DeliveryCallback) -> str:
        """Consume ``queue`` (declared on this channel) with ``callback``; return the consumer tag.

        ``callback`` runs in the task aiormq creates for each delivery, which aiormq cancels when
        the channel closes: work that must outlive a connection blip belongs in a task of its own.
        """
        tag = f"broker_q.{uuid.uuid4().hex}"
        self._consumers[tag] = (queue, callback)
        try:
            await self._consume(tag)
        except BaseException:
            del self._consumers[tag]
            raise
        return tag

    async def cancel(self, tag: str) -> None:
        """Stop the consumer ``tag``: no more deliveries; those unacknowledged stay so."""
        if self._consumers.pop(tag, None) is None:
            return
        recovering = self._recovering.pop(tag, None)
        if recovering is not None:
            recovering.cancel()
        underlay = await self._underlay()
        if tag in underlay.consumers:
            await underlay.basic_cancel(tag)

    async def _consume(self, tag: str) -> None:
        queue, callback = self._consumers[tag]
        underlay = await self._underlay()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)  # a set: added once per channel
        if tag not in underlay.consumers:
            await underlay.basic_consume(queue.name, callback, consumer_tag=tag)

    async def _underlay(self) -> aiormq.Channel:
        return cast(aiormq.Channel, await self._channel.get_underlay_channel())

    async def _on_reopen(self, _channel: Any) -> None:
        # The robust channel has declared its queues and bindings again on a new underlying channel.
        for tag in list(self._consumers):
            if tag in self._consumers:
                try:
                    await self._consume(tag)
                except Exception as e:  # one failure must not skip the other consumers
                    # The channel closed again (aiormq raises ChannelInvalidStateError, a
                    # RuntimeError, for a channel closed or not yet open): the next reopen consumes again.
                    log.warning("consumer %s not restored: %r", tag, e)

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        tag = frame.consumer_tag
        if tag in self._consumers and tag not in self._recovering:
            log.warning("the broker cancelled consumer %s of %s: consuming again", tag, self._consumers[tag][0].name)
            self._recovering[tag] = asyncio.ensure_future(self._recover(tag))

    async def _recover(self, tag: str) -> None:
        backoff = 0.1
        try:
            while tag in self._consumers:
                queue, _ = self._consumers[tag]
                try:
                    if isinstance(queue, AbstractRobustQueue):
                        await queue.restore()  # declare the queue and its bindings again
                    else:
                        await queue.declare()
                    await self._consume(tag)
                    return
                except Exception as e:  # retried until it consumes or is cancelled
                    log.warning("consumer %s of %s not restored (next try in %.1fs): %r", tag, queue.name,
                                backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            with contextlib.suppress(KeyError):
                if self._recovering[tag] is asyncio.current_task():
                    del self._recovering[tag]
