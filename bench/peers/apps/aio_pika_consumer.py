"""Raw aio-pika consumer: one process, prefetch 200, marks and acks each message.

Usage: python -m bench.peers.apps.aio_pika_consumer (settings from ``BENCH_*``).
"""

from __future__ import annotations

import asyncio
import os

import aio_pika

from bench.peers.marks import mark


async def consume() -> None:
    connection = await aio_pika.connect(os.environ["BENCH_AMQP_URL"])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=200)
    queue = await channel.declare_queue(os.environ["BENCH_QUEUE"], durable=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        mark()
        await message.ack()

    await queue.consume(on_message)
    await asyncio.Future()  # until SIGTERM


if __name__ == "__main__":
    asyncio.run(consume())
