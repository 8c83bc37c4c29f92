"""The domain performs no I/O: importing it must not import any I/O or infrastructure library.

Each check runs in a fresh interpreter, so that what other tests imported cannot hide an import.
Every module of ``broker_q/domain`` is imported, not only the package (which does not import them all).

Allowed although they are libraries: croniter (and its dateutil), a pure computation of cron ticks;
zoneinfo, whose zones are read from the timezone database, static data shipped like code.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import broker_q

FORBIDDEN = (
    "aio_pika",
    "aiormq",
    "eventsourcing.persistence",
    "eventsourcing.sqlite",
    "eventsourcing.postgres",
    "sqlite3",
    "psycopg",
    "prometheus_client",
    "cryptography",
    "pydantic_core",
)

_REPORT = """
import json, sys
forbidden = {forbidden!r}
print(json.dumps(sorted(m for m in forbidden if m in sys.modules)))
"""

_PACKAGE_DIR = str(Path(broker_q.__file__).parent)
_DOMAIN_DIR = str(Path(_PACKAGE_DIR) / "domain")


def _imported_forbidden(prelude: str) -> list[str]:
    modules = "".join(f"import broker_q.domain.{m.name}\n" for m in pkgutil.iter_modules([_DOMAIN_DIR]))
    code = prelude + "\nimport broker_q.domain\n" + modules + _REPORT.format(forbidden=FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    imported: list[str] = json.loads(done.stdout)
    return imported


_WITHOUT_PACKAGE_ROOT = (
    "import sys, types\n"
    "package = types.ModuleType('broker_q')\n"
    f"package.__path__ = [{_PACKAGE_DIR!r}]\n"
    "sys.modules['broker_q'] = package\n"
)
"""Makes ``broker_q`` a bare namespace, so that ``broker_q/__init__.py`` does not run."""


def test_the_check_sees_a_forbidden_import() -> None:
    assert _imported_forbidden(_WITHOUT_PACKAGE_ROOT + "import sqlite3, pydantic_core") == ["pydantic_core", "sqlite3"]


def test_the_domain_modules_import_no_infrastructure() -> None:
    """The domain's own imports, without running ``broker_q/__init__.py`` (see the next test)."""
    assert _imported_forbidden(_WITHOUT_PACKAGE_ROOT) == []


def test_importing_the_domain_imports_no_infrastructure() -> None:
    assert _imported_forbidden("") == []
