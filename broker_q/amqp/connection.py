"""Connecting to RabbitMQ, with aiormq's errors translated into broker_q's."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from broker_q.errors import BrokerUnavailable

__all__ = ["connect", "redact"]

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


async def connect(url: str, *, timeout: float = 10.0, name: str = "broker_q") -> AbstractRobustConnection:
    """A robust connection: once made, it reconnects by itself and restores channels and consumers.

    Raises :class:`BrokerUnavailable` if the first connection cannot be made within ``timeout``.
    """
    try:
        return await asyncio.wait_for(
            aio_pika.connect_robust(url, client_properties={"connection_name": name}), timeout
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as e:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at {redact(url)}: {e or type(e).__name__}") from e
