"""A small app to try broker_q with: ``broker-q run broker_q.demo:app``."""

from __future__ import annotations

import asyncio

from broker_q import App

app = App()


@app.task(name="add")
def add(x: float, y: float) -> float:
    return x + y


@app.task(name="sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task(name="fail")
def fail(message: str = "this task always fails") -> None:
    raise RuntimeError(message)
