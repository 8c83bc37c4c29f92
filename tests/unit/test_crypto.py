"""Sealed payloads (``broker_q/crypto.py``), the master key (``broker_q/master_key.py``) and their settings."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_q.crypto import associated_data, is_sealed, open_sealed, seal, sealed_key_id
from broker_q.errors import ConfigurationError, DecryptionError, PayloadCorrupted, UnknownKey, ValidationError
from broker_q.master_key import MasterKey
from broker_q.settings import Settings

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
PLAIN = b'{"args":["a secret argument"],"kwargs":{}}'
AD = associated_data("acme", "0f" * 16)


def keys(key_id: str) -> bytes:
    known = {"k1": KEY, "k2": OTHER}
    if key_id not in known:
        raise UnknownKey(f"no key {key_id!r} of tenant 'acme'", key_id)
    return known[key_id]


def test_round_trip() -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    assert sealed.startswith("bq1:k1:")
    assert is_sealed(sealed)
    assert not is_sealed(PLAIN.decode())
    assert sealed_key_id(sealed) == "k1"
    assert open_sealed(sealed, keys, AD) == PLAIN
    assert b"secret" not in sealed.encode()


def test_every_value_has_its_own_nonce() -> None:
    assert seal("k1", KEY, PLAIN, AD) != seal("k1", KEY, PLAIN, AD)


def test_empty_plaintext_round_trips() -> None:
    assert open_sealed(seal("k1", KEY, b"", AD), keys, AD) == b""


@pytest.mark.parametrize("index", range(len(seal("k1", KEY, PLAIN, AD))))
def test_a_changed_character_anywhere_is_detected(index: int) -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    for replacement in {"A", "b", "1", "_", "-", ":", "x"} - {sealed[index]}:
        altered = sealed[:index] + replacement + sealed[index + 1:]
        with pytest.raises(DecryptionError) as caught:
            open_sealed(altered, keys, AD)
        assert "secret" not in str(caught.value)


def test_a_flipped_bit_of_the_ciphertext_is_detected_and_named_by_key_id() -> None:
    prefix, blob = seal("k1", KEY, PLAIN, AD).rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    for i in range(len(raw)):
        raw[i] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        with pytest.raises(PayloadCorrupted, match="'k1'") as caught:
            open_sealed(f"{prefix}:{text}", keys, AD)
        assert caught.value.key_id == "k1"
        raw[i] ^= 0x01


def test_truncated_and_padded_values_are_refused() -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    for altered in (sealed[:-1], sealed[:-4], sealed + "A", sealed + "==", "bq1:k1:", "bq1:k1:AAAA", "", "bq1"):
        with pytest.raises(PayloadCorrupted):
            open_sealed(altered, keys, AD)


@pytest.mark.parametrize(("tenant", "task"), [("other", "0f" * 16), ("acme", "1f" * 16), ("acme\x00", "0f" * 16)])
def test_a_value_moved_to_another_task_or_tenant_is_refused(tenant: str, task: str) -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    with pytest.raises(PayloadCorrupted, match="another task or tenant"):
        open_sealed(sealed, keys, associated_data(tenant, task))


def test_the_key_id_is_bound_even_when_two_ids_lead_to_one_key() -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    with pytest.raises(PayloadCorrupted):
        open_sealed(sealed.replace("bq1:k1:", "bq1:k9:"), lambda _: KEY, AD)


def test_an_unknown_key_id_is_named() -> None:
    sealed = seal("k7", OTHER, PLAIN, AD)
    with pytest.raises(UnknownKey, match="'k7'"):
        open_sealed(sealed, keys, AD)


def test_another_version_is_refused() -> None:
    sealed = seal("k1", KEY, PLAIN, AD)
    with pytest.raises(PayloadCorrupted, match="version bq1"):
        open_sealed("bq2" + sealed[3:], keys, AD)


def test_bad_key_ids_and_key_sizes_are_refused_when_sealing() -> None:
    for key_id in ("", "a:b", "x" * 65, "é"):
        with pytest.raises(ValidationError):
            seal(key_id, KEY, PLAIN, AD)
    with pytest.raises(ValidationError):
        seal("k1", KEY[:16], PLAIN, AD)


# --- the master key


def test_a_key_file_is_made_once_with_mode_0600_and_a_warning(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "store.sqlite.master.key"
    with caplog.at_level(logging.WARNING, logger="broker_q.master_key"):
        first = MasterKey.at(path)
        again = MasterKey.at(path)
    assert first.key == again.key
    assert len(first.key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "Back it up" in warnings[0].getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no candidate files left behind
    assert base64.b64encode(first.key).decode() not in repr(first)


def _create(path: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[bytes]) -> None:
    barrier.wait()
    out.put(MasterKey.at(path).key)


def test_processes_that_create_the_key_file_together_agree_on_one_key(tmp_path: Path) -> None:
    path = str(tmp_path / "db.master.key")
    context = multiprocessing.get_context("spawn")
    n = 6
    barrier = context.Barrier(n)
    out: multiprocessing.Queue[bytes] = context.Queue()
    processes = [context.Process(target=_create, args=(path, barrier, out)) for _ in range(n)]
    for process in processes:
        process.start()
    results = [out.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert len(set(results)) == 1
    assert MasterKey.from_file(path).key == results[0]


def test_master_key_text_and_files_are_checked(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert MasterKey.from_text(base64.b64encode(key).decode()).key == key
    assert MasterKey.from_text(base64.urlsafe_b64encode(key).decode()).key == key
    with pytest.raises(ConfigurationError, match="not base64"):
        MasterKey.from_text("not base64!")
    with pytest.raises(ConfigurationError, match="31 bytes"):
        MasterKey.from_text(base64.b64encode(key[:31]).decode())
    with pytest.raises(ConfigurationError, match="cannot read"):
        MasterKey.from_file(tmp_path / "missing.key")


def test_settings_validate_the_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    text = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("BROKER_Q_MASTER_KEY", text)
    settings = Settings()
    assert settings.encryption is True
    assert settings.master_key is not None
    assert settings.master_key.get_secret_value() == text
    assert text not in repr(settings)
    monkeypatch.delenv("BROKER_Q_MASTER_KEY")
    bad = base64.b64encode(b"k" * 31).decode()
    with pytest.raises(Exception, match="32 bytes") as caught:
        Settings(master_key=bad)
    assert bad not in str(caught.value)
    with pytest.raises(Exception, match="not both"):
        Settings(master_key=text, master_key_file=Path("/k"))


@given(tenant=st.text(), task_id=st.text())
def test_the_associated_data_is_the_json_array_of_the_decision(tenant: str, task_id: str) -> None:
    """Written out for speed, it must stay byte for byte what decision 0008 says it is."""
    assert associated_data(tenant, task_id) == json.dumps(["task", tenant, task_id], separators=(",", ":")).encode()
