"""Operators' handling of payload keys (``broker_q/keys.py``): listed without their bytes, rotated and
shredded with an audit event each, and the ``broker-q keys`` commands."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker_q.cli import main
from broker_q.domain.events import KeyRotated, KeysShredded, keys_stream_id
from broker_q.errors import KeysShredded as KeysShreddedError
from broker_q.keys import Keys
from broker_q.master_key import MasterKey
from broker_q.store import RecorderEventStore, open_store

NOW = datetime(2026, 12, 4, 9, tzinfo=UTC)


@pytest.fixture
def store() -> Iterator[RecorderEventStore]:
    opened = open_store("memory://", master_key=MasterKey(bytes(range(32)), "test"))
    yield opened
    opened.close()


def test_rotations_and_shreddings_are_recorded_on_the_tenant_s_keys_stream(store: RecorderEventStore) -> None:
    keys = Keys(store, actor="operator:ann@ops", clock=lambda: NOW)
    assert keys.info("acme") == []
    first = store.keys.current("acme")
    rotated = keys.rotate("acme")
    assert (rotated.previous_key_id, rotated.generation, rotated.actor) == (first.key_id, 2, "operator:ann@ops")
    assert (rotated.stream_id, rotated.version, rotated.tenant) == (keys_stream_id("acme"), 1, "acme")
    assert [(k.key_id, k.generation, k.state) for k in keys.info("acme")] == [
        (first.key_id, 1, "retired"), (rotated.key_id, 2, "current")]
    shredded = keys.shred("acme", reason="tenant left")
    assert (shredded.key_ids, shredded.reason, shredded.version) == ([first.key_id, rotated.key_id], "tenant left", 2)
    assert [k.state for k in keys.info("acme")] == ["shredded", "shredded"]
    assert keys.shred("acme").key_ids == []  # nothing left to erase, and that is recorded too
    assert [type(e) for e in keys.history("acme")] == [KeyRotated, KeysShredded, KeysShredded]
    with pytest.raises(KeysShreddedError):
        keys.rotate("acme")
    assert keys.history("other") == []


def test_the_keys_commands_list_rotate_and_shred_only_when_confirmed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", f"sqlite:///{tmp_path}/q.sqlite"]
    assert main([*store, "keys", "rotate", "--tenant", "acme"]) == 0
    assert main([*store, "keys", "rotate", "--tenant", "acme"]) == 0
    assert main([*store, "keys", "list", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "is current" in out[0]
    assert [line.split()[-1] for line in out[2:]] == ["retired", "current"]
    key_bytes = (tmp_path / "q.sqlite.master.key").read_text().strip()
    assert key_bytes not in "".join(out)
    assert main([*store, "keys", "shred", "--tenant", "acme"]) == 1
    assert "add --yes" in capsys.readouterr().err
    assert main([*store, "keys", "list", "--tenant", "acme", "--json"]) == 0
    assert '"shredded"' not in capsys.readouterr().out  # not shredded without --yes
    assert main([*store, "keys", "shred", "--tenant", "acme", "--yes", "--reason", "tenant left"]) == 0
    assert "keys shredded (k1." in capsys.readouterr().out
    assert main([*store, "submit", "anything", "--args", "[1]"]) == 0  # another tenant: not touched
    capsys.readouterr()
    assert main([*store, "events", "--type", "key_rotated", "--type", "keys_shredded", "--json"]) == 0
    assert '"keys_shredded"' in capsys.readouterr().out
