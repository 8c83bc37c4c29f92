"""The app of ``bench/retries.py``: a task that asks to be retried until its due time, then returns."""

from __future__ import annotations

import time

from broker_q import App, Retry, RetryPolicy

app = App()


@app.task(name="retry_until", retry=RetryPolicy(max_attempts=2))
async def retry_until(due: float) -> None:
    """Before ``due`` (seconds since the epoch), ask for a retry at ``due``; from then on, succeed.

    The handler knows no attempt number: the time decides. Submitted with a due time well ahead,
    the first attempt retries and the second, published by the relay at ``due``, succeeds;
    submitted with ``due`` 0, the task succeeds at once (the benchmark's baseline).
    """
    wait = due - time.time()
    if wait > 0:
        raise Retry(delay=wait)
