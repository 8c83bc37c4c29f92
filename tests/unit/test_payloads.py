"""Task payloads sealed and opened (``broker_q/payloads.py``), on the keyring of a memory:// store."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from broker_q.codec import dumps
from broker_q.crypto import is_sealed, sealed_key_id
from broker_q.domain import task as domain
from broker_q.domain.task import TaskState, evolve
from broker_q.errors import KeysShredded, PayloadCorrupted, UnknownKey
from broker_q.master_key import MasterKey
from broker_q.payloads import Payloads, arguments_size, reveal
from broker_q.store import RecorderEventStore, open_store

NOW = datetime(2026, 12, 4, 9, tzinfo=UTC)
MARK = "marker-7f3c payload nobody may read"


@pytest.fixture
def store() -> Iterator[RecorderEventStore]:
    opened = open_store("memory://", master_key=MasterKey(bytes(range(32)), "test"))
    yield opened
    opened.close()


@pytest.fixture
def payloads(store: RecorderEventStore) -> Payloads:
    return Payloads(lambda: store.keys, sealing=True)


def submitted(payloads: Payloads, tenant: str = "acme") -> domain.TaskSubmitted:
    event = domain.submit(task_id=uuid.uuid4(), task="t.echo", queue="default", args=[MARK, 2],
                          kwargs={"note": MARK}, priority=5, tenant=tenant, actor="client:test", now=NOW)
    return payloads.submitted(event)


def succeeded(payloads: Payloads, state: TaskState, result: object) -> TaskState:
    state = evolve(state, domain.start(state, worker="w", now=NOW))
    event = payloads.succeeded(domain.succeed(state, result=result, now=NOW), arguments_sealed=True)
    return evolve(state, event)


def test_arguments_are_sealed_together_and_open_for_their_task_only(payloads: Payloads) -> None:
    event = submitted(payloads)
    assert (event.args, event.kwargs) == ([], {})
    assert event.sealed_arguments is not None
    assert is_sealed(event.sealed_arguments)
    assert MARK not in event.sealed_arguments
    assert payloads.open_arguments("acme", event.stream_id, event.sealed_arguments) == ([MARK, 2], {"note": MARK})
    with pytest.raises(PayloadCorrupted):
        payloads.open_arguments("acme", uuid.uuid4(), event.sealed_arguments)
    with pytest.raises(UnknownKey):  # another tenant has no key of that id
        payloads.open_arguments("other", event.stream_id, event.sealed_arguments)
    assert payloads.submitted(event) is event  # sealed once


def test_sealing_off_leaves_new_payloads_plain_but_still_opens_sealed_ones(
        store: RecorderEventStore, payloads: Payloads) -> None:
    plain = Payloads(lambda: store.keys, sealing=False)
    event = domain.submit(task_id=uuid.uuid4(), task="t", queue="q", args=[1], kwargs={}, priority=5,
                          tenant="acme", actor="a", now=NOW)
    assert plain.submitted(event) is event
    sealed = submitted(payloads)
    state = evolve(None, sealed)
    assert plain.arguments(state) == ([MARK, 2], {"note": MARK})
    # A task whose arguments came sealed gets its result sealed, whatever the setting.
    done = succeeded(plain, state, {"total": MARK})
    assert done.result is None
    assert done.sealed_result is not None
    assert plain.result(done) == {"total": MARK}


def test_a_result_is_sealed_as_a_result_and_cannot_pass_for_arguments(payloads: Payloads) -> None:
    state = evolve(None, submitted(payloads))
    done = succeeded(payloads, state, {"args": [1], "kwargs": {}})
    assert done.sealed_result is not None
    assert payloads.result(done) == {"args": [1], "kwargs": {}}
    swapped = dataclasses.replace(done, sealed_arguments=done.sealed_result)
    with pytest.raises(PayloadCorrupted, match=f"does not hold the arguments of task {done.task_id}"):
        payloads.arguments(swapped)
    with pytest.raises(PayloadCorrupted, match="does not hold the result"):
        payloads.open_result("acme", done.task_id, state.sealed_arguments or "")


def test_a_changed_character_anywhere_is_refused_naming_the_key(payloads: Payloads) -> None:
    event = submitted(payloads)
    sealed = event.sealed_arguments
    assert sealed is not None
    for index in (len("bq1:") + len(sealed_key_id(sealed)) + 1, len(sealed) // 2, len(sealed) - 1):
        flipped = sealed[:index] + ("A" if sealed[index] != "A" else "B") + sealed[index + 1:]
        with pytest.raises(PayloadCorrupted) as caught:
            payloads.open_arguments("acme", event.stream_id, flipped)
        assert caught.value.key_id == sealed_key_id(sealed)
        assert MARK not in str(caught.value)


def test_reveal_opens_arguments_and_result_and_leaves_plain_tasks_alone(payloads: Payloads) -> None:
    state = evolve(None, submitted(payloads))
    done = succeeded(payloads, state, [MARK])
    shown = reveal(payloads, done)
    assert (shown.args, shown.kwargs, shown.result) == ([MARK, 2], {"note": MARK}, [MARK])
    assert (shown.sealed_arguments, shown.sealed_result) == (None, None)
    plain = evolve(None, domain.submit(task_id=uuid.uuid4(), task="t", queue="q", args=[1], kwargs={}, priority=5,
                                       tenant="acme", actor="a", now=NOW))
    assert reveal(payloads, plain) is plain


def test_after_shredding_nothing_opens_and_nothing_is_sealed(store: RecorderEventStore, payloads: Payloads) -> None:
    state = evolve(None, submitted(payloads))
    store.keys.shred("acme")
    with pytest.raises(KeysShredded, match="'acme'"):
        reveal(payloads, state)
    with pytest.raises(KeysShredded):
        submitted(payloads)
    assert evolve(None, submitted(payloads, tenant="other")).sealed_arguments is not None


def test_blocks_says_when_the_key_must_be_read_first(store: RecorderEventStore, payloads: Payloads) -> None:
    assert payloads.blocks("acme")
    event = submitted(payloads)
    assert event.sealed_arguments is not None
    assert not payloads.blocks("acme")
    assert not payloads.blocks("acme", event.sealed_arguments)
    assert not payloads.blocks("acme", "not sealed at all")  # refused without a read
    assert payloads.blocks("acme", "bq1:k9.00000000:" + "A" * 40)  # a key never read here


def test_the_size_of_sealed_arguments_is_that_of_their_plain_json_without_opening_them(payloads: Payloads) -> None:
    event = domain.submit(task_id=uuid.uuid4(), task="t", queue="q", args=[MARK, 2, {"é": None}],
                          kwargs={"k": [1.5, True]}, priority=5, tenant="acme", actor="a", now=NOW)
    plain_size = arguments_size(event)
    assert plain_size == len(dumps([event.args, event.kwargs]))
    assert arguments_size(payloads.submitted(event)) == plain_size
