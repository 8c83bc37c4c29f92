"""The master key: the one secret the deployment gives broker_q, under which every data key is wrapped.

It comes from ``BROKER_Q_MASTER_KEY`` (base64 of 32 bytes) or from a key file holding the same
text (``BROKER_Q_MASTER_KEY_FILE``). With neither, an SQLite store makes its own key file beside the
database (``<db>.master.key``, mode 0600) on first use and says so once in a WARNING: losing that
file loses every encrypted payload, so it must be backed up, and apart from the database.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
from pathlib import Path

from broker_q.crypto import KEY_BYTES
from broker_q.errors import ConfigurationError

__all__ = ["MasterKey"]

log = logging.getLogger(__name__)


class MasterKey:
    """32 secret bytes and where they came from (``origin`` is shown in errors; the bytes never are)."""

    __slots__ = ("_key", "origin")

    def __init__(self, key: bytes, origin: str) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"the master key from {origin} has {len(key)} bytes, not {KEY_BYTES}")
        self._key = key
        self.origin = origin

    def __repr__(self) -> str:
        return f"MasterKey(origin={self.origin!r})"

    @property
    def key(self) -> bytes:
        return self._key

    @classmethod
    def generate(cls, origin: str = "memory") -> MasterKey:
        """A random key that lives in this process only (a ``memory://`` store's)."""
        return cls(os.urandom(KEY_BYTES), origin)

    @classmethod
    def from_text(cls, text: str, origin: str = "BROKER_Q_MASTER_KEY") -> MasterKey:
        """The key written as base64 (standard or url-safe alphabet)."""
        cleaned = "".join(text.split())
        try:
            key = base64.b64decode(cleaned.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"the master key from {origin} is not base64") from None
        return cls(key, origin)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterKey:
        """The key held (as base64 text) in the file at ``path``."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(f"cannot read the master key file {os.fspath(path)}: {e}") from e
        return cls.from_text(text, f"key file {os.fspath(path)}")

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> MasterKey:
        """The key of the file at ``path``, made first (random, mode 0600) if there is none.

        Processes that start together agree on one key: each writes its candidate to a file of its
        own and links it into place; a link never replaces an existing file, so the first one wins
        and the others read it. The file at ``path`` is never seen half written.
        """
        target = Path(path)
        if not target.exists():
            candidate = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}")
            text = base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii") + "\n"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as file:
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                try:
                    os.link(candidate, target)
                except FileExistsError:
                    pass  # another process made it first: use theirs
                else:
                    _sync_directory(target.parent)
                    log.warning(
                        "created the master key file %s: every encrypted payload of this store is lost without "
                        "it. Back it up now, apart from the database, or give BROKER_Q_MASTER_KEY instead",
                        target.absolute())
            except OSError as e:
                raise ConfigurationError(f"cannot create the master key file {target}: {e}") from e
            finally:
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
        return cls.from_file(target)


def _sync_directory(directory: Path) -> None:
    """Make the new file's name durable (a crash could otherwise forget the key after data used it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
