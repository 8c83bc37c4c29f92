"""The app the benchmarks run: a no-op task and one that reports when it started."""

from __future__ import annotations

import time

from broker_q import App

app = App()


@app.task(name="noop")
async def noop() -> None:
    return None


@app.task(name="started_at")
async def started_at() -> float:
    return time.time()
