"""An app for tests that run broker_q as separate processes (``broker-q worker tests.integration.apps:app``).

Settings come from the environment each test sets (BROKER_Q_STORE, BROKER_Q_NAMESPACE...).
"""

from __future__ import annotations

import os
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
