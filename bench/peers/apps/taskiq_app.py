"""Taskiq's no-op task on taskiq-aio-pika.

The queue is a classic durable queue like every other system's here: taskiq-aio-pika 0.6 declares
quorum queues by default, which RabbitMQ 3.10 replicates and fsyncs differently.
"""

from __future__ import annotations

import os

from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue, QueueType

from bench.peers.marks import mark

_queue = os.environ["BENCH_QUEUE"]

broker = AioPikaBroker(
    os.environ["BENCH_AMQP_URL"],
    exchange=Exchange(name=_queue),
    task_queues=[Queue(name=_queue, type=QueueType.CLASSIC)],
    dead_letter_queue=Queue(name=f"{_queue}.dead_letter", type=QueueType.CLASSIC),
)


@broker.task(task_name="mark")
async def marked() -> None:
    mark()
