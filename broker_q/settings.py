"""Settings, read once at the edge (``BROKER_Q_*`` environment variables or keyword arguments)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Everything broker_q can be told. Code below the edge receives these values, never ``os.environ``."""

    model_config = SettingsConfigDict(env_prefix="BROKER_Q_", frozen=True, extra="forbid")

    store: str = Field(default="sqlite:///broker_q.sqlite",
                       description="Event store URL: sqlite:///path, postgresql://user@host/db, memory://")
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    namespace: str = Field(default="broker_q", pattern=r"^[A-Za-z0-9_\-]+$",
                           description="Prefix of every exchange and queue name")
    default_queue: str = "default"
    default_priority: int = Field(default=5, ge=0, le=9)
    tenant: str = "default"
    max_message_bytes: int = Field(default=1_048_576, gt=0, description="Larger ingress messages are refused")
    relay_page_size: int = Field(default=500, gt=0)
    relay_poll_interval: float = Field(
        default=0.1, gt=0,
        description="Seconds between reads of an idle store; the store's change signal wakes the relay sooner")
    worker_concurrency: int = Field(default=8, gt=0)
    worker_prefetch: int | None = Field(default=None, gt=0, description="Defaults to 2 x concurrency")
    worker_max_abandoned_threads: int | None = Field(
        default=None, ge=0,
        description="Threads of sync handlers that ran on past their hard limit or cancellation that a worker "
                    "replaces; one more and it stops, for its supervisor to restart it. Defaults to the concurrency")
    shutdown_grace: float = Field(default=30.0, ge=0, description="Seconds SIGTERM waits for running tasks")
