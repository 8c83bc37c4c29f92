"""An app for tests that run broker_q as separate processes (``broker-q worker tests.integration.apps:app``).

Settings come from the environment each test sets (BROKER_Q_STORE, BROKER_Q_NAMESPACE...).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

from broker_q import App

app = App()


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="hang_first_time")
def hang_first_time(marker: str) -> str:
    """Hangs on its first attempt (so the test can kill the worker), returns at once on the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(120)
    return f"done by {os.getpid()}"


@app.task(name="sleep_then_return")
def sleep_then_return(seconds: float, marker: str) -> str:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return threading.current_thread().name


@app.task(name="ignores_its_limit", time_limit=0.5)
def ignores_its_limit(marker: str) -> None:
    """Blocks in C past its hard limit for as long as its process lives: a thread cannot be killed."""
    Path(marker).write_text(str(os.getpid()))
    threading.Event().wait()


# -- for the fault tests and soaks (tests/faults.py) ------------------------------------------


def _note(log: str, line: str) -> None:
    # One write(2) on an O_APPEND file: lines of several processes never interleave, and a line is
    # on disk (in the page cache) before the handler goes on, so a SIGKILL cannot lose it.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.task(name="slow")
async def slow(key: str, log: str) -> str:
    """Takes 5-20 ms, noting ``start KEY`` and ``end KEY`` in ``log``: each line is one handler invocation."""
    _note(log, f"start {key}")
    await asyncio.sleep(random.uniform(0.005, 0.020))
    _note(log, f"end {key}")
    return key


@app.task(name="raises")
async def raises(key: str) -> None:
    raise ValueError(f"refused {key}")


@app.task(name="returns_set")
def returns_set(key: str) -> set[str]:
    return {key}


@app.task(name="returns_object")
async def returns_object(key: str) -> object:
    return object()
