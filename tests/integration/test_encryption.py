"""Payload encryption end to end, on real SQLite files, PostgreSQL and RabbitMQ (issue 6, decision 0008).

Marked payloads go through every path a payload takes (submit, an AMQP client's envelope, a countdown
held as a timer, a chain whose results are merged into arguments, the result, the views) and the
marks are then looked for as bytes everywhere they could have been written: every file of the SQLite
store's directory (the store, its write-ahead log, the views, whatever else), every row of every
table of the PostgreSQL schema, and every message the relay published to the work and events
exchanges, copied by queues of the test's own. Then what must fail does: a flipped byte in a stored
ciphertext, a shredding.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from broker_q import App, TaskFailed
from broker_q.canvas import chord, group
from broker_q.cli import main
from broker_q.crypto import sealed_key_id
from broker_q.domain.events import KeysShredded, TaskDeadLettered, TaskReleased, TaskSubmitted, TaskSucceeded
from broker_q.domain.task import TaskStatus
from broker_q.errors import KeysShredded as KeysShreddedError
from broker_q.keys import Keys
from projections.database import open_view_databases
from projections.queries import AuditQuery, audit
from tests.helpers import catch_up_views, running, wait_for

ARGUMENT_MARK = "arg-mark-5d1e0c77"
RESULT_MARK = "result-mark-9b34aa02"
INGRESS_MARK = "ingress-mark-71c2e9f4"
CHAIN_MARK = "chain-mark-0e6f5a13"
MARKS = (ARGUMENT_MARK, RESULT_MARK, INGRESS_MARK, CHAIN_MARK)


def _app(store: str, amqp_url: str, namespace: str, **settings: Any) -> App:
    app = App(store=store, amqp_url=amqp_url, namespace=namespace, **settings)

    @app.task(name="echo")
    def echo(note: str) -> str:
        return f"{RESULT_MARK} after {note}"

    @app.task(name="shout")
    def shout(text: str) -> str:
        return text.upper() + f" {CHAIN_MARK}"

    @app.task(name="join")
    def join(parts: list[str], sep: str = "|") -> str:
        return sep.join(parts)

    return app


async def _spies(channel: AbstractChannel, namespace: str, cleanup: list[str]) -> list[AbstractQueue]:
    """Queues of the test's own that get a copy of every work message and every event the relay publishes."""
    work = await channel.declare_queue(f"{namespace}.spy-work", auto_delete=False)
    events = await channel.declare_queue(f"{namespace}.spy-events", auto_delete=False)
    cleanup.extend([work.name, events.name])
    await work.bind(f"{namespace}.work", routing_key="default")
    await events.bind(f"{namespace}.events", routing_key="#")
    return [work, events]


async def _bodies(queues: list[AbstractQueue]) -> list[bytes]:
    bodies: list[bytes] = []
    for queue in queues:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
    return bodies


def _sqlite_bytes(store_url: str) -> bytes:
    """Every file in the directory of the SQLite store: the store, its log, the views, their logs."""
    directory = Path(urlsplit(store_url).path[1:]).parent
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def _master_key_file(store_url: str) -> Path:
    return Path(urlsplit(store_url).path[1:] + ".master.key")


def _postgres_rows(store_url: str) -> bytes:
    """Every row of every table of the store's PostgreSQL schema, as text."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(store_url)
    schema = parse_qs(parts.query)["schema"][0]
    dumped: list[str] = []
    with psycopg.connect(store_url.split("?")[0], autocommit=True) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))]
        assert {"brokerq_events", "brokerq_keys"} <= set(tables)
        for name in tables:
            rows = conn.execute(sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
            for row in rows:
                dumped.append(repr([bytes(v) if isinstance(v, memoryview) else v for v in row]))
    return "\n".join(dumped).encode()


def _stored(store_url: str) -> bytes:
    return _postgres_rows(store_url) if store_url.startswith("postgresql") else _sqlite_bytes(store_url)


def _catch_up_views(app: App) -> None:
    catch_up_views(app.store, app.settings.store)


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


# (a) and (f) -------------------------------------------------------------------------------------


async def test_no_marked_payload_is_in_the_store_the_views_or_any_message(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], channel: AbstractChannel,
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)
    async with running(app):
        spies = await _spies(channel, namespace, amqp_cleanup)
        handle = await app.tasks["echo"].submit(note=ARGUMENT_MARK)
        later = await app.tasks["echo"].options(countdown=0.3).submit(note=ARGUMENT_MARK)  # held as a timer
        # A foreign client knows only docs/wire-format.md: it sends its arguments plain.
        ingress = await channel.get_exchange(f"{namespace}.ingress", ensure=True)
        await ingress.publish(aio_pika.Message(json.dumps({"task": "echo", "kwargs": {"note": INGRESS_MARK}}).encode(),
                                               content_type="application/json", message_id="foreign-1"),
                              routing_key="default")
        flow = await (app.tasks["shout"].s(CHAIN_MARK) | app.tasks["shout"].s()).submit()
        assert await handle.result(timeout=20) == f"{RESULT_MARK} after {ARGUMENT_MARK}"
        assert await later.result(timeout=20) == f"{RESULT_MARK} after {ARGUMENT_MARK}"
        assert await flow.result(timeout=20) == f"{CHAIN_MARK.upper()} {CHAIN_MARK.upper()} {CHAIN_MARK}"
        foreign: list[TaskSubmitted] = []

        async def foreign_done() -> bool:
            records = await asyncio.to_thread(app.store.read_log, 0, 10_000)
            foreign[:] = [r.event for r in records if isinstance(r.event, TaskSubmitted)
                          and r.event.idempotency_key == "foreign-1"]
            return bool(foreign) and app.get_task(foreign[0].stream_id).status is TaskStatus.SUCCEEDED

        await wait_for(foreign_done, timeout=20, what="the foreign client's task to succeed")
        assert app.payloads.result(app.get_task(foreign[0].stream_id)) == f"{RESULT_MARK} after {INGRESS_MARK}"

        async def every_event_published() -> bool:
            return await asyncio.to_thread(app.store.max_position) <= await asyncio.to_thread(
                app.store.get_position, "relay")

        await wait_for(every_event_published, timeout=20, what="the relay to publish every event")
        bodies = await _bodies(spies)
    await asyncio.to_thread(_catch_up_views, app)
    app.close()

    assert len(bodies) >= 5  # the work messages and the event batches were seen
    for body in bodies:
        for mark in MARKS:
            assert mark.encode() not in body, f"{mark} in an AMQP message: {body[:200]!r}"
    assert any(b"sealed_arguments" in body for body in bodies)
    stored = await asyncio.to_thread(_stored, durable_store_url)
    assert b"bq1:k1." in stored  # what is there is sealed
    for mark in MARKS:
        assert mark.encode() not in stored, f"{mark} is stored in plain"
        assert mark.upper().encode() not in stored


async def test_a_chord_s_results_are_sealed_again_for_its_callback(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    async with running(app):
        handle = await chord(group(app.tasks["shout"].s(f"{CHAIN_MARK}-{i}") for i in range(3)),
                             app.tasks["join"].s(sep=";")).submit()
        assert await handle.result(timeout=20) == ";".join(f"{CHAIN_MARK.upper()}-{i} {CHAIN_MARK}" for i in range(3))
    callback = handle.step("join").id
    released = app.history(callback)[1]
    assert isinstance(released, TaskReleased)
    assert released.args is None
    assert released.sealed_arguments is not None
    assert CHAIN_MARK not in released.sealed_arguments
    args, kwargs = app.payloads.open_arguments("default", callback, released.sealed_arguments)
    assert (len(args[0]), kwargs) == (3, {"sep": ";"})
    app.close()
    assert CHAIN_MARK.encode() not in _sqlite_bytes(sqlite_url)


# (b) ---------------------------------------------------------------------------------------------


def _flip_a_character_of_the_stored_arguments(store_url: str, task_id: uuid.UUID) -> str:
    """Change one character in the middle of the sealed arguments of the task's ``submitted``, in the
    database itself; return the key id it names."""
    path = urlsplit(store_url).path[1:]
    with sqlite3.connect(path) as conn:
        (state,) = conn.execute("SELECT state FROM stored_events WHERE originator_id = ? AND originator_version = 1",
                                (task_id.hex,)).fetchone()
        data = json.loads(state)
        sealed = data["sealed_arguments"]
        middle = len(sealed) - 20
        data["sealed_arguments"] = sealed[:middle] + ("A" if sealed[middle] != "A" else "B") + sealed[middle + 1:]
        conn.execute("UPDATE stored_events SET state = ? WHERE originator_id = ? AND originator_version = 1",
                     (json.dumps(data).encode(), task_id.hex))
    return sealed_key_id(sealed)


async def test_a_flipped_byte_in_a_stored_ciphertext_dead_letters_the_task_and_its_handler_never_runs(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    side_effect = tmp_path / "handler-ran"

    @app.task(name="touch", max_attempts=5)
    def touch(path: str) -> None:
        Path(path).write_text("ran")

    handle = touch.delay(str(side_effect))  # recorded, not yet published: nothing runs until the relay does
    key_id = _flip_a_character_of_the_stored_arguments(sqlite_url, handle.id)
    async with running(app):
        with pytest.raises(TaskFailed, match="PayloadCorrupted") as failed:
            await handle.result(timeout=20)
        fine = touch.delay(str(tmp_path / "another"))
        await fine.result(timeout=20)  # the worker goes on with the next task
    assert not side_effect.exists()
    assert (tmp_path / "another").exists()
    message = failed.value.message
    assert "the handler was not called" in message
    assert f"key {key_id!r}" in message
    assert "tenant 'default'" in message
    assert [e.TYPE for e in app.history(handle.id)] == ["submitted", "started", "dead_lettered"]  # no retry
    app.close()


# (c) ---------------------------------------------------------------------------------------------


async def test_tasks_sealed_before_a_rotation_still_run_after_it(
    durable_store_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(durable_store_url, amqp_url, namespace)
    before = app.tasks["echo"].delay(note="before")
    rotated = Keys(app.store, actor="operator:test").rotate("default")
    after = app.tasks["echo"].delay(note="after")
    sealed_with = [sealed_key_id(app.get_task(h.id).sealed_arguments or "") for h in (before, after)]
    assert sealed_with[1] == rotated.key_id
    assert sealed_with[0] == rotated.previous_key_id
    async with running(app):
        assert await before.result(timeout=20) == f"{RESULT_MARK} after before"
        assert await after.result(timeout=20) == f"{RESULT_MARK} after after"
    # Results are sealed under the key current when they were recorded: the new one, for both.
    assert {sealed_key_id(app.get_task(h.id).sealed_result or "") for h in (before, after)} == {rotated.key_id}
    app.close()


# (d) ---------------------------------------------------------------------------------------------


async def test_after_shredding_payloads_are_unreadable_tasks_fail_and_the_audit_trail_stays(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = App(store=sqlite_url, amqp_url=amqp_url, namespace=namespace)
    ran: list[str] = []

    @app.task(name="note")
    def note(text: str) -> str:
        ran.append(text)
        return text

    done = app.submit("note", [ARGUMENT_MARK], tenant="acme")
    async with running(app):
        assert await done.result(timeout=20) == ARGUMENT_MARK
    waiting = app.submit("note", ["never read"], tenant="acme")
    other = app.submit("note", ["another tenant"], tenant="globex")
    # As an operator does it, from another process. Processes keep keys for 60 s at most: the
    # worker below is as one started after the shredding (or a minute later), with no key in memory.
    app.close()
    assert main(["--store", sqlite_url, "keys", "shred", "--tenant", "acme", "--yes", "--reason", "left"]) == 0
    ran.clear()
    async with running(app):
        with pytest.raises(TaskFailed, match="KeysShredded"):
            await waiting.result(timeout=20)
        assert await other.result(timeout=20) == "another tenant"
    assert ran == ["another tenant"]  # the shredded tenant's handler never ran
    with pytest.raises(KeysShreddedError, match="'acme'"):
        app.submit("note", ["more"], tenant="acme")
    with pytest.raises(KeysShreddedError):
        app.payloads.result(app.get_task(done.id))
    # The audit skeleton: every event is still there and readable, only the payloads are gone.
    assert [e.TYPE for e in app.history(done.id)] == ["submitted", "started", "succeeded"]
    failed = app.history(waiting.id)[-1]
    assert isinstance(failed, TaskDeadLettered)
    assert failed.error_type == "KeysShredded"
    shredding = Keys(app.store, actor="test").history("acme")
    assert [type(e) for e in shredding] == [KeysShredded]
    assert shredding[0].actor.startswith("operator:")
    await asyncio.to_thread(_catch_up_views, app)
    with open_view_databases(sqlite_url, ["audit"]) as databases:
        records = audit(databases, AuditQuery(tenant="acme"), limit=100)
    assert [r["type"] for r in records] == ["submitted", "started", "succeeded", "submitted", "keys_shredded",
                                            "started", "dead_lettered"]
    capsys.readouterr()
    assert main(["--store", sqlite_url, "status", str(done.id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["result"], shown["args"]) == ("succeeded", None, None)
    assert shown["sealed_result"].startswith("bq1:")
    assert "shredded" in shown["sealed_because"]
    app.close()


# (e) ---------------------------------------------------------------------------------------------


async def test_with_encryption_off_payloads_are_stored_plain(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace, encryption=False)
    async with running(app):
        handle = await app.tasks["echo"].submit(note=ARGUMENT_MARK)
        assert await handle.result(timeout=20) == f"{RESULT_MARK} after {ARGUMENT_MARK}"
    submitted, _, succeeded = app.history(handle.id)
    assert isinstance(submitted, TaskSubmitted)
    assert isinstance(succeeded, TaskSucceeded)
    assert (submitted.kwargs, submitted.sealed_arguments) == ({"note": ARGUMENT_MARK}, None)
    assert (succeeded.result, succeeded.sealed_result) == (f"{RESULT_MARK} after {ARGUMENT_MARK}", None)
    app.close()
    stored = _sqlite_bytes(sqlite_url)
    assert ARGUMENT_MARK.encode() in stored
    assert RESULT_MARK.encode() in stored
    assert not _master_key_file(sqlite_url).exists()  # a store that never sealed made no key


# the status command, with the key ------------------------------------------------------------------


async def test_status_and_replay_show_the_opened_payloads_when_the_key_is_there(
    sqlite_url: str, amqp_url: str, namespace: str, amqp_cleanup: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    app = _app(sqlite_url, amqp_url, namespace)
    async with running(app):
        handle = await app.tasks["echo"].submit(note=ARGUMENT_MARK)
        await handle.result(timeout=20)
    app.close()
    capsys.readouterr()
    assert main(["--store", sqlite_url, "status", str(handle.id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["kwargs"], shown["result"], shown["sealed_because"]) == (
        {"note": ARGUMENT_MARK}, f"{RESULT_MARK} after {ARGUMENT_MARK}", None)
    assert main(["--store", sqlite_url, "replay", str(handle.id)]) == 0
    text = capsys.readouterr().out
    assert f'kwargs={{"note": "{ARGUMENT_MARK}"}}' in text
    assert f'result: "{RESULT_MARK} after {ARGUMENT_MARK}"' in text
