"""Fixtures shared by every test: real services, isolated per test.

RabbitMQ and PostgreSQL must be running (``.ci/run`` starts them). A missing service fails the
tests that need it with a clear message: it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

AMQP_URL = os.environ.get("BROKER_Q_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_DSN = os.environ.get("BROKER_Q_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    if not _reachable("127.0.0.1", 5672):
        pytest.fail("RabbitMQ is not reachable at 127.0.0.1:5672: start it (rabbitmq-server -detached)")
    return AMQP_URL


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    if not _reachable("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432: start it (pg_ctlcluster ... main start)")
    return PG_DSN


@pytest.fixture
def namespace() -> str:
    """A namespace of exchanges and queues of this test alone."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store.sqlite"


TEST_MASTER_KEY = "dGVzdHMgb25seTogYSBtYXN0ZXIga2V5IG9mIDMyIGI="
"""Base64 of 32 bytes: the master key the tests give a PostgreSQL deployment (it has no default)."""


@pytest.fixture
def pg_url(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A PostgreSQL store in a schema of this test alone, dropped afterwards.

    Like a production deployment, the test gives the master key (``BROKER_Q_MASTER_KEY``, which the
    processes it starts inherit): with encryption on, a PostgreSQL store has no key of its own.
    """
    import psycopg

    monkeypatch.setenv("BROKER_Q_MASTER_KEY", TEST_MASTER_KEY)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{pg_dsn}?schema={schema}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store adapter in turn: the contract suites run against all three."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def durable_store_url(request: pytest.FixtureRequest) -> str:
    """Each store that several processes (or a worker and a client) can share."""
    return str(request.getfixturevalue(f"{request.param}_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
async def amqp_cleanup(amqp_url: str, namespace: str) -> AsyncIterator[list[str]]:
    """Deletes this test's exchanges and queues afterwards; append extra queue names to the list."""
    extra: list[str] = []
    yield extra
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        for queue in [*extra, f"{namespace}.invalid", f"{namespace}.ingress.unrouted",
                      f"{namespace}.work.default", f"{namespace}.ingress.default"]:
            channel = await connection.channel()
            with contextlib.suppress(Exception):  # the queue may not exist; the channel closes on that
                await channel.queue_delete(queue)
        for exchange in ("ingress", "ingress.unrouted", "work", "events"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(f"{namespace}.{exchange}")
    finally:
        await connection.close()
