"""Sealed payloads: JSON values encrypted with AES-GCM under a named key.

A sealed value is one line of ASCII, so it fits in a JSON string of an event or a message::

    bq1:<key id>:<base64url(nonce | ciphertext | tag)>   (no padding)

- ``bq1`` is the format version. It is also part of the associated data, so a value cannot be
  passed off as another version.
- the key id says which key opens it (``Keyring.get(tenant, key_id)``), so keys can be rotated
  while old values still open. The key id is bound into the associated data as well: the same
  bytes under another key id do not open even if both ids led to the same key.
- the nonce is 96 random bits, fresh for every value. With random nonces one key may seal about
  2**32 values before the chance of a repeated nonce matters (NIST SP 800-38D); rotate well before.
- the caller's associated data (:func:`associated_data` of tenant and task id) is authenticated,
  not stored: a value copied to another task or tenant fails to open.

Anything that does not open raises a :class:`~broker_q.errors.DecryptionError` that names the key
id; no message ever carries plaintext. ``docs/decisions/0008-payload-encryption.md`` says why.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_string

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker_q.errors import PayloadCorrupted, ValidationError

__all__ = [
    "KEY_BYTES",
    "VERSION",
    "associated_data",
    "is_sealed",
    "open_sealed",
    "plaintext_length",
    "seal",
    "sealed_key_id",
]

VERSION = "bq1"
KEY_BYTES = 32
"""AES-256."""
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
"""Key ids never hold ``:``, the separator of the format."""


def associated_data(tenant: str, task_id: str) -> bytes:
    """What binds a payload to its place: a value sealed for one task of one tenant opens for no other."""
    # JSON, not a separator: no tenant name can be made to read as another tenant and task. The bytes
    # of json.dumps(["task", tenant, task_id], separators=(",", ":")), written out: a tenth of its cost,
    # paid twice per task.
    return f'["task",{_json_string(tenant)},{_json_string(task_id)}]'.encode()


def seal(key_id: str, key: bytes, plaintext: bytes, associated: bytes) -> str:
    """``plaintext`` (JSON bytes) encrypted under ``key``, named ``key_id``, bound to ``associated``."""
    if not KEY_ID.match(key_id):
        raise ValidationError(f"key id {key_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if len(key) != KEY_BYTES:
        raise ValidationError(f"a payload key has {KEY_BYTES} bytes, not {len(key)}")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, _bound(key_id, associated))
    return f"{VERSION}:{key_id}:{_b64(nonce + sealed)}"


def is_sealed(value: object) -> bool:
    """Whether ``value`` looks like a sealed value of this format (it may still fail to open)."""
    return isinstance(value, str) and value.startswith(VERSION + ":")


def sealed_key_id(sealed: str) -> str:
    """The key id a sealed value names; :class:`PayloadCorrupted` if it is not one."""
    return _parse(sealed)[0]


def plaintext_length(sealed: str) -> int:
    """How many bytes of plaintext ``sealed`` holds, from its length alone (AES-GCM adds a nonce and a tag
    and no padding); :class:`PayloadCorrupted` if it is not a sealed value."""
    return len(_parse(sealed)[1]) - NONCE_BYTES - TAG_BYTES


def open_sealed(sealed: str, key_for: Callable[[str], bytes], associated: bytes) -> bytes:
    """The plaintext of ``sealed``; ``key_for(key_id)`` gives the key (or raises ``UnknownKey``/``KeysShredded``).

    Raises :class:`PayloadCorrupted` when the value was altered or is bound to other associated data.
    """
    key_id, blob = _parse(sealed)
    key = key_for(key_id)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _bound(key_id, associated))
    except InvalidTag:
        raise PayloadCorrupted(
            f"payload sealed under key {key_id!r} failed authentication: it was altered, "
            "or it belongs to another task or tenant", key_id) from None


def _parse(sealed: str) -> tuple[str, bytes]:
    parts = sealed.split(":") if isinstance(sealed, str) else []
    if len(parts) != 3 or parts[0] != VERSION:
        version = parts[0][:8] if parts else "?"
        raise PayloadCorrupted(f"not a sealed payload of version {VERSION} (starts with {version!r})")
    key_id, text = parts[1], parts[2]
    if not KEY_ID.match(key_id):
        raise PayloadCorrupted("sealed payload names no valid key id")
    try:
        blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise PayloadCorrupted(f"payload sealed under key {key_id!r} is not base64url", key_id) from None
    # The decoder ignores the spare low bits of the last character: insist on the one canonical
    # text, so that no altered character of a value goes unnoticed.
    if _b64(blob) != text or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise PayloadCorrupted(f"payload sealed under key {key_id!r} is malformed or truncated", key_id)
    return key_id, blob


def _bound(key_id: str, associated: bytes) -> bytes:
    return b"\x00".join((VERSION.encode(), key_id.encode(), associated))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

