"""Celery's no-op task. With ``$BENCH_RESULT_URL`` (a ``db+...`` URL) it stores results and tracks
``STARTED`` with late acks: the nearest Celery comes to recording each task's state changes."""

from __future__ import annotations

import os

from celery import Celery

from bench.peers.marks import mark

_result_url = os.environ.get("BENCH_RESULT_URL") or None
_queue = os.environ["BENCH_QUEUE"]

app = Celery("bench", broker=os.environ["BENCH_AMQP_URL"], backend=_result_url)
app.conf.update(
    task_default_queue=_queue,
    task_default_exchange=_queue,
    task_default_routing_key=_queue,
    task_ignore_result=_result_url is None,
    task_track_started=_result_url is not None,
    task_acks_late=_result_url is not None,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if _result_url is not None and os.environ.get("BENCH_RESULT_SCHEMA"):
    schema = os.environ["BENCH_RESULT_SCHEMA"]
    app.conf.database_table_schemas = {"task": schema, "group": schema}


@app.task(name="mark")
def marked() -> None:
    mark()
