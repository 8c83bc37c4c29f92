"""Soaks: broker_q under one fault, repeated for a bounded time, then drained and counted.

Each soak runs ``broker-q relay`` and ``broker-q worker`` processes (app ``tests.integration.apps:app``)
on a fresh store and namespace, submits ``--tasks`` tasks spread over ``--seconds`` seconds (the
``slow`` task: 5-20 ms of async sleep, which notes each invocation in a log), injects its fault over
the same window, waits up to ``--drain`` seconds for every task to be final, and prints the counts
of ``tests/faults.py``'s Report (what is counted, and why, is said there):

    kill-workers       a second worker SIGKILLed every 1-2 s, mid-task, and started again
    rabbitmq-restart   rabbitmqctl stop_app, 3 s, start_app; again after 2-4 s (shared broker!)
    postgres-restart   the PostgreSQL cluster stopped, 3 s, started; again after 2-4 s (shared server!)
    handler-failures   one task in four fails: raises, returns a set or an object, has arguments of
                       the wrong types (refused by the worker before the handler is called: the
                       soak's client does not register the handlers, so its submits are not
                       checked), names no handler; the soak checks each ends as expected
    poison             one bad AMQP message to the ingress exchange per ten tasks (every case of
                       tests/integration/test_foreign_client.py and tests/faults.py, in turn,
                       arguments of the wrong types among them)

Usage: python bench/soak.py KIND [--tasks N] [--seconds S] [--drain D]
Exit status 1 if a task was lost or ran twice unrecorded, or an outcome was not the expected one.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402

from bench.e2e import AMQP_URL, PG_DSN, delete_namespace, drop_schema  # noqa: E402
from broker_q import App  # noqa: E402
from broker_q.amqp.topology import Topology  # noqa: E402
from tests import faults  # noqa: E402
from tests.faults import Processes, Report, Tally  # noqa: E402
from tests.integration import test_foreign_client as foreign  # noqa: E402

FAILURE_CASES: list[tuple[str, list[Any], str]] = [
    # (task, args, the error type it must end with)
    ("raises", ["k"], "ValueError"),
    ("returns_set", ["k"], "SerializationError"),
    ("returns_object", ["k"], "SerializationError"),
    ("add", ["a", 1], "ValidationError"),  # dead-lettered at once: the handler is never called
    ("nobody.handles.this", [], "LookupError"),
]


class Soak:
    def __init__(self, kind: str, tasks: int, seconds: float, drain: float) -> None:
        self.kind, self.tasks, self.seconds, self.drain = kind, tasks, seconds, drain
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bq-soak-{kind}-"))
        self.store = (f"{PG_DSN}?schema=soak_{uuid.uuid4().hex[:8]}" if kind == "postgres-restart"
                      else f"sqlite:///{self.workdir}/store.sqlite")
        self.namespace = f"soak{uuid.uuid4().hex[:8]}"
        self.app = App(store=self.store, amqp_url=AMQP_URL, namespace=self.namespace,
                       max_message_bytes=foreign.MAX_MESSAGE_BYTES)
        env = faults.process_env(self.store, AMQP_URL, self.namespace)
        env["BROKER_Q_MAX_MESSAGE_BYTES"] = str(foreign.MAX_MESSAGE_BYTES)
        self.processes = Processes(env, self.workdir)
        self.tally = Tally(self.app)
        self.log = self.workdir / "invocations.log"
        self.keys: dict[str, uuid.UUID] = {}
        self.expected_failures: dict[str, str] = {}
        self.poison_sent = 0
        self.end = 0.0

    def calls(self) -> list[tuple[str, str, list[Any]]]:
        calls = faults.slow_calls(self.kind, self.tasks, self.log)
        if self.kind == "handler-failures":
            for n in range(0, len(calls), 4):
                task, args, error_type = FAILURE_CASES[(n // 4) % len(FAILURE_CASES)]
                calls[n] = (calls[n][0], task, args)
                self.expected_failures[calls[n][0]] = error_type
        return calls

    def over(self) -> bool:
        return time.monotonic() > self.end

    async def run(self) -> bool:
        started = time.monotonic()
        self.end = started + self.seconds
        self.app.store.max_position()
        try:
            await self.processes.relay()
            await self.processes.worker()
            submitting = asyncio.create_task(faults.submit_paced(self.app, self.calls(), self.seconds, self.keys))
            injected = await FAULTS[self.kind](self)
            await submitting
            lost = await faults.drain(self.tally, self.keys, self.drain)
            result = faults.report(self.tally, self.keys, self.log, lost)
            result.faults, result.seconds = injected, time.monotonic() - started
            return await self.print(result)
        finally:
            self.processes.stop_all()
            self.app.close()
            drop_schema(self.store)
            await delete_namespace(self.namespace)

    async def print(self, result: Report) -> bool:
        print(f"soak {self.kind}: {self.tasks} tasks over {self.seconds:.0f}s, drain up to {self.drain:.0f}s")
        print("\n".join(result.lines()))
        ok = not result.lost and not result.duplicate_successes and not result.unrecorded_invocations
        unexpected = [key for key, task_id in self.keys.items()
                      if (self.tally.last(task_id) == "succeeded") == (key in self.expected_failures)
                      or (key in self.expected_failures
                          and self.tally.failure(task_id).error_type != self.expected_failures[key])]
        if self.kind == "handler-failures":
            print(f"failures expected:           {len(self.expected_failures)}; unexpected outcomes: "
                  f"{len(unexpected)}")
            ok = ok and not unexpected
        elif unexpected:
            ok = False
            print(f"unexpected outcomes:         {len(unexpected)}")
        if self.kind == "poison":
            invalid = await invalid_depth(self.namespace)
            audited = len(self.tally.refresh().rejected)
            print(f"poison messages sent:        {self.poison_sent}; in the invalid queue: {invalid}; "
                  f"ingress_rejected events: {audited}")
            ok = ok and invalid == audited == self.poison_sent
        print("result:                      " + ("ok" if ok else "FAILED"))
        return ok


async def kill_workers(soak: Soak) -> int:
    return await faults.kill_workers(soak.processes, soak.tally, soak.over, kills=10**9)


async def outages(soak: Soak, outage: Callable[[], Any]) -> int:
    count = 0
    while not soak.over():
        await asyncio.sleep(random.uniform(2.0, 4.0))
        async with outage():
            await asyncio.sleep(3.0)
        count += 1
    return count


async def rabbitmq_restart(soak: Soak) -> int:
    return await outages(soak, lambda: faults.rabbitmq_stopped(AMQP_URL))


async def postgres_restart(soak: Soak) -> int:
    return await outages(soak, faults.postgres_stopped)


async def no_fault(soak: Soak) -> int:
    return 0


async def poison(soak: Soak) -> int:
    """One bad message per ten tasks, over the same window as the submits."""
    cases = [*foreign.REFUSED.values(), *faults.POISON_EXTRA.values()]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.get_exchange(Topology(soak.namespace).ingress_exchange, ensure=True)
        count = max(1, soak.tasks // 10)
        for n in range(count):
            await asyncio.sleep(max(0.0, soak.end - soak.seconds + soak.seconds * n / count - time.monotonic()))
            body, content_type, _ = cases[n % len(cases)]
            await foreign.publish(channel, soak.namespace, body, content_type=content_type)
            soak.poison_sent += 1
    return soak.poison_sent


async def invalid_depth(namespace: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology(namespace).invalid_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)


FAULTS: dict[str, Callable[[Soak], Awaitable[int]]] = {
    "kill-workers": kill_workers,
    "rabbitmq-restart": rabbitmq_restart,
    "postgres-restart": postgres_restart,
    "handler-failures": no_fault,
    "poison": poison,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=list(FAULTS))
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to submit (default 2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of submits and faults (default 20)")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to wait for every task to end")
    options = parser.parse_args()
    soak = Soak(options.kind, options.tasks, options.seconds, options.drain)
    return 0 if asyncio.run(soak.run()) else 1


if __name__ == "__main__":
    sys.exit(main())
