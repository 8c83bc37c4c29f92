"""The RabbitMQ adapter: connection and topology."""

from broker_q.amqp.connection import connect, redact
from broker_q.amqp.topology import REASON_HEADER, Topology

__all__ = ["REASON_HEADER", "Topology", "connect", "redact"]
