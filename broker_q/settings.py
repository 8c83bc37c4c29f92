"""Settings, read once at the edge (``BROKER_Q_*`` environment variables or keyword arguments)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


MAX_WORK_BATCH = 1000
"""The most tasks one work message may pack (``work_batch``)."""


class Settings(BaseSettings):
    """Everything broker_q can be told. Code below the edge receives these values, never ``os.environ``."""

    # hide_input_in_errors: a malformed master key must not be echoed into logs by its error.
    model_config = SettingsConfigDict(env_prefix="BROKER_Q_", frozen=True, extra="forbid", hide_input_in_errors=True)

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
    work_batch: int = Field(
        default=1, gt=0, le=MAX_WORK_BATCH,
        description="Ready tasks of one route and priority the relay packs into one work message (from one page of "
                    "the log). 1 publishes one message per task. With N > 1 a worker may hold up to prefetch x N "
                    "tasks: batches are for short tasks (docs/decisions/0014-work-batches.md)")
    worker_concurrency: int = Field(default=8, gt=0)
    worker_prefetch: int | None = Field(default=None, gt=0, description="Defaults to 2 x concurrency")
    worker_max_abandoned_threads: int | None = Field(
        default=None, ge=0,
        description="Threads of sync handlers that ran on past their hard limit or cancellation that a worker "
                    "replaces; one more and it stops, for its supervisor to restart it. Defaults to the concurrency")
    encryption: bool = Field(
        default=True,
        description="Encrypt task arguments and results per tenant (AES-GCM); metadata stays readable")
    master_key: SecretStr | None = Field(
        default=None,
        description="Base64 of the 32-byte key that wraps the tenants' data keys. With neither this nor "
                    "master_key_file, an SQLite store makes <db>.master.key beside itself (back it up)")
    master_key_file: Path | None = Field(default=None, description="A file holding the master key as base64")
    require_token: bool = Field(
        default=False, description="The CLI refuses to run a command without a token (--token or BROKER_Q_TOKEN); "
                                   "by default the local operator, who can open the store's files, is an admin")
    shutdown_grace: float = Field(default=30.0, ge=0, description="Seconds SIGTERM waits for running tasks")
    api_public_metrics: bool = Field(
        default=False, description="Serve the HTTP API's /metrics without a token (else it needs the read permission)")

    @field_validator("master_key")
    @classmethod
    def _master_key_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = "".join(value.get_secret_value().split()).replace("-", "+").replace("_", "/")
            try:
                key = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("master_key must be base64 of 32 bytes") from None
            if len(key) != 32:
                raise ValueError(f"master_key must be base64 of 32 bytes, not {len(key)}")
        return value

    @model_validator(mode="after")
    def _one_master_key(self) -> Settings:
        if self.master_key is not None and self.master_key_file is not None:
            raise ValueError("give master_key or master_key_file, not both")
        return self
