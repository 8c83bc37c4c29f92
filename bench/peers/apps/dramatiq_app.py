"""Dramatiq's no-op actor on its RabbitMQ broker (default middleware, default settings)."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers.marks import mark

broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="mark", queue_name=os.environ["BENCH_QUEUE"], max_retries=0)
def marked() -> None:
    mark()
