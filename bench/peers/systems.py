"""The systems measured side by side: how to start each one's workers, where its queues are, and how
to clean up after it. Each run of each system gets fresh queues (and a fresh store or result schema)."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import shutil
import sqlite3
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

from bench import e2e

__all__ = ["SYSTEMS", "Context", "System"]

PYTHON = sys.executable
AMQP_URL = e2e.AMQP_URL
PG_DSN = e2e.PG_DSN
_SUCCEEDED = "broker_q.task.succeeded"


@dataclass
class Context:
    """One system's run: unique names, a scratch folder on disk, and the environment of its processes."""

    name: str
    dir: Path
    env: dict[str, str]
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    store_url: str = ""
    schema: str = ""
    reader: Any = None
    """broker_q: a database connection kept open on the run's store, so that polling it is cheap."""


class System:
    id: str
    label: str
    client: str
    modules: tuple[str, ...] = ()
    task_cap: int | None = None
    """At most this many tasks per run (the slow rows), or None for --tasks."""

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def prepare(self, ctx: Context) -> None:
        ctx.env["BENCH_QUEUE"] = ctx.name
        ctx.queues.append(ctx.name)

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        raise NotImplementedError

    def durable_done(self, ctx: Context, n: int) -> bool | None:
        """Cheaply: are all n tasks recorded as done where the system keeps state? None if it keeps none."""
        count = self.durable_count(ctx, n)
        return None if count is None else count >= n

    def durable_count(self, ctx: Context, n: int) -> int | None:
        """How many tasks are recorded as done where the system keeps state, or None if it keeps none."""
        return None

    def cleanup(self, ctx: Context) -> None:
        pass


class BrokerQ(System):
    client = "broker_q"

    def __init__(self, store: str, work_batch: int = 1, workers: int = 1) -> None:
        self.store = store
        self.work_batch = work_batch
        self.workers = workers
        batched = f"-batch{work_batch}" if work_batch > 1 else ""
        processes = f"-{workers}workers" if workers > 1 else ""
        self.id = f"broker_q-{store}{batched}{processes}"
        relay = f"`broker-q relay --work-batch {work_batch}`" if work_batch > 1 else "`broker-q relay`"
        worker = "`broker-q worker`" if workers == 1 else f"{workers} x `broker-q worker`"
        self.label = f"broker_q, {store} store ({relay} + {worker}, concurrency 200)"
        self._apps: dict[str, object] = {}

    def prepare(self, ctx: Context) -> None:
        ctx.name = f"bench{uuid.uuid4().hex[:8]}"
        ctx.store_url = e2e.store_url(self.store)
        # A master key of the run's own: with payload encryption on (the default), a PostgreSQL store
        # needs one, and an SQLite store would otherwise write one beside itself. Versions of broker_q
        # without encryption ignore the variable.
        ctx.env.update(BROKER_Q_STORE=ctx.store_url, BROKER_Q_NAMESPACE=ctx.name, BROKER_Q_AMQP_URL=AMQP_URL,
                       BROKER_Q_MASTER_KEY=base64.b64encode(os.urandom(32)).decode())

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        cli = [PYTHON, "-m", "broker_q.cli"]
        relay = [*cli, "relay"] + (["--work-batch", str(self.work_batch)] if self.work_batch > 1 else [])
        worker = [*cli, "worker", "bench.peers.apps.broker_q_app:app", "--concurrency", "200"]
        return [*[worker] * self.workers, relay]

    def _count_succeeded(self, ctx: Context) -> int:
        # Plain SQL on the store's table, on a connection kept open: no App (which would need the run's
        # master key to decode sealed events) and no decoding, so polling it is cheap.
        if ctx.store_url.startswith("sqlite:///"):
            if ctx.reader is None:
                ctx.reader = sqlite3.connect(ctx.store_url.removeprefix("sqlite:///"), isolation_level=None)
            row = ctx.reader.execute("SELECT count(*) FROM stored_events WHERE topic = ?", (_SUCCEEDED,)).fetchone()
        else:
            import psycopg

            if ctx.reader is None:
                ctx.reader = psycopg.connect(PG_DSN, autocommit=True)
            schema = ctx.store_url.split("schema=")[1]
            row = ctx.reader.execute(f'SELECT count(*) FROM "{schema}".brokerq_events WHERE topic = %s',
                                     (_SUCCEEDED,)).fetchone()
        return int(row[0]) if row else 0

    def durable_count(self, ctx: Context, n: int) -> int | None:
        return self._count_succeeded(ctx)

    def cleanup(self, ctx: Context) -> None:
        if ctx.reader is not None:
            ctx.reader.close()
        e2e.drop_schema(ctx.store_url)
        if ctx.store_url.startswith("sqlite:///"):
            shutil.rmtree(Path(ctx.store_url.removeprefix("sqlite:///")).parent, ignore_errors=True)
        ctx.queues += [f"{ctx.name}.{q}" for q in ("work.default", "ingress.default", "ingress.unrouted", "invalid")]
        ctx.exchanges += [f"{ctx.name}.{x}" for x in ("ingress", "ingress.unrouted", "work", "events")]


class Celery(System):
    client = "celery"
    modules = ("celery",)

    def __init__(self, pool: str, concurrency: int, results: str | None = None) -> None:
        self.pool, self.concurrency, self.results = pool, concurrency, results
        self.id = f"celery-{pool}" + (f"-db-{results}" if results else "")
        self.label = f"Celery, {pool} pool x {concurrency}" + (
            f", acks_late + track_started + {results} result backend" if results else "")
        if results:
            self.modules = ("celery", "sqlalchemy") + (("psycopg",) if results == "postgres" else ())
            self.task_cap = 2000

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        ctx.exchanges.append(ctx.name)
        if self.results == "sqlite":
            ctx.env["BENCH_RESULT_URL"] = f"db+sqlite:///{ctx.dir}/results.sqlite"
        elif self.results == "postgres":
            import psycopg

            ctx.schema = f"bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{ctx.schema}"')
            ctx.env["BENCH_RESULT_URL"] = "db+" + PG_DSN.replace("postgresql://", "postgresql+psycopg://", 1)
            ctx.env["BENCH_RESULT_SCHEMA"] = ctx.schema

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        return [[PYTHON, "-m", "celery", "-A", "bench.peers.apps.celery_app", "worker", "-P", self.pool,
                 "-c", str(self.concurrency), "-Q", ctx.name, "-l", "WARNING",
                 "--without-mingle", "--without-gossip", "--without-heartbeat"]]

    def durable_count(self, ctx: Context, n: int) -> int | None:
        query = "SELECT count(*) FROM {}celery_taskmeta WHERE status = 'SUCCESS'"
        if self.results == "sqlite":
            path = ctx.dir / "results.sqlite"
            if not path.exists():
                return 0
            with contextlib.closing(sqlite3.connect(path)) as db:
                try:
                    return int(db.execute(query.format("")).fetchone()[0])
                except sqlite3.OperationalError:  # no table yet
                    return 0
        if self.results == "postgres":
            import psycopg

            with psycopg.connect(PG_DSN) as conn:
                try:
                    row = conn.execute(query.format(f'"{ctx.schema}".')).fetchone()
                except psycopg.errors.UndefinedTable:
                    return 0
                return int(row[0]) if row else 0
        return None

    def cleanup(self, ctx: Context) -> None:
        if ctx.schema:
            e2e.drop_schema(f"{PG_DSN}?schema={ctx.schema}")


class Dramatiq(System):
    client = "dramatiq"
    modules = ("dramatiq", "pika")
    id = "dramatiq"
    label = "Dramatiq, RabbitmqBroker, 2 processes x 8 threads"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        ctx.queues += [f"{ctx.name}.DQ", f"{ctx.name}.XQ"]

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        return [[PYTHON, "-m", "dramatiq", "bench.peers.apps.dramatiq_app", "-p", "2", "-t", "8", "-Q", ctx.name]]


class Taskiq(System):
    client = "taskiq"
    modules = ("taskiq", "taskiq_aio_pika")
    id = "taskiq"
    label = "Taskiq, taskiq-aio-pika, 2 worker processes"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        ctx.queues.append(f"{ctx.name}.dead_letter")
        ctx.exchanges.append(ctx.name)

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        return [[PYTHON, "-m", "taskiq", "worker", "bench.peers.apps.taskiq_app:broker", "-w", "2",
                 "--log-level", "WARNING"]]


class AioPika(System):
    client = "aio-pika"
    id = "aio-pika"
    label = "raw aio-pika (publisher confirms; one consumer process, prefetch 200)"

    def worker_commands(self, ctx: Context) -> list[list[str]]:
        return [[PYTHON, "-m", "bench.peers.apps.aio_pika_consumer"]]


SYSTEMS: dict[str, System] = {s.id: s for s in [
    BrokerQ("sqlite"),
    BrokerQ("sqlite", work_batch=32),
    BrokerQ("sqlite", work_batch=32, workers=2),
    BrokerQ("sqlite", work_batch=100, workers=2),
    BrokerQ("postgres"),
    BrokerQ("postgres", work_batch=100, workers=2),
    Dramatiq(),
    Taskiq(),
    Celery("prefork", 2),
    Celery("threads", 8),
    Celery("prefork", 2, "sqlite"),
    Celery("prefork", 2, "postgres"),
    Celery("threads", 8, "sqlite"),
    Celery("threads", 8, "postgres"),
    AioPika(),
]}


def new_context(system: System) -> Context:
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-peers-{system.id}-"))
    name = f"bench.{system.id}.{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BENCH_AMQP_URL": AMQP_URL, "PYTHONPATH": str(e2e.ROOT)}
    ctx = Context(name=name, dir=scratch, env=env)
    system.prepare(ctx)
    return ctx


async def delete_amqp(ctx: Context) -> None:
    """Delete the run's queues and exchanges (each on a channel of its own: a failure closes it)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for queue in ctx.queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in ctx.exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()
