"""Exchange and queue names, and their idempotent declaration.

With namespace ``ns`` (default ``broker_q``)::

    ns.ingress   direct exchange   any AMQP client publishes task envelopes here, routing key = queue
        └─> ns.ingress.<queue>     durable queue, consumed by the workers of <queue>
        └─ alternate exchange ns.ingress.unrouted (fanout) ─> queue ns.ingress.unrouted
                                   envelopes for a queue nobody declared; a worker refuses them
    ns.work      direct exchange   the relay publishes tasks that became ready, routing key = queue
        └─> ns.work.<queue>        durable, x-max-priority 9, consumed by the workers of <queue>
        └─> ns.work.<queue>:<tenant>   the same, for the tasks of a tenant that an admin created
                                   (routing key <queue>:<tenant>): every worker of <queue> consumes
                                   each of these too, so a tenant's backlog never stands in front
                                   of another tenant's tasks
    ns.events    topic exchange    the relay publishes every event, routing key <tenant>.<stream>.<type>
    ns.invalid   durable queue     refused messages, with the reason in header x-broker-q-reason
    ns.worker.<worker id>          exclusive queue: exists while that worker is connected

Every declaration is idempotent, so any process may declare at start and at reconnection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from broker_q.domain.task import MAX_PRIORITY

__all__ = ["REASON_HEADER", "Topology"]

REASON_HEADER = "x-broker-q-reason"


@dataclass(frozen=True)
class Topology:
    namespace: str = "broker_q"

    @property
    def ingress_exchange(self) -> str:
        return f"{self.namespace}.ingress"

    @property
    def unrouted(self) -> str:
        return f"{self.namespace}.ingress.unrouted"

    @property
    def work_exchange(self) -> str:
        return f"{self.namespace}.work"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def invalid_queue(self) -> str:
        return f"{self.namespace}.invalid"

    def work_queue(self, route: str) -> str:
        """The work queue of a route: a queue name, or ``<queue>:<tenant>`` (see :meth:`route`)."""
        return f"{self.namespace}.work.{route}"

    @staticmethod
    def route(queue: str, tenant: str, separated: frozenset[str]) -> str:
        """Where the ready tasks of ``tenant`` in ``queue`` go: a queue of their own if the tenant is
        one of ``separated`` (those an admin created), else the queue shared by every other tenant.

        Queue names never hold ``:``, so no queue's route can be mistaken for a tenant's.
        """
        return f"{queue}:{tenant}" if tenant in separated else queue

    async def declare_route(self, channel: AbstractChannel, route: str) -> AbstractQueue:
        """Declare and bind the work queue of ``route``; a plain queue's ingress queue as well."""
        if ":" not in route:
            return (await self.declare_queue(channel, route))[0]
        return await self.declare_work_queue(channel, route)

    def ingress_queue(self, queue: str) -> str:
        return f"{self.namespace}.ingress.{queue}"

    def presence_queue(self, worker: str) -> str:
        """The exclusive queue that exists while ``worker`` is connected."""
        return f"{self.namespace}.worker.{worker}"

    async def declare_exchanges(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        unrouted = await channel.declare_exchange(self.unrouted, aio_pika.ExchangeType.FANOUT, durable=True)
        unrouted_queue = await channel.declare_queue(self.unrouted, durable=True)
        await unrouted_queue.bind(unrouted)
        await channel.declare_queue(self.invalid_queue, durable=True)
        ingress = await channel.declare_exchange(
            self.ingress_exchange, aio_pika.ExchangeType.DIRECT, durable=True,
            arguments={"alternate-exchange": self.unrouted},
        )
        work = await channel.declare_exchange(self.work_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        events = await channel.declare_exchange(self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        return {"ingress": ingress, "work": work, "events": events}

    async def declare_queue(self, channel: AbstractChannel, queue: str) -> tuple[AbstractQueue, AbstractQueue]:
        """Declare and bind the work and ingress queues of ``queue``; return them in that order."""
        return await self.declare_work_queue(channel, queue), await self.declare_ingress_queue(channel, queue)

    async def declare_work_queue(self, channel: AbstractChannel, queue: str) -> AbstractQueue:
        """Declare and bind the work queue of ``queue``."""
        arguments: dict[str, Any] = {"x-max-priority": MAX_PRIORITY}
        work = await channel.declare_queue(self.work_queue(queue), durable=True, arguments=arguments)
        await work.bind(self.work_exchange, routing_key=queue)
        return work

    async def declare_ingress_queue(self, channel: AbstractChannel, queue: str) -> AbstractQueue:
        """Declare and bind the ingress queue of ``queue``, where other AMQP clients' envelopes arrive."""
        ingress = await channel.declare_queue(self.ingress_queue(queue), durable=True)
        await ingress.bind(self.ingress_exchange, routing_key=queue)
        return ingress
