"""broker_q's no-op task: an async handler, as in ``bench/noop_app.py``."""

from __future__ import annotations

from bench.peers.marks import mark
from broker_q import App

app = App()


@app.task(name="mark")
async def marked() -> None:
    mark()
