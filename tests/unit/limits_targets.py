"""Handlers that tests/unit/test_limits.py runs in child processes: they must be importable by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from broker_q.limits import SoftTimeLimitExceeded


def add(a: int, b: int) -> int:
    return a + b


def fail(n: int) -> None:
    raise ValueError(f"bad {n}")


def sleep_forever(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def exit_abruptly(code: int) -> None:
    os._exit(code)


def sleep_then_clean_up(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "slept"


# Resolved through their ``fn``, as a TaskDefinition is
holder = SimpleNamespace(fn=add)
nested = SimpleNamespace(holder=holder)
