"""The app that the dashboard's browser tests run with ``broker-q run`` and ``broker-q api``.

Settings come from the environment the tests set (BROKER_Q_STORE, BROKER_Q_NAMESPACE...). Tasks
that wait for a file let a test watch a state change on a page, and choose when it happens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from broker_q import App
from broker_q.domain.breaker import BreakerPolicy

app = App()
app.breaker("payments", BreakerPolicy(failure_threshold=5, window=60, open_for=30))

GATE_SECONDS = 60.0


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="gated")
def gated(path: str) -> str:
    """Returns once the file ``path`` exists (fails after a minute without it)."""
    deadline = time.monotonic() + GATE_SECONDS
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)
    return "opened"


@app.task(name="flaky")
def flaky(path: str) -> str:
    """Fails while the file ``path`` is missing: a dead letter until someone fixes things."""
    if not Path(path).exists():
        raise ValueError(f"the file {path} is missing")
    return "fixed"


@app.task(name="charge", service="payments")
def charge(invoice: str) -> str:
    return f"charged {invoice}"


@app.task(name="collect")
def collect(values: list[Any]) -> int:
    return len(values)
